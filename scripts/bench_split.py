#!/usr/bin/env python3
"""What a first capture loses by running its memory and disk paths in one interpreter
(issue 7): the same work timed alone, side by side in one process, and in two processes.

A first capture of the bench guest stores its RAM (the migration stream: parse, hash,
probe, pack, check live) and its disk (NBD reads, hash, probe, pack) at the same time, on
threads of one process.  Both paths hold the GIL for most of their work and release it at
every system call and zstd call, and each release hands it to the other path: taking it
back costs up to the switch interval.  This script measures what that costs, without QEMU
in the timed part, so nothing but the split differs:

1. boots the bench guest of scripts/bench_capture.py (512 MiB RAM, 256 MiB of it random,
   the mixed 1 GiB qcow2 disk) and saves its RAM as QEMU's background snapshot sends it
   (a stream file); the guest is then shut down;
2. times, in alternating rounds, each into a fresh repository, as workers started by this
   script (their interpreter start and imports are not timed):

   - ``memory``: the stream file parsed and stored as a snapshot capture does (live round
     trip checks, the final round trip, the commit);
   - ``disk``: the disk image read over NBD (``qemu-nbd``, as a shut-off domain's disks are
     read) and stored;
   - ``both``: the two at once on threads of one process and one archive writer, as a
     capture runs them;
   - ``split``: the two at once in two processes (two writers of the same repository);

3. prints the medians and ``split / both``: what a capture whose disks are read by a
   process of their own could take, against what it takes now.

No assertion: the machine is shared and noisy.

Usage: scripts/bench_split.py [--rounds N] [--hugepages] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

MIB = 1 << 20
#: bytes the memory worker hands the parser at a time (the capture's pipe reader reads
#: up to 1 MiB from QEMU at once)
FEED = 1 << 20
CONFIGS = ("both", "split", "memory", "disk")
#: the capture's GIL switch interval (vmarchive.ops.capture sets it for the capture)
SWITCH_INTERVAL = 0.0005


# ------------------------------------------------------------------------------ workers
def _metadata() -> dict[str, Any]:
    return {"time": "2026-01-01T00:00:00Z", "domain": "bench-split", "kind": "capture"}


def _memory(w: Any, stream: Path) -> dict[str, Any]:
    """Store the stream file as a snapshot capture stores QEMU's stream; the round trip."""
    from vmarchive.ops.capture_parsed import ParsedConsumer

    pc = ParsedConsumer(w, live_check=True)
    with open(stream, "rb", buffering=0) as f:

        def take() -> bytes | None:
            return f.read(FEED) or None

        pc.attach(take, lambda _e: None)
        pc.finish()  # raises the parser's error, if any
    pc.close_streams()
    rt = pc.roundtrip(w)
    if not rt["ok"]:
        raise SystemExit(f"memory round trip failed: {rt['problems']}")
    return {"stream_bytes": pc.size, "slots_checked_live": rt["slots_checked_live"]}


def _disk(w: Any, sock: str) -> dict[str, Any]:
    from vmarchive.ops.capture_disks import read_disk
    from vmarchive.progress import NULL_PROGRESS

    sw = w.stream("disk:vda", "disk", 1 << 30, attrs={"target": "vda"})  # the 1 GiB image
    res = read_disk(sock, "disk", sw, "vda", NULL_PROGRESS)
    sw.close()
    return {"disk_bytes_read": res.bytes_read}


def worker(what: str, repo: Path, stream: Path, image: Path) -> None:
    """One timed run (``memory``, ``disk`` or ``both``); prints one JSON line."""
    from vmarchive.ops.capture_disks import local_nbd
    from vmarchive.store import Repository

    r = Repository.open(str(repo))
    sys.setswitchinterval(SWITCH_INTERVAL)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(local_nbd(str(image), "qcow2")) if what != "memory" else ""
        t0, c0 = time.time(), time.process_time()
        with r.writer() as w:
            if what == "memory":
                out.update(_memory(w, stream))
            elif what == "disk":
                out.update(_disk(w, sock))
            else:
                done: dict[str, Any] = {}
                failed: list[BaseException] = []

                def disk() -> None:
                    try:
                        done.update(_disk(w, sock))
                    except BaseException as e:
                        failed.append(e)

                t = threading.Thread(target=disk, name="disk-vda")
                t.start()
                out.update(_memory(w, stream))
                t.join()
                if failed:
                    raise failed[0]
                out.update(done)
            w.commit(_metadata())
        out.update(start=t0, end=time.time(), cpu_s=time.process_time() - c0)
    print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------- driver
def _spawn(what: str, repo: Path, stream: Path, image: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", what, str(repo), str(stream), str(image)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _result(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"worker failed with exit code {p.returncode}")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return res


def run_config(what: str, base: Path, stream: Path, image: Path) -> dict[str, Any]:
    """One round of ``what`` into a fresh repository: the span from the first worker's
    start to the last one's end, and the workers' CPU."""
    from vmarchive.store import Repository

    repo = base / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    Repository.init(str(repo))
    parts = ("memory", "disk") if what == "split" else (what,)
    procs = [_spawn(p, repo, stream, image) for p in parts]
    results = [_result(p) for p in procs]
    shutil.rmtree(repo, ignore_errors=True)
    return {
        "wall_s": max(r["end"] for r in results) - min(r["start"] for r in results),
        "cpu_s": sum(r["cpu_s"] for r in results),
        "each_s": {p: r["end"] - r["start"] for p, r in zip(parts, results, strict=True)},
    }


def save_stream(base: Path, hugepages: bool) -> tuple[Path, Path, dict[str, Any]]:
    """Boot the bench guest, save its RAM as a background snapshot sends it; the stream
    file, the disk image and the machine's description."""
    import bench_lib as bl
    import guestlib
    import libvirt

    guestlib.guest_build()
    image = base / "mixed.qcow2"
    layout = bl.write_mixed_disk(image, 1024, 512)
    stream = base / "stream.bin"
    conn = libvirt.open(guestlib.URI)
    spec = guestlib.GuestSpec(
        hugepages=hugepages,
        memory_mib=512,
        disks=(guestlib.DiskSpec("qcow2", 1024),),
        params={"fill": 256, "churn": 0},
    )
    reserved = contextlib.ExitStack()
    g = guestlib.Guest(conn, spec, base / "guest")
    try:
        (base / "guest").mkdir()
        (base / "guest").chmod(0o755)
        if hugepages:
            reserved.enter_context(guestlib.huge_pages_reserved(spec.memory_mib + 64))
        g.create_disks()
        shutil.copyfile(image, g.disk_paths[0])
        g.start()
        g.wait_up()
        g.wait_ticks(2)
        mig = bl.migrate_to_null(g.dom, background=True, drain=["sh", "-c", f"cat > {stream}"])
        info = bl.machine_info(conn)
    finally:
        g.cleanup()
        reserved.close()
        conn.close()
    info.update(disk_layout_mib=layout, ram_to_null_s=mig["wall_s"], hugepages=hugepages)
    return stream, image, info


def report(res: dict[str, Any]) -> list[str]:
    med = {
        c: {k: statistics.median(r[k] for r in res["rounds"][c]) for k in ("wall_s", "cpu_s")}
        for c in CONFIGS
    }
    m = res["machine"]
    out = [
        f"machine: {m['cores']} cores, {m['cpu_model']}, Python {m['python']}",
        f"stream {res['stream_mib']:.0f} MiB (RAM 512 MiB), disk image layout"
        f" {sum(m['disk_layout_mib'].values())} MiB; medians of {len(res['rounds']['both'])}:",
        f"{'':10}{'wall':>8}{'CPU':>8}   rounds (wall, s)",
    ]
    for c in CONFIGS:
        walls = ", ".join(f"{r['wall_s']:.2f}" for r in res["rounds"][c])
        out.append(f"{c:10}{med[c]['wall_s']:8.2f}{med[c]['cpu_s']:8.2f}   [{walls}]")
    alone = max(med["memory"]["wall_s"], med["disk"]["wall_s"])
    out += [
        "",
        f"both / max(memory, disk) alone   {med['both']['wall_s'] / alone:.2f}x"
        "  (1.00x: sharing one interpreter cost nothing)",
        f"split / both                     {med['split']['wall_s'] / med['both']['wall_s']:.2f}x"
        "  (what a process of its own for the disks would take, against one process)",
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hugepages", action="store_true", help="the guest's RAM on huge pages")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    ap.add_argument("--worker", nargs=4, metavar=("WHAT", "REPO", "STREAM", "IMAGE"))
    args = ap.parse_args()
    if args.worker:
        what, repo, stream, image = args.worker
        worker(what, Path(repo), Path(stream), Path(image))
        return
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-split-", dir=args.workdir))
    base.chmod(0o755)
    try:
        stream, image, info = save_stream(base, args.hugepages)
        rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
        for i in range(args.rounds):
            for c in CONFIGS:
                r = run_config(c, base, stream, image)
                rounds[c].append(r)
                print(f"round {i + 1} {c}: {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s", flush=True)
        res = {"machine": info, "stream_mib": stream.stat().st_size / MIB, "rounds": rounds}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(report(res)))
    outdir = ROOT / "bench-results"
    outdir.mkdir(exist_ok=True)
    path = outdir / f"split-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
