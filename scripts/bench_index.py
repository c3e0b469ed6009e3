#!/usr/bin/env python3
"""What the chunk index costs a capture as the repository grows (issues 7 and 8 at scale).

Every capture opens the repository, loads its chunk index (from the local index cache,
see ``vmarchive/store/indexcache.py``) and, after its commit, brings that cache up to
date.  Both scale with the whole repository, not with the capture: this measures them
for repositories of ``--chunks`` entries (one 256 KiB chunk each: 2 million chunks are a
512 GB repository, 8 million the 2 TB of one of our users' hosts).

For each size: a local repository whose index objects name that many chunks (made
directly, without packs: the index never reads them), its cache built once, then
``--rounds`` fresh processes, each of which opens the repository, stores one small
archive (one new chunk, like an incremental capture of an idle guest) and commits.
Reported per size, medians: the index load, the commit (its index cache update
included), the cache files' size and the process's peak RSS.

``--encrypted`` makes the repositories encrypted (AES-256-GCM; the passphrase's scrypt runs
at each open, before the figures start).

Usage: scripts/bench_index.py [--chunks 200000,2000000] [--rounds 3] [--encrypted]
                              [--workdir DIR]
(run it with PYTHONPATH pointing at another tree to compare two versions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_OBJECT = 100_000  # entries per index object, as a writer flushes them
PASSPHRASE = "bench-index passphrase"


def build(repo_dir: Path, chunks: int, encrypted: bool) -> None:
    from vmarchive.store import Repository
    from vmarchive.store.chunkindex import Location
    from vmarchive.store.codecs import InitOptions

    options = InitOptions(encryption="aes-256-gcm", passphrase=PASSPHRASE) if encrypted else None
    repo = Repository.init(str(repo_dir), options or InitOptions())
    try:
        done = 0
        while done < chunks:
            n = min(PER_OBJECT, chunks - done)
            pack = os.urandom(32).hex()
            entries = [
                (os.urandom(16), Location(pack, 16 + i * 1000, 1000, 262144)) for i in range(n)
            ]
            repo._publish_index(entries)
            done += n
        t = time.perf_counter()
        _ = repo.index  # decodes every object once and writes the cache
        print(f"  built: {chunks} chunks, first load {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        repo.close()


def child(repo_dir: str) -> None:
    """One capture-like session: open, load the index, store one chunk, commit."""
    from vmarchive.store import Repository

    repo = Repository.open(repo_dir, PASSPHRASE)
    try:
        t0 = time.perf_counter()
        w = repo.writer()
        t1 = time.perf_counter()
        with w:
            data = os.urandom(262144)
            sw = w.stream("disk:vda", "disk", len(data))
            sw.write(0, data)
            sw.close()
            t2 = time.perf_counter()
            w.commit({"kind": "disk", "domain": "bench", "time": "2026-01-01T00:00:00Z"})
            t3 = time.perf_counter()
    finally:
        repo.close()
    print(json.dumps({"load_s": t1 - t0, "commit_s": t3 - t2, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM: ru_maxrss would count the pages of
    the parent it was forked from, a large index in this script)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="200000,2000000", help="comma-separated sizes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encrypted", action="store_true", help="encrypted repositories")
    ap.add_argument("--workdir", default=None, help="where the repositories go (default: /var/tmp)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-index-", dir=a.workdir or "/var/tmp"))
    env = {**os.environ, "VMARCHIVE_CACHE_DIR": str(base / "cache")}
    os.environ.update(env)
    rows = []
    try:
        for chunks in (int(x) for x in a.chunks.split(",")):
            repo_dir = base / f"repo-{chunks}"
            print(f"{chunks} chunks:", flush=True)
            build(repo_dir, chunks, a.encrypted)
            runs = []
            for _ in range(a.rounds):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(repo_dir)],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
            cache = sum(f.stat().st_size for f in (base / "cache").rglob("index-*"))
            row = {
                "chunks": chunks,
                "load_s": statistics.median(r["load_s"] for r in runs),
                "commit_s": statistics.median(r["commit_s"] for r in runs),
                "peak_rss_mib": statistics.median(r["peak_rss"] for r in runs) / 2**20,
                "cache_mib": cache / 2**20,
            }
            rows.append(row)
            print(
                f"  load {row['load_s']:.3f} s, commit {row['commit_s']:.3f} s, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB, cache files {row['cache_mib']:.0f} MiB",
                flush=True,
            )
            shutil.rmtree(repo_dir)
            shutil.rmtree(base / "cache", ignore_errors=True)
        print(json.dumps(rows))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
