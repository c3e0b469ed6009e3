#!/usr/bin/env python3
"""Incremental vs full capture with 1 % of a 1 GiB disk rewritten between captures (issue 8),
side by side with virtnbdbackup's incremental backup of the same change.

A TCG test guest with a second disk (qcow2, 1 GiB unless ``--disk-mib``, filled with random
data on the host before boot) is captured once to start tracking, and backed up once by
virtnbdbackup (``-l full``, which starts its libvirt checkpoint).  Then, ``--rounds`` times each: 1 % of
the disk (10 MiB as 160 random 64 KiB extents of new random content, written through
QEMU's block layer with HMP ``qemu-io``, i.e. like guest writes) is rewritten; vmarchive
captures it (``--full`` and incremental alternately) and virtnbdbackup makes an incremental
backup (``-l inc``) of the same change.  Both run as commands (``vmarchive --debug capture --json`` and
``virtnbdbackup``), one after the other, each after ``sync``.

Prints per run: wall time, disk bytes read, what was stored; the ratios
incremental/full and vmarchive incremental / virtnbdbackup incremental; where the
incremental capture's time goes (its state transitions and debug timings); and floors: QEMU
alone sending the RAM, the command's start-up, and an incremental capture with nothing
rewritten (what the 1 % itself adds is the difference).  No assertion:
the machine is shared and noisy.  vmarchive archives RAM and device state as well;
virtnbdbackup copies disks only.

By default the host page cache holds the freshly written 1 GiB image, so full reads come from
memory; ``--cold`` evicts that image's pages (``posix_fadvise`` on that file only) before every
vmarchive and virtnbdbackup run, as for a disk larger than the host's cache.

``--hugepages`` puts the guest's RAM on 2 MiB huge pages (see scripts/bench_capture.py).

``--disk-chunk-kib`` sets the repository's disk chunk size: an incremental stores whole
chunks, so the 160 rewritten 64 KiB extents become 160 new 256 KiB chunks by default.

``--disk-mib`` sizes that disk (1 % of it rewritten, still in 64 KiB extents): the issue's
target is for 1 GiB; a larger disk shows how the ratio goes where the per-capture costs
(start-up, RAM) weigh less -- the issue's users have 200 GB images.

Usage: scripts/bench_incremental.py [--workdir DIR] [--mode switchover|snapshot] [--rounds N]
                                    [--cold] [--hugepages] [--disk-chunk-kib N] [--disk-mib N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
import bench_lib as bl  # noqa: E402
import guestlib  # noqa: E402
import libvirt  # noqa: E402

from vmarchive.format import constants as C  # noqa: E402
from vmarchive.hypervisor.connection import Connection  # noqa: E402
from vmarchive.hypervisor.qmp import QMP  # noqa: E402
from vmarchive.store import Repository  # noqa: E402
from vmarchive.store.codecs import InitOptions  # noqa: E402

MIB = 1024 * 1024
DISK_MIB = 1024  #: the issue's disk; --disk-mib measures others
EXTENT = 64 * 1024
#: debug lines worth showing in the breakdown (time since the process started)
TIMINGS = re.compile(
    r"(took|stored at|read at|slots dirty|round trip|capture \S+: \w+ -> \w+)", re.IGNORECASE
)


def rewrite_one_percent(
    name: str, rng: random.Random, scratch: Path, disk_mib: int = DISK_MIB
) -> None:
    """1 % of vdb (160 random 64 KiB extents of a 1 GiB disk) gets new random content,
    written by QEMU (``qemu-io -s FILE``: the extent filled from FILE, one fresh file per
    extent), so no two extents, and no extent and an older one, are alike: what is stored
    is what changed.
    """
    scratch.mkdir(exist_ok=True)
    scratch.chmod(0o755)  # QEMU reads the files
    with Connection.open(guestlib.URI) as c:
        q = QMP(c.lookup(name))
        (blk,) = [b for b in q.execute("query-block") if "virtio-disk1" in str(b.get("qdev"))]
        dev = blk["qdev"]
        for k in range(disk_mib * MIB // 100 // EXTENT):
            off = rng.randrange(disk_mib * MIB // EXTENT) * EXTENT
            src = scratch / f"extent{k}"
            src.write_bytes(rng.randbytes(EXTENT))
            src.chmod(0o644)
            q.hmp(f'qemu-io -d {dev} "write -s {src} {off} {EXTENT}"')


class Bench:
    def __init__(
        self, g: guestlib.Guest, base: Path, mode: str, cold: bool, disk_chunk: int
    ) -> None:
        self.g, self.base, self.mode, self.cold = g, base, mode, cold
        self.repo = base / "repo"
        Repository.init(str(self.repo), InitOptions(disk_chunk_size=disk_chunk)).close()
        self.state = base / "state"
        self.state.mkdir()
        self.vnb = base / "virtnbd"
        self.env = {**os.environ, "VMARCHIVE_STATE_DIR": str(self.state)}

    def evict(self) -> None:
        """--cold: drop the disk image's pages (only that file's) from the page cache."""
        if not self.cold:
            return
        os.sync()
        fd = os.open(self.g.disk_paths[1], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def vmarchive(self, full: bool) -> tuple[dict[str, Any], bl.Run]:
        self.evict()
        cmd = [sys.executable, "-m", "vmarchive", "--debug", "capture", self.g.name]
        cmd += ["--repo", str(self.repo), "--mode", self.mode, "--json", "-c", guestlib.URI]
        r = bl.run([*cmd, *(["--full"] if full else [])], env=self.env, cwd=ROOT)
        out = r.json()
        (d,) = [x for x in out["disks"] if x["target"] == "vdb"]
        assert d["incremental"] == (not full), d
        return {
            "wall_s": r.wall_s,
            "cpu_s": r.cpu_s,
            "vdb_read_mib": d["bytes_read"] / MIB,
            "vdb_referenced_mib": d["bytes_referenced"] / MIB,
            "disks_read_mib": sum(x["bytes_read"] for x in out["disks"]) / MIB,
            "total_read_mib": out["bytes_read"] / MIB,
            "stored_mib": out["bytes_stored"] / MIB,
            "pause_ms": out["guest_pause_ms"],
            # all CPUs of the host: near 100 the capture was bound by CPU, well below it
            # waited (the GIL, QEMU, round trips)
            "host_busy_pct": 100 * (r.host_busy or 0.0),
        }, r

    def virtnbdbackup(self, level: str) -> dict[str, Any]:
        self.evict()
        before = {p: p.stat().st_size for p in self.vnb.rglob("*") if p.is_file()}
        cmd = ["virtnbdbackup", "-U", guestlib.URI, "-d", self.g.name, "-l", level]
        r = bl.run([*cmd, "-o", str(self.vnb), "-n"])
        new = {p: p.stat().st_size for p in self.vnb.rglob("*") if p.is_file() and p not in before}
        data = [(p, n) for p, n in new.items() if ".data" in p.name]
        vdb = sum(n for p, n in data if p.name.startswith("vdb."))
        return {
            "wall_s": r.wall_s,
            "cpu_s": r.cpu_s,
            "vdb_data_mib": vdb / MIB,
            "disks_data_mib": sum(n for _p, n in data) / MIB,
            "output_mib": sum(new.values()) / MIB,
        }


def breakdown(r: bl.Run) -> list[str]:
    """The incremental capture's timeline: state phases and the debug timings."""
    out = [f"  {p['phase']:<12}{p['s']:8.2f} s" for p in bl.phases(r)]
    out.append("  debug timings (s since the process started):")
    for t, line in r.lines:
        if TIMINGS.search(line) and " -> " not in line:
            out.append(f"  {t:8.2f}  {line.split(': ', 1)[-1]}")
    return out


def median(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(float(x[k] or 0) for x in rows) for k in rows[0]}


def measure(
    mode: str,
    rounds: int,
    *,
    cold: bool = False,
    hugepages: bool = False,
    disk_chunk_kib: int = C.DEFAULT_DISK_CHUNK // 1024,
    disk_mib: int = DISK_MIB,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Build the guest, run the captures and backups, tear everything down; the figures
    (JSON-able: ``rows`` per run, ``medians``, ``floors``, ``breakdowns`` as text lines).
    Also a phase of scripts/bench_capture.py."""
    guestlib.guest_build()  # a missing guest fails here, before the work directory exists
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-incr-", dir=workdir or "/var/tmp"))
    base.chmod(0o755)
    conn = libvirt.open(guestlib.URI)
    spec = guestlib.GuestSpec(
        disks=(guestlib.DiskSpec(), guestlib.DiskSpec(size_mib=disk_mib)), hugepages=hugepages
    )
    g = guestlib.Guest(conn, spec, base)
    reserved = contextlib.ExitStack()
    try:
        if hugepages:
            reserved.enter_context(guestlib.huge_pages_reserved(spec.memory_mib + 64))
        g.create_disks()
        raw = base / "fill.raw"
        bl.run(["dd", "if=/dev/urandom", f"of={raw}", "bs=1M", f"count={disk_mib}"])
        bl.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(g.disk_paths[1])])
        raw.unlink()
        g.start()
        g.wait_up()
        b = Bench(g, base, mode, cold, disk_chunk_kib * 1024)
        first, _r = b.vmarchive(True)
        vfull = b.virtnbdbackup("full")
        rng = random.Random(8)
        rows: dict[str, list[dict[str, Any]]] = {"full": [], "incremental": [], "virtnbd": []}
        runs: list[bl.Run] = []
        for kind in ("full", "incremental") * rounds:
            rewrite_one_percent(g.name, rng, base / "extents", disk_mib)
            row, r = b.vmarchive(kind == "full")
            rows[kind].append(row)
            runs.append(r)
            rows["virtnbd"].append(b.virtnbdbackup("inc"))
        # Floors: what any capture of this guest costs before reading a disk byte.
        idle, idle_run = b.vmarchive(False)  # incremental with nothing rewritten
        snap = bl.migrate_to_null(g.dom, background=mode == "snapshot")
        start = bl.run(
            [sys.executable, "-m", "vmarchive", "capture", "nosuch", "--repo", str(b.repo)],
            env=b.env,
            cwd=ROOT,
            ok=tuple(range(256)),  # fails at once (no such domain): start-up and exit only
        )
        return {
            "config": {
                "mode": mode,
                "cold": cold,
                "memory_mib": spec.memory_mib,
                "hugepages": hugepages,
                "disk_mib": disk_mib,
                "changed_mib": disk_mib * MIB // 100 // EXTENT * EXTENT / MIB,
                "disk_chunk_kib": disk_chunk_kib,
            },
            "first": {"vmarchive_s": first["wall_s"], "virtnbdbackup_full_s": vfull["wall_s"]},
            "rows": rows,
            "medians": {k: median(v) for k, v in rows.items()},
            "floors": {
                "ram_to_null_s": snap["wall_s"],
                "startup_s": start.wall_s,
                "nothing_rewritten": idle,
            },
            "breakdowns": {
                "last full capture's time": breakdown(runs[-2]),
                "last incremental capture's time": breakdown(runs[-1]),
                "incremental with nothing rewritten": breakdown(idle_run),
            },
        }
    finally:
        g.cleanup()  # transient domain: virtnbdbackup's checkpoints go with it
        reserved.close()  # after the guest that used them
        shutil.rmtree(base, ignore_errors=True)
        conn.close()


def report(res: dict[str, Any]) -> list[str]:
    """The text report of :func:`measure`'s result."""
    c = res["config"]
    f, i, v = (res["medians"][k] for k in ("full", "incremental", "virtnbd"))
    out = [
        f"first: vmarchive {res['first']['vmarchive_s']:.2f} s,"
        f" virtnbdbackup full {res['first']['virtnbdbackup_full_s']:.2f} s",
        json.dumps(res["rows"], indent=1),
        "",
        f"medians ({c['mode']} mode, {'cold' if c['cold'] else 'warm'} cache,"
        f" {c['memory_mib']} MiB RAM on {'huge pages' if c['hugepages'] else '4 KiB pages'};"
        f" 1 % = {c['changed_mib']:.0f} MiB of {c['disk_mib']} MiB;"
        f" disk chunks {c['disk_chunk_kib']} KiB)",
        f"{'':22}{'full':>10}{'incremental':>14}{'inc/full':>10}",
    ]
    for k in f:
        ratio = i[k] / f[k] if f[k] else float("nan")
        out.append(f"{k:22}{f[k]:10.2f}{i[k]:14.2f}{ratio:10.3f}")
    out += ["", f"{'virtnbdbackup inc':22}{'':10}{'':14}"]
    out += [f"{k:22}{v[k]:10.2f}" for k in v]
    out += [
        "",
        f"ratio: vmarchive incremental / full capture wall       {i['wall_s'] / f['wall_s']:.3f}",
        f"ratio: vmarchive incremental / virtnbdbackup inc wall  {i['wall_s'] / v['wall_s']:.3f}",
        "ratio: vmarchive vdb read / virtnbdbackup vdb data     "
        f"{i['vdb_read_mib'] / v['vdb_data_mib']:.3f}"
        if v["vdb_data_mib"]
        else "virtnbdbackup wrote no vdb data",
        f"vdb bytes read by the incremental: {100 * i['vdb_read_mib'] / c['disk_mib']:.2f} % of disk",
    ]
    fl = res["floors"]
    ram_s, start_s, idle = fl["ram_to_null_s"], fl["startup_s"], fl["nothing_rewritten"]
    how = "background snapshot" if c["mode"] == "snapshot" else "precopy"
    out += [
        "",
        f"floor: QEMU alone sending the RAM ({how} -> /dev/null) {ram_s:.2f} s"
        f" = {ram_s / f['wall_s']:.3f} of the full capture;"
        f" with the command's start-up and exit ({start_s:.2f} s):"
        f" {(ram_s + start_s) / f['wall_s']:.3f}",
        f"floor: an incremental with nothing rewritten {idle['wall_s']:.2f} s"
        f" = {idle['wall_s'] / f['wall_s']:.3f} of the full capture"
        f" ({idle['vdb_read_mib']:.2f} MiB of vdb read): the rewritten 1 %"
        f" adds {i['wall_s'] - idle['wall_s']:.2f} s",
    ]
    for what, lines in res["breakdowns"].items():
        out += ["", f"where the {what} goes (phase durations):", *lines]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--mode", choices=("switchover", "snapshot"), default="switchover")
    ap.add_argument("--rounds", type=int, default=3, help="full and incremental captures each")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict the disk image from the page cache before each run",
    )
    ap.add_argument(
        "--disk-mib",
        type=int,
        default=DISK_MIB,
        help="size of the disk 1 %% of which is rewritten (the issue's: 1024)",
    )
    ap.add_argument(
        "--hugepages",
        action="store_true",
        help="back the guest's RAM with 2 MiB huge pages (reserved for the run)",
    )
    ap.add_argument(
        "--disk-chunk-kib",
        type=int,
        default=C.DEFAULT_DISK_CHUNK // 1024,
        help="the repository's disk chunk size (vmarchive init --disk-chunk-size)",
    )
    a = ap.parse_args()
    if shutil.which("virtnbdbackup") is None:
        print("virtnbdbackup is missing: apt-get install virtnbdbackup (scripts/setup-host)")
        return 2
    res = measure(
        a.mode,
        a.rounds,
        cold=a.cold,
        hugepages=a.hugepages,
        disk_chunk_kib=a.disk_chunk_kib,
        disk_mib=a.disk_mib,
        workdir=a.workdir,
    )
    print("\n".join(report(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
