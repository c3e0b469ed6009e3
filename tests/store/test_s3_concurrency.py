"""Many writers and no coordinator, on Ceph: several writer processes and a concurrent gc
share one ``s3://`` repository; gc's grace rule (FORMAT.md 18) holds with the store's own
modification times; a gateway that dies in the middle of a write leaves no partial archive
and the next write succeeds."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
from crash_writer import content
from s3helpers import Ceph
from storehelpers import read_archive, small_options, write_archive

from vmarchive.errors import BackendError
from vmarchive.store import GcOptions, Repository
from vmarchive.store.s3 import UNREACHABLE_WAIT_ENV

pytestmark = pytest.mark.s3

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def worker(ceph: Ceph, *args: str, crash: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    env.pop("VMARCHIVE_CRASH_AT", None)
    if crash:
        env["VMARCHIVE_CRASH_AT"] = crash
    return subprocess.Popen(
        [sys.executable, str(HERE / "s3_worker.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out.strip(), err.strip()


def test_writers_and_gc_in_parallel_processes(ceph: Ceph) -> None:
    location = ceph.fresh_location()
    repo = Repository.init(location, small_options())
    old = write_archive(repo, {"disk/vda": os.urandom(40 * 4096)}, domain="old")
    kept = write_archive(repo, content(1), domain="kept")
    repo.forget([old])  # its packs are garbage now, but young: the grace rule keeps them
    packs_before = {o.key for o in repo.backend.list("data/")}

    seeds = (10, 11, 12, 13)
    gc_proc = worker(ceph, "gc", location, "30")
    writers = [worker(ceph, "write", location, str(s)) for s in seeds]
    ids: dict[str, int] = {}
    for seed, p in zip(seeds, writers, strict=True):
        rc, out, err = finish(p)
        assert rc == 0, err
        ids[out] = seed
    rc, out, err = finish(gc_proc)
    assert rc == 0, err
    assert int(out) >= 1  # gc did run (between or after the writers)

    fresh = Repository.open(location)
    assert {a.id for a in fresh.list_archives()} == set(ids) | {kept}
    report = fresh.verify(full=True)
    assert report.ok, report.problems
    for aid, seed in ids.items():
        assert read_archive(fresh, aid) == content(seed)
    # Nothing young was deleted: every pack from before is still there.
    assert packs_before <= {o.key for o in fresh.backend.list("data/")}
    assert not list(fresh.backend.list("locks/"))

    # Negative control of the grace rule: with no grace the forgotten archive's packs go.
    result = fresh.gc(GcOptions(grace=0))
    assert result.packs_deleted + result.packs_repacked > 0
    after = Repository.open(location)
    assert after.verify(full=True).ok
    assert read_archive(after, kept) == content(1)
    for aid, seed in ids.items():
        assert read_archive(after, aid) == content(seed)


def test_grace_protects_a_dead_writers_fresh_packs(ceph: Ceph) -> None:
    """A writer killed after uploading packs (no index, no manifest): its lock is stale, so
    gc runs, but the packs are younger than the grace period by S3's LastModified."""
    location = ceph.fresh_location()
    Repository.init(location, small_options())
    rc, _, err = finish(worker(ceph, "write", location, "7", crash="after-pack:3"))
    assert rc == -signal.SIGKILL, err
    repo = Repository.open(location)
    orphans = {o.key for o in repo.backend.list("data/")}
    assert len(orphans) >= 3
    assert repo.list_archives() == []
    result = repo.gc()
    assert result.packs_kept_young >= 3
    assert {o.key for o in repo.backend.list("data/")} == orphans
    assert not list(repo.backend.list("locks/"))  # the dead writer's stale lock is gone
    repo.gc(GcOptions(grace=0))
    assert list(repo.backend.list("data/")) == []


def test_gateway_stopped_mid_write(ceph: Ceph, monkeypatch: pytest.MonkeyPatch) -> None:
    if ceph.base is None:
        pytest.skip("an external S3 store cannot be stopped")
    monkeypatch.setenv(UNREACHABLE_WAIT_ENV, "2")  # the worker waits that long, then fails
    location = ceph.fresh_location()
    repo = Repository.init(location)  # default 16 MiB packs
    before = write_archive(repo, {"disk/vda": os.urandom(1 << 20)}, domain="before")
    p = worker(ceph, "big", location, "1024")
    try:
        deadline = time.monotonic() + 60
        while len(list(repo.backend.list("data/"))) < 3:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the writer never uploaded packs"
            time.sleep(0.05)
        ceph.script("stop-rgw")
        rc, out, err = finish(p, timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        ceph.script("start-rgw")
    assert rc == 1 and out == "", (rc, out, err)
    # one line for the error; before it, once, the wait for the gateway said so
    lines = err.splitlines()
    waits = [ln for ln in lines if "not reachable" in ln and "trying again for up to 2 s" in ln]
    errors = [ln for ln in lines if ln not in waits]
    assert len(waits) == 1 and len(errors) == 1 and "Could not connect" in errors[0], err

    fresh = Repository.open(location)
    assert [a.id for a in fresh.list_archives()] == [before]
    report = fresh.verify(full=True)
    assert report.ok, report.problems
    after = write_archive(fresh, {"disk/vda": os.urandom(1 << 20)}, domain="after")
    assert {a.id for a in Repository.open(location).list_archives()} == {before, after}
    assert Repository.open(location).verify(full=True).ok


def test_gateway_restart_is_ridden_out(ceph: Ceph) -> None:
    """A gateway away for about two seconds (stopped, then started again): a request made
    meanwhile waits for it and succeeds, with a single attempt, by the gateway wait;
    without the wait the same outage is an error at once (negative control)."""
    if ceph.base is None:
        pytest.skip("an external S3 store cannot be stopped")
    patient = ceph.backend(max_attempts=1, unreachable_wait=60, connect_timeout=2)
    hasty = ceph.backend(patient.location, max_attempts=1, unreachable_wait=0, connect_timeout=2)
    patient.put("index/before", b"x")
    assert hasty.get("index/before") == b"x"  # both have been answered: the wait applies
    restart = threading.Timer(2.0, ceph.script, args=("start-rgw",))
    ceph.script("stop-rgw")
    try:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="Could not connect"):
            hasty.get("index/before")
        assert time.monotonic() - t0 < 5  # at once: no wait
        restart.start()
        patient.put("index/after", b"y")
        assert patient.get("index/before") == b"x"
    finally:
        restart.cancel()
        if restart.is_alive():
            restart.join()
        ceph.script("start-rgw")  # harmless when running; certain when the timer failed
    assert hasty.get("index/after") == b"y"
