#!/usr/bin/env python3
"""Incremental vs full capture with 1 % of a 1 GiB disk rewritten between captures (issue 8).

A TCG test guest with a second disk (qcow2, 1 GiB, filled with random data on the host
before boot) is captured once to start tracking; then, twice each and alternating, 1 % of
the disk (10 MiB as 160 random 64 KiB extents, written through QEMU's block layer with
HMP ``qemu-io``, i.e. like guest writes) is rewritten and the guest captured ``--full`` or
incrementally.  Prints wall time and bytes read per capture and the ratios; no assertion
(the machine is shared and noisy).  virtnbdbackup is measured by scripts/bench_capture.py.

Usage: scripts/bench_incremental.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402
import libvirt  # noqa: E402

from vmarchive.hypervisor.connection import Connection  # noqa: E402
from vmarchive.hypervisor.qmp import QMP  # noqa: E402
from vmarchive.ops.capture import CaptureOptions, CaptureResult, Mode, capture  # noqa: E402
from vmarchive.store import Repository  # noqa: E402
from vmarchive.store.codecs import InitOptions  # noqa: E402

MIB = 1024 * 1024
DISK_MIB = 1024
EXTENT = 64 * 1024
CHANGED = DISK_MIB * MIB // 100


def rewrite_one_percent(name: str, rng: random.Random) -> None:
    with Connection.open(guestlib.URI) as c:
        q = QMP(c.lookup(name))
        (blk,) = [b for b in q.execute("query-block") if "virtio-disk1" in str(b.get("qdev"))]
        dev = blk["qdev"]
        for _ in range(CHANGED // EXTENT):
            off = rng.randrange(DISK_MIB * MIB // EXTENT) * EXTENT
            q.hmp(f'qemu-io -d {dev} "write -P {rng.randrange(1, 255)} {off} {EXTENT}"')


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-incr-", dir=a.workdir or "/var/tmp"))
    base.chmod(0o755)
    conn = libvirt.open(guestlib.URI)
    spec = guestlib.GuestSpec(disks=(guestlib.DiskSpec(), guestlib.DiskSpec(size_mib=DISK_MIB)))
    g = guestlib.Guest(conn, spec, base)
    try:
        g.create_disks()
        raw = base / "fill.raw"
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={DISK_MIB}", "status=none"],
            check=True,
        )
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(g.disk_paths[1])],
            check=True,
        )
        raw.unlink()
        g.start()
        g.wait_up()
        repo = base / "repo"
        Repository.init(str(repo), InitOptions()).close()
        state = base / "state"
        state.mkdir()

        def cap(full: bool) -> CaptureResult:
            return capture(
                CaptureOptions(
                    domain=g.name,
                    repo=str(repo),
                    uri=guestlib.URI,
                    mode=Mode.SWITCHOVER,
                    state_dir=state,
                    full=full,
                )
            )

        cap(True)
        rng = random.Random(8)
        rows: dict[str, list[dict[str, float]]] = {"full": [], "incremental": []}
        for kind in ("full", "incremental", "full", "incremental"):
            rewrite_one_percent(g.name, rng)
            t = time.perf_counter()
            r = cap(kind == "full")
            wall = time.perf_counter() - t
            (d,) = [x for x in r.disks if x.target == "vdb"]
            assert d.incremental == (kind == "incremental"), d
            rows[kind].append(
                {
                    "wall_s": wall,
                    "disk_read_mib": d.bytes_read / MIB,
                    "disk_referenced_mib": d.bytes_referenced / MIB,
                    "total_read_mib": r.bytes_read / MIB,
                    "stored_mib": r.bytes_stored / MIB,
                }
            )
        print(json.dumps(rows, indent=1))
        f = {k: statistics.median(x[k] for x in rows["full"]) for k in rows["full"][0]}
        i = {k: statistics.median(x[k] for x in rows["incremental"]) for k in rows["full"][0]}
        print(f"{'':22}{'full':>10}{'incremental':>14}{'ratio':>8}")
        for k in f:
            ratio = i[k] / f[k] if f[k] else float("nan")
            print(f"{k:22}{f[k]:10.2f}{i[k]:14.2f}{ratio:8.3f}")
        print(
            f"vdb bytes read by the incremental: {100 * i['disk_read_mib'] / DISK_MIB:.2f} % of disk"
        )
    finally:
        g.cleanup()
        shutil.rmtree(base, ignore_errors=True)
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
