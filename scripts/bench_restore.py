#!/usr/bin/env python3
"""Restore-to-running time: `vmarchive restore` vs `cp` of the disk + `virsh restore`.

Usage: bench_restore.py [--memory-mib 512] [--disk-mib 1024] [--data-mib 512]
                        [--fill-mib 384] [--rounds 3] [--disk-format qcow2|raw]

Boots the test guest (build/guest) with ``--memory-mib`` of RAM, ``--fill-mib`` of it
filled with random data by the workload, and a ``--disk-mib`` qcow2 disk whose first
``--data-mib`` hold random data.  It captures the guest once into a fresh repository and
saves it once with ``virsh save`` (uncompressed), then alternates, per round:

* baseline: ``cp --sparse=always`` of the disk image, then ``virsh restore`` of the save
  file (the guest running again), then destroy;
* vmarchive: ``vmarchive restore`` (disks rebuilt from the repository, stream regenerated
  into a FIFO save image), until the guest runs; then destroy.

Prints the medians and the ratio vmarchive / baseline (the issue's target: <= 1.2), plus
vmarchive's own timing breakdown and the bytes it staged.  Page cache is warm for both
(the save file and the repository were just written).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import guestlib  # noqa: E402
import libvirt  # noqa: E402

from vmarchive.ops.capture import CaptureOptions, capture  # noqa: E402
from vmarchive.ops.restore import RestoreOptions, restore  # noqa: E402
from vmarchive.store import Repository  # noqa: E402
from vmarchive.store.codecs import InitOptions  # noqa: E402


def make_disk(path: Path, disk_mib: int, data_mib: int) -> None:
    raw = path.with_suffix(".tmp.raw")
    with raw.open("wb") as f:
        f.truncate(disk_mib << 20)
        for _ in range(data_mib):
            f.write(os.urandom(1 << 20))
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True
    )
    raw.unlink()


def destroy(conn: libvirt.virConnect, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if dom.isActive():
        dom.destroy()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--disk-mib", type=int, default=1024)
    ap.add_argument("--data-mib", type=int, default=512)
    ap.add_argument("--fill-mib", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disk-format", default="qcow2", choices=["qcow2", "raw"])
    a = ap.parse_args()

    guestlib.guest_build()  # a missing guest fails here, before the work directory exists
    conn = libvirt.open(guestlib.URI)
    wd = guestlib.make_workdir("vmatest-bench-")
    spec = guestlib.GuestSpec(
        memory_mib=a.memory_mib, params={"tick_ms": 200, "fill": a.fill_mib, "churn": 0}
    )
    g = guestlib.Guest(conn, spec, wd)
    try:
        make_disk(g.disk_paths[0], a.disk_mib, a.data_mib)
        g.start()
        g.wait_up()
        g.wait_ticks(2)
        repo = str(wd / "repo")
        Repository.init(repo, InitOptions()).close()
        cap = capture(CaptureOptions(domain=g.name, repo=repo))
        save = wd / "guest.save"
        g.save(save)
        print(
            f"guest: {a.memory_mib} MiB RAM ({a.fill_mib} MiB random), "
            f"{a.disk_mib} MiB qcow2 disk ({a.data_mib} MiB random; vmarchive writes "
            f"{a.disk_format}); "
            f"save file {save.stat().st_size / 2**20:.0f} MiB; "
            f"disk image {g.disk_paths[0].stat().st_size / 2**20:.0f} MiB"
        )
        base: list[float] = []
        base_cp: list[float] = []
        ours: list[float] = []
        detail: list[dict[str, object]] = []
        for _ in range(a.rounds):
            copy = wd / "copy.qcow2"
            copy.unlink(missing_ok=True)
            # Neither side pays for the other's writeback (the cp leaves 512 MiB dirty,
            # the rebuilt disks are fsynced): start both from clean page cache.
            os.sync()
            t0 = time.perf_counter()
            subprocess.run(["cp", "--sparse=always", str(g.disk_paths[0]), str(copy)], check=True)
            t1 = time.perf_counter()
            conn.restore(str(save))
            base.append(time.perf_counter() - t0)
            base_cp.append(t1 - t0)
            destroy(conn, g.name)

            dd = wd / "restored"
            shutil.rmtree(dd, ignore_errors=True)
            dd.mkdir()
            dd.chmod(0o755)
            os.sync()
            t0 = time.perf_counter()
            r = restore(
                RestoreOptions(
                    archive=cap.id,
                    repo=repo,
                    disk_dir=dd,
                    replace=True,
                    disk_format=a.disk_format,
                )
            )
            ours.append(time.perf_counter() - t0)
            assert conn.lookupByName(g.name).isActive()
            detail.append(
                {
                    "timings": r.timings,
                    "staging_bytes": r.staging_bytes,
                    "stream_bytes": r.stream_bytes,
                }
            )
            destroy(conn, g.name)
        mb, mo = statistics.median(base), statistics.median(ours)
        print(f"baseline cp + virsh restore: median {mb:.2f} s  {[round(x, 2) for x in base]}")
        print(
            f"  of which cp: median {statistics.median(base_cp):.2f} s, virsh restore: median "
            f"{statistics.median(b - c for b, c in zip(base, base_cp, strict=True)):.2f} s"
        )
        print(f"vmarchive restore:           median {mo:.2f} s  {[round(x, 2) for x in ours]}")
        print(f"ratio vmarchive / baseline:  {mo / mb:.2f}  (target <= 1.2)")
        # Rounds run back to back, so a paired ratio cancels some of a shared host's drift.
        paired = [o / b for o, b in zip(ours, base, strict=True)]
        print(
            f"paired ratios: median {statistics.median(paired):.2f}  "
            f"{[round(x, 2) for x in paired]}"
        )
        keys = sorted({k for d in detail for k in d["timings"]})  # type: ignore[attr-defined]
        breakdown = {
            k: round(statistics.median(d["timings"].get(k, 0.0) for d in detail), 3)  # type: ignore[attr-defined]
            for k in keys
        }
        print("vmarchive breakdown (median s):", json.dumps(breakdown))
        print("vmarchive detail (last round):", json.dumps(detail[-1]))
        return 0
    finally:
        destroy(conn, g.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/var/log/libvirt/qemu/{g.name}.log")
        shutil.rmtree(wd, ignore_errors=True)
        conn.close()


if __name__ == "__main__":
    raise SystemExit(main())
