#!/usr/bin/env python3
"""Measure the cost of the two chunk-id algorithms (and the zero check) on this machine.

Prints MB/s for 4 KiB and 64 KiB inputs and the ratio xxh3-128-keyed / blake2b-128-keyed.
Usage: .venv/bin/python scripts/bench_chunkid.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from vmarchive.format.blob import BlobCodec, encode_blob
from vmarchive.format.chunkid import ALGORITHMS, is_zero, make_id_function


def rate(fn: Callable[[bytes], object], data: bytes, seconds: float) -> float:
    """Bytes per second of fn over data, best of three runs of about seconds/3."""
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        deadline = start + seconds / 3
        while True:
            for _ in range(64):
                fn(data)
            n += 64
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, n * len(data) / (now - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = ap.parse_args()
    secret = bytes(range(32))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    for size in (4096, 65536):
        data = os.urandom(size)
        rates = {a: rate(make_id_function(a, secret), data, args.seconds) for a in ALGORITHMS}
        for a, r in rates.items():
            print(f"{size // 1024:>3} KiB  {a:<18} {r / 1e6:9.0f} MB/s")
        xxh, blake = rates[ALGORITHMS[0]], rates[ALGORITHMS[1]]
        print(f"{size // 1024:>3} KiB  ratio xxh3/blake2b  {xxh / blake:6.1f}x")
        text = (b"vmarchive keeps captures in a repository; " * (size // 40 + 1))[:size]
        codec = BlobCodec(3)

        def compress(d: bytes, codec: BlobCodec = codec) -> bytes:
            return encode_blob(codec, b"\x01" * 16, d)

        for label, sample in (("random", data), ("text", text)):
            r = rate(compress, sample, args.seconds)
            print(
                f"{size // 1024:>3} KiB  zstd-3 blob ({label:<6}) {r / 1e6:7.0f} MB/s  (for scale)"
            )
        zero = bytes(size)
        print(
            f"{size // 1024:>3} KiB  is_zero(zero page)  {rate(is_zero, zero, args.seconds) / 1e6:9.0f} MB/s"
        )


if __name__ == "__main__":
    main()
