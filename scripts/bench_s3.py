#!/usr/bin/env python3
"""Benchmark the store on S3 (Ceph radosgw) against the local directory; prints ratios.

The same guest-like input (``--mib`` MiB: 40 % random, 30 % compressible text, 30 % zero
pages, in 64 KiB chunks like RAM) is ingested as one archive into a fresh repository and
read back, on a local directory (``--workdir``, on disk, fsynced) and on an ``s3://``
location.  Two settings:

* ``serial``: one compression worker, one upload at a time, one S3 connection; read back
  chunk after chunk through :class:`StreamReader` (what a naive restore does);
* ``parallel``: the defaults (a worker per core, two uploads in flight, a connection pool),
  read back with 8 threads fetching chunks in slot order (what a restore should do).

Times are medians over ``--rounds`` interleaved rounds.  Target (issue 9): S3 time no more
than 1.3x the local time.  Starts a throw-away Ceph with ``scripts/ceph`` unless
``--endpoint`` (plus AWS_* credentials and ``--bucket``) names another store.  Note that
the Ceph here keeps objects in RAM (memstore) while the local directory is on disk: the
ratio measures the S3 path (HTTP, radosgw, boto3), not the disks.

With ``--guest MIB`` it also boots the test guest (``scripts/build-test-guest`` must have
run; libvirtd on this host) with MIB of RAM, half of it filled with random data, and times
a live capture into a fresh repository and a restore (as a clone, which is then removed)
from it, local directory against S3.

Usage: scripts/bench_s3.py [--mib N] [--rounds N] [--guest MIB] [--workdir DIR]
                           [--endpoint URL --bucket B]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmarchive.store import InitOptions, Repository, WriterOptions  # noqa: E402
from vmarchive.store.backend import Backend  # noqa: E402
from vmarchive.store.local import LocalBackend  # noqa: E402
from vmarchive.store.s3 import S3Backend, S3Options  # noqa: E402

MiB = 1 << 20
CHUNK = 64 * 1024


def make_input(mib: int) -> bytes:
    r = random.Random(7)
    words = [r.randbytes(r.randint(2, 9)).hex() for _ in range(2000)]
    out = bytearray()
    while len(out) < mib * MiB:
        kind = r.random()
        if kind < 0.4:
            out += r.randbytes(CHUNK)
        elif kind < 0.7:
            text = " ".join(r.choice(words) for _ in range(CHUNK // 6)).encode()
            out += text[:CHUNK].ljust(CHUNK, b".")
        else:
            out += bytes(CHUNK)
    return bytes(out[: mib * MiB])


def ingest(repo: Repository, data: bytes, options: WriterOptions) -> str:
    with repo.writer(options=options) as w:
        sw = w.stream("ram/pc.ram", "ram", len(data), chunk_size=CHUNK)
        step = 4 * MiB
        for off in range(0, len(data), step):
            sw.write(off, memoryview(data)[off : off + step])
        sw.close()
        return w.commit({"time": "2026-01-01T00:00:00Z", "domain": "bench", "kind": "full"})


def read_serial(repo: Repository, aid: str) -> int:
    n = 0
    for _off, chunk in repo.open_stream(aid, "ram/pc.ram").iter_chunks():
        n += len(chunk) if chunk is not None else 0
    return n


def read_parallel(repo: Repository, aid: str, threads: int = 8) -> int:
    stream = repo.load_archive(aid).stream("ram/pc.ram")
    zero = repo.codecs.zero_id
    ids = [c for c in (stream.chunk_id(i) for i in range(stream.slots)) if c != zero]
    with ThreadPoolExecutor(threads) as pool:
        return sum(len(d) for d in pool.map(repo.read_chunk, ids, chunksize=4))


def bench_guest(
    ram_mib: int, rounds: int, workdir: Path, bucket: str, endpoint: str
) -> dict[tuple[str, str], list[float]]:
    """Capture and restore of a live test guest, local directory against S3."""
    sys.path.insert(0, str(ROOT / "tests"))
    import guestlib
    import libvirt

    from vmarchive.ops.capture import CaptureOptions, capture
    from vmarchive.ops.restore import RestoreOptions, clone

    conn = libvirt.open(guestlib.URI)
    wd = guestlib.make_workdir("vmatest-bench-s3-")
    spec = guestlib.GuestSpec(
        memory_mib=ram_mib,
        disks=(guestlib.DiskSpec("qcow2", 512),),
        params={"fill": ram_mib // 2, "tick_ms": 200},
    )
    g = guestlib.Guest(conn, spec, wd)
    times: dict[tuple[str, str], list[float]] = {}
    try:
        g.start()
        g.wait_up()
        g.wait_ticks(2)
        for rnd in range(rounds):
            for where in ("local", "s3"):
                if where == "local":
                    loc = str(workdir / "guest-repo")
                    shutil.rmtree(loc, ignore_errors=True)
                else:
                    loc = f"s3://{bucket}/g{secrets.token_hex(4)}"
                Repository.init(loc, InitOptions()).close()
                os.sync()
                t = time.perf_counter()
                r = capture(CaptureOptions(domain=g.name, repo=loc, uri=guestlib.URI))
                times.setdefault((where, "capture"), []).append(time.perf_counter() - t)
                dd = guestlib.make_workdir("vmatest-bench-s3-clone-")
                name = guestlib.unique_name()
                try:
                    t = time.perf_counter()
                    clone(RestoreOptions(archive=r.id, repo=loc, name=name, disk_dir=dd))
                    times.setdefault((where, "restore"), []).append(time.perf_counter() - t)
                finally:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.lookupByName(name).destroy()
                    shutil.rmtree(dd, ignore_errors=True)
                print(f"guest round {rnd + 1}: {where:5} done", file=sys.stderr)
    finally:
        g.destroy()
        shutil.rmtree(wd, ignore_errors=True)
        conn.close()
    return times


def start_ceph(base: Path) -> dict[str, str]:
    subprocess.run([str(ROOT / "scripts" / "ceph"), "start", str(base)], check=True)
    env = {}
    for line in (base / "s3.env").read_text().splitlines():
        k, v = line.removeprefix("export ").split("=", 1)
        env[k] = v
    os.environ.update(env)
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp/vmarchive-bench-s3")
    ap.add_argument("--endpoint")
    ap.add_argument("--bucket", default="vmarchive-bench")
    ap.add_argument("--guest", type=int, metavar="MIB", help="also capture/restore a guest")
    args = ap.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "ceph"
    endpoint = args.endpoint or start_ceph(base)["VMARCHIVE_S3_ENDPOINT"]
    try:
        admin = S3Backend(args.bucket, "", S3Options(endpoint=endpoint))
        if not args.endpoint:
            admin._client.create_bucket(Bucket=args.bucket)
        data = make_input(args.mib)
        opts = InitOptions(memory_chunk_size=CHUNK)
        settings = {
            "serial": (WriterOptions(workers=1, max_uploads=1), S3Options(endpoint, connections=1)),
            "parallel": (WriterOptions(), S3Options(endpoint)),
        }
        times: dict[tuple[str, str, str], list[float]] = {}
        for rnd in range(args.rounds):
            for mode, (wopts, s3opts) in settings.items():
                for where in ("local", "s3"):
                    backend: Backend
                    if where == "local":
                        path = workdir / "local-repo"
                        shutil.rmtree(path, ignore_errors=True)
                        backend = LocalBackend(str(path))
                    else:
                        backend = S3Backend(args.bucket, f"b{secrets.token_hex(4)}/", s3opts)
                    repo = Repository.init(backend.location, opts, backend=backend)
                    os.sync()
                    t = time.perf_counter()
                    aid = ingest(repo, data, wopts)
                    times.setdefault((mode, where, "ingest"), []).append(time.perf_counter() - t)
                    fresh = Repository.open(backend.location, backend=backend)
                    t = time.perf_counter()
                    n = (read_serial if mode == "serial" else read_parallel)(fresh, aid)
                    times.setdefault((mode, where, "read"), []).append(time.perf_counter() - t)
                    assert n > 0
                    print(f"round {rnd + 1}: {mode:8} {where:5} done", file=sys.stderr)
        size = len(data) / MiB
        print(f"\n{args.mib} MiB guest-like input, medians of {args.rounds} rounds")
        print(
            f"{'setting':10} {'step':7} {'local s':>8} {'MiB/s':>7} {'s3 s':>8} {'MiB/s':>7} {'s3/local':>9}"
        )
        for mode in settings:
            for step in ("ingest", "read"):
                lt = statistics.median(times[(mode, "local", step)])
                st = statistics.median(times[(mode, "s3", step)])
                ok = "ok" if st <= 1.3 * lt else "over 1.3x"
                print(
                    f"{mode:10} {step:7} {lt:8.2f} {size / lt:7.0f} {st:8.2f} {size / st:7.0f} "
                    f"{st / lt:8.2f}x {ok}"
                )
        for where in ("local", "s3"):
            for step in ("ingest", "read"):
                a = statistics.median(times[("serial", where, step)])
                b = statistics.median(times[("parallel", where, step)])
                print(f"parallel speed-up, {where:5} {step:7}: {a / b:5.2f}x")
        if args.guest:
            gt = bench_guest(args.guest, args.rounds, workdir, args.bucket, endpoint)
            print(f"\nlive guest, {args.guest} MiB RAM (half filled), medians of {args.rounds}")
            print(f"{'step':8} {'local s':>8} {'s3 s':>8} {'s3/local':>9}")
            for step in ("capture", "restore"):
                lt = statistics.median(gt[("local", step)])
                st = statistics.median(gt[("s3", step)])
                ok = "ok" if st <= 1.3 * lt else "over 1.3x"
                print(f"{step:8} {lt:8.2f} {st:8.2f} {st / lt:8.2f}x {ok}")
    finally:
        if not args.endpoint:
            subprocess.run([str(ROOT / "scripts" / "ceph"), "stop", str(base)], check=False)


if __name__ == "__main__":
    main()
