#!/usr/bin/env python3
"""Benchmark the store against borg and restic on the same inputs; prints ratios.

Inputs (created in --workdir when missing): 1 GiB of random bytes, 1 GiB of zeros, 1 GiB
of repeated 4 MiB blocks, plus any files given as arguments (a real test-guest disk
image, a real migration stream: ``*.mig`` / ``*.stream`` files are stored as an opaque
migration stream, everything else as a disk).

For each tool: first ingest (empty repository), re-ingest (everything already stored),
repository size, peak RSS of the process; rates are medians over ``--rounds`` rounds.  Re-ingests re-read every byte (borg
``--files-cache=disabled``, restic ``--force``): a capture reads disks through NBD and
memory from a pipe, so no tool may skip reading by looking at file metadata.

Targets (issue 3): first ingest >= 2x borg's rate, re-ingest >= 3x borg's, repository
no larger than borg's, vmarchive peak RSS < 300 MiB for 4 GiB of input.

Usage: scripts/bench_store.py [--workdir DIR] [--keep] [EXTRA_INPUT...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TOOLS = ("vmarchive", "borg", "borg-zstd3", "restic")
GiB = 1 << 30
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def ensure_tools() -> None:
    missing = [t for t in ("borg", "restic") if shutil.which(t) is None]
    if missing:
        pkgs = ["borgbackup" if t == "borg" else t for t in missing]
        print(f"installing {' '.join(pkgs)} with apt-get", file=sys.stderr)
        subprocess.run(
            ["apt-get", "install", "-y", *pkgs],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def make_inputs(workdir: Path) -> list[Path]:
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    rnd, zeros, rep = inputs / "random.bin", inputs / "zeros.bin", inputs / "repeated.bin"
    if not rnd.exists() or rnd.stat().st_size != GiB:
        with open(rnd, "wb") as f:
            for _ in range(GiB // (16 * MiB)):
                f.write(os.urandom(16 * MiB))
    if not zeros.exists() or zeros.stat().st_size != GiB:
        with open(zeros, "wb") as f:  # written, not sparse: every tool reads real zeros
            block = bytes(16 * MiB)
            for _ in range(GiB // len(block)):
                f.write(block)
    if not rep.exists() or rep.stat().st_size != GiB:
        import random

        r = random.Random(42)
        blocks = [r.randbytes(4 * MiB) for _ in range(16)]
        with open(rep, "wb") as f:
            for _ in range(GiB // (4 * MiB)):
                f.write(r.choice(blocks))
    return [rnd, zeros, rep]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS bytes of the process).

    Flushes dirty pages first so no tool pays for the previous one's writeback.
    """
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):  # borg exits 1 for warnings
        raise SystemExit(
            f"{cmd[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return elapsed, usage.ru_maxrss * 1024


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


# --------------------------------------------------------------------------- vmarchive
def read_ahead(path: str, block: int = 8 * MiB, depth: int = 3) -> Iterator[memoryview]:
    """Yield the file in ``block``-sized pieces read by a helper thread ``depth`` ahead,
    as a capture does with its NBD reader: I/O waits overlap hashing and compression.
    Blocks are a whole number of chunks, only the last one short."""
    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    for _ in range(depth):
        free.put(bytearray(block))

    def reader() -> None:
        with open(path, "rb", buffering=0) as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while True:
                buf = free.get()
                n = fh.readinto(buf)
                if not n:
                    full.put(None)
                    return
                full.put((buf, n))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    while (item := full.get()) is not None:
        buf, n = item
        yield memoryview(buf)[:n]
        free.put(buf)
    t.join()


def vmarchive_child(repo: str, files: list[str], label: str) -> None:
    """Runs in a child process (so its peak RSS is its own): store files as one archive."""
    sys.path.insert(0, str(ROOT))
    from vmarchive.store import Repository

    r = Repository.open(repo)
    with r.writer() as w:
        for i, f in enumerate(files):
            size = os.path.getsize(f)
            kind = "stream" if f.endswith((".mig", ".stream")) else "disk"
            sw = w.stream(f"f{i}/{os.path.basename(f)}", kind, size)
            off = 0
            for block in read_ahead(f):
                sw.write(off, block)
                off += len(block)
            sw.close()
        w.commit({"time": "2026-01-01T00:00:00Z", "domain": "bench", "kind": label})


def bench_vmarchive(work: Path, files: list[Path], level: int) -> dict[str, float]:
    repo = work / "vmarchive-repo"
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vmarchive",
            "init",
            "--repo",
            str(repo),
            "--compression-level",
            str(level),
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    cmd = [sys.executable, __file__, "--child", str(repo), *map(str, files)]
    t1, rss1 = run_measured(cmd)
    size = du(repo)
    t2, rss2 = run_measured(cmd)
    return {"ingest_s": t1, "reingest_s": t2, "repo_bytes": size, "peak_rss": max(rss1, rss2)}


# -------------------------------------------------------------------------------- borg
def bench_borg(work: Path, files: list[Path], compression: str = "lz4") -> dict[str, float]:
    """borg with its default compression (lz4), or ``compression`` (zstd,3 = ours)."""
    repo = work / "borg-repo"
    shutil.rmtree(repo, ignore_errors=True)
    env = {
        **os.environ,
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_BASE_DIR": str(work / "borg-home"),
    }
    shutil.rmtree(work / "borg-home", ignore_errors=True)
    subprocess.run(["borg", "init", "-e", "none", str(repo)], check=True, env=env)
    base = ["borg", "create", "--files-cache=disabled", "--compression", compression]
    t1, rss1 = run_measured([*base, f"{repo}::a1", *map(str, files)], env)
    size = du(repo)
    t2, rss2 = run_measured([*base, f"{repo}::a2", *map(str, files)], env)
    return {"ingest_s": t1, "reingest_s": t2, "repo_bytes": size, "peak_rss": max(rss1, rss2)}


# ------------------------------------------------------------------------------ restic
def bench_restic(work: Path, files: list[Path]) -> dict[str, float]:
    repo = work / "restic-repo"
    shutil.rmtree(repo, ignore_errors=True)
    env = {
        **os.environ,
        "RESTIC_PASSWORD": "bench",
        "RESTIC_REPOSITORY": str(repo),
        "RESTIC_CACHE_DIR": str(work / "restic-cache"),
    }
    shutil.rmtree(work / "restic-cache", ignore_errors=True)
    subprocess.run(["restic", "init"], check=True, env=env, stdout=subprocess.DEVNULL)
    t1, rss1 = run_measured(["restic", "backup", "--quiet", *map(str, files)], env)
    size = du(repo)
    t2, rss2 = run_measured(["restic", "backup", "--quiet", "--force", *map(str, files)], env)
    return {"ingest_s": t1, "reingest_s": t2, "repo_bytes": size, "peak_rss": max(rss1, rss2)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        vmarchive_child(sys.argv[2], sys.argv[3:], "bench")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/var/tmp/vmarchive-bench")
    ap.add_argument("--keep", action="store_true", help="keep the repositories afterwards")
    ap.add_argument("--only", choices=TOOLS, action="append")
    ap.add_argument(
        "--compression-level", type=int, default=3, help="vmarchive zstd level (default 3)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="repetitions (median is reported)")
    ap.add_argument("extra", nargs="*", help="real inputs: a guest disk image, a migration stream")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ensure_tools()
    files = make_inputs(work) + [Path(p).resolve() for p in args.extra]
    total = sum(f.stat().st_size for f in files)
    print(
        f"inputs: {', '.join(f'{f.name} ({f.stat().st_size / MiB:.0f} MiB)' for f in files)}; total {total / GiB:.2f} GiB"
    )
    tools = args.only or list(TOOLS)
    # Rounds interleave the tools, so a burst of load from elsewhere on the machine hits
    # them alike; each figure is the median over rounds (sizes do not vary).
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in tools}
    for rnd in range(args.rounds):
        for tool in tools:
            if tool == "vmarchive":
                r = bench_vmarchive(work, files, args.compression_level)
            elif tool == "borg-zstd3":
                r = bench_borg(work, files, "zstd,3")
            else:
                r = {"borg": bench_borg, "restic": bench_restic}[tool](work, files)
            runs[tool].append(r)
            print(
                f"  round {rnd + 1} {tool:<10} ingest {total / MiB / r['ingest_s']:7.1f} MiB/s"
                f"  re-ingest {total / MiB / r['reingest_s']:7.1f} MiB/s",
                flush=True,
            )
    results: dict[str, dict[str, float]] = {}
    for tool in tools:
        rs = runs[tool]
        results[tool] = {
            "ingest_s": statistics.median(x["ingest_s"] for x in rs),
            "reingest_s": statistics.median(x["reingest_s"] for x in rs),
            "repo_bytes": rs[0]["repo_bytes"],
            "peak_rss": max(x["peak_rss"] for x in rs),
        }
        r = results[tool]
        print(
            f"{tool:<10} ingest {total / MiB / r['ingest_s']:8.1f} MiB/s   re-ingest {total / MiB / r['reingest_s']:8.1f} MiB/s"
            f"   repo {r['repo_bytes'] / MiB:8.1f} MiB   peak RSS {r['peak_rss'] / MiB:6.1f} MiB",
            flush=True,
        )
    if "vmarchive" in results:
        v = results["vmarchive"]
        for other in (t for t in TOOLS[1:] if t in results):
            o = results[other]
            print(
                f"vmarchive vs {other}: ingest x{o['ingest_s'] / v['ingest_s']:.2f}, "
                f"re-ingest x{o['reingest_s'] / v['reingest_s']:.2f}, "
                f"repo size x{v['repo_bytes'] / o['repo_bytes']:.3f} (lower is smaller), "
                f"peak RSS x{v['peak_rss'] / o['peak_rss']:.2f}"
            )
        if "borg" in results:
            b = results["borg"]
            checks = {
                "first ingest >= 2x borg": b["ingest_s"] / v["ingest_s"] >= 2,
                "re-ingest >= 3x borg": b["reingest_s"] / v["reingest_s"] >= 3,
                "repo <= borg's": v["repo_bytes"] <= b["repo_bytes"],
                "peak RSS < 300 MiB": v["peak_rss"] < 300 * MiB,
            }
            for name, ok in checks.items():
                print(f"  target {name}: {'met' if ok else 'MISSED'}")
    print(json.dumps({"input_bytes": total, "results": results}))
    if not args.keep:
        for name in ("vmarchive", "borg", "restic"):
            shutil.rmtree(work / f"{name}-repo", ignore_errors=True)


if __name__ == "__main__":
    main()
