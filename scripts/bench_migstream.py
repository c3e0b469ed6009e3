#!/usr/bin/env python3
"""Throughput of the migration stream parser and regenerator (pure Python, one thread).

Usage: bench_migstream.py [STREAM_FILE ...] [--size-mib N]

Without files it builds a synthetic QEMU 7.2 stream of N MiB RAM (default 512; 3/4 data
pages with random content, 1/4 zero pages) with the regenerator itself.  For every
stream it prints MB/s for a plain block read of the file (the ceiling), the parse (a
sink that touches nothing), and the regenerate (pages from memory to /dev/null), plus
the ratios to the plain read.  MB are 10^6 bytes of stream.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterable

from vmarchive.format import migstream as ms

PAGE = ms.TARGET_PAGE_SIZE


class _Keep(ms.NullSink):
    """Keeps device bodies (small) and one in-memory image per block, for regenerate."""

    def __init__(self, keep_ram: bool) -> None:
        self.keep = keep_ram
        self.img: dict[str, bytearray] = {}
        self.dev = bytearray()

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        if self.keep:
            self.img = {b.idstr: bytearray(b.used_length) for b in blocks}

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        if self.keep and data is not None:
            self.img[block.idstr][offset : offset + PAGE] = data

    def device_section(self, record: ms.SectionRecord, data: memoryview) -> None:
        self.dev += data

    def source(self, block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        img = memoryview(self.img[block.idstr])
        step = 1 << 20
        for off in range(0, block.used_length, step):
            n = min(step, block.used_length - off)
            yield (off, n, img[off : off + n])


def synthetic(path: str, size_mib: int) -> None:
    layout = ms.StreamLayout(
        version=3,
        configuration=(13).to_bytes(4, "big") + b"pc-i440fx-7.2",
        ram=ms.RamSection(2, 0, 4),
        ram_blocks=[ms.RamBlock(0, "pc.ram", size_mib << 20)],
        records=[],
        vmdesc=json.dumps({"page_size": PAGE, "devices": []}).encode(),
    )
    rnd = os.urandom(4 << 20)

    def source(block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        for k, off in enumerate(range(0, block.used_length, 1 << 20)):
            if k % 4 == 3:
                yield (off, 1 << 20, None)
            else:
                at = (k * 8192) % (3 << 20)
                yield (off, 1 << 20, rnd[at : at + (1 << 20)])

    with open(path, "wb") as f:
        ms.regenerate(layout, b"", source, f)


def bench(path: str) -> None:
    size = os.path.getsize(path)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    raw = size / (time.perf_counter() - t) / 1e6

    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        layout = ms.parse_stream(f, ms.NullSink())
    parse_s = time.perf_counter() - t
    parse = size / parse_s / 1e6

    keep = _Keep(keep_ram=True)
    with open(path, "rb", buffering=0) as f:
        layout = ms.parse_stream(f, keep)
    t = time.perf_counter()
    with open(os.devnull, "wb") as out:
        n = ms.regenerate(layout, bytes(keep.dev), keep.source, out)
    regen_s = time.perf_counter() - t
    regen = n / regen_s / 1e6
    ram = sum(b.used_length for b in layout.ram_blocks)
    s = layout.stats
    print(
        f"{os.path.basename(path)}: {size / 1e6:.0f} MB, {s.page_records} page records"
        f" ({s.zero_records} zero, {s.resent_pages} re-sent)"
    )
    print(f"  read     {raw:8.0f} MB/s  (ceiling)")
    print(f"  parse    {parse:8.0f} MB/s  ratio {parse / raw:.2f}")
    ram_parsed = sum(b.used_length for b in layout.ram_blocks)
    print(f"  parse    {ram_parsed / parse_s / 1e6:8.0f} MB/s of guest RAM covered")
    print(f"  regen    {regen:8.0f} MB/s  ratio {regen / raw:.2f}")
    print(f"  regen    {ram / regen_s / 1e6:8.0f} MB/s of guest RAM covered ({ram / 1e6:.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("streams", nargs="*")
    ap.add_argument("--size-mib", type=int, default=512)
    args = ap.parse_args()
    if args.streams:
        for p in args.streams:
            bench(p)
        return
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "synthetic.bin")
        synthetic(path, args.size_mib)
        bench(path)


if __name__ == "__main__":
    main()
