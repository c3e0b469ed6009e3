#!/usr/bin/env python3
"""What a large disk's slot table costs a capture that reads the disk in its disk reader
process (issue 8's users: 200 GB images), without reading any data.

A disk of 256 KiB chunks has a 16-byte slot per chunk: 819,200 slots, 13 MB, for 200 GiB.
The disk reader process (vmarchive/ops/disk_process.py) sends its table back to the
capture, which adopts it into the disk's stream (``set_chunks``); an incremental read also
gets the parent archive's table from the capture and references every clean slot.  This
script times that alone: a sparse qcow2 of ``--size-gib`` (all holes, so nothing is read
but block status) with an empty persistent dirty bitmap, served read-only by ``qemu-nbd``
with that bitmap; per round, into one repository, a full read and then an incremental read
(the bitmap: nothing dirty, every slot clean) through ``DiskProcess``, as a capture drives
it.  Printed per round and as medians: the wall time from the child's start to the tables
adopted, and the capture's own CPU (the child's start-up runs beside it, not counted).

The disk is all holes, so no chunk is looked up in the index: a disk full of data also
pays the membership check of its distinct chunks (~0.8 us each).  No assertion: the
machine is shared and noisy.

Usage: scripts/bench_tables.py [--size-gib N] [--rounds N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmarchive.ops.disk_process import DiskProcess  # noqa: E402
from vmarchive.progress import NULL_PROGRESS  # noqa: E402
from vmarchive.store import Repository  # noqa: E402

GIB = 1 << 30
BITMAP = "bench"
META = {"time": "2026-11-29T00:00:00Z", "domain": "bench-tables", "kind": "capture"}


def serve(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    """``qemu-nbd`` serving ``image`` read-only, with its bitmap, as export ``disk``."""
    cmd = ["qemu-nbd", "--read-only", "--shared=4", "--persistent", "-k", str(sock)]
    cmd += ["-x", "disk", "-f", "qcow2", "-B", BITMAP, str(image)]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"qemu-nbd did not start (exit status {proc.poll()})")
        time.sleep(0.05)
    return proc


def read_once(
    repo_dir: Path, sock: Path, size: int, parent: bytes | None
) -> tuple[dict[str, float], bytes]:
    """One read through the disk reader process (incremental when ``parent`` is a table);
    its timings and the table it left in the stream."""
    repo = Repository.open(str(repo_dir))
    with repo, repo.writer() as w:
        sink = w.stream("disk:vda", "disk", size)
        t0, c0 = time.perf_counter(), time.process_time()
        dp = DiskProcess.spawn(str(repo_dir), w, NULL_PROGRESS)
        bitmap = None if parent is None else BITMAP
        dp.start("vda", sink, socket=str(sock), export="disk", bitmap=bitmap, parent_table=parent)
        dp.end_input()
        dp.join()
        dp.raise_first()
        took = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
        table = sink.table()
        sink.close()
        w.commit(META)
    return took, table


def measure(size_gib: int, rounds: int, workdir: Path | None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-tables-", dir=workdir or "/var/tmp"))
    nbd: subprocess.Popen[bytes] | None = None
    try:
        image, sock, repo_dir = base / "disk.qcow2", base / "nbd.sock", base / "repo"
        size = size_gib * GIB
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)], check=True
        )
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), BITMAP], check=True)
        nbd = serve(image, sock)
        Repository.init(str(repo_dir)).close()
        rows: dict[str, list[dict[str, float]]] = {"full": [], "incremental": []}
        slots = 0
        for r in range(rounds):
            full, table = read_once(repo_dir, sock, size, None)
            inc, _ = read_once(repo_dir, sock, size, table)
            rows["full"].append(full)
            rows["incremental"].append(inc)
            slots = len(table) // 16
            print(
                f"round {r + 1}: full {full['wall_s']:.3f} s (capture CPU {full['cpu_s']:.3f} s),"
                f" incremental {inc['wall_s']:.3f} s (capture CPU {inc['cpu_s']:.3f} s)",
                flush=True,
            )
        medians = {
            kind: {k: statistics.median(x[k] for x in xs) for k in xs[0]}
            for kind, xs in rows.items()
        }
        return {"size_gib": size_gib, "slots": slots, "rows": rows, "medians": medians}
    finally:
        if nbd is not None:
            nbd.terminate()
            nbd.wait()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install qemu-utils (scripts/setup-host)")
            return 2
    res = measure(a.size_gib, a.rounds, a.workdir)
    for kind, m in res["medians"].items():
        print(
            f"median {kind}: {m['wall_s']:.3f} s, capture CPU {m['cpu_s']:.3f} s"
            f" ({res['slots']} slots, {res['size_gib']} GiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
