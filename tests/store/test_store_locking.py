"""Shared/exclusive locks, staleness and refresh, with an injected clock and pid table."""

from __future__ import annotations

import pathlib

import pytest

from vmarchive.errors import LockedError
from vmarchive.store.local import LocalBackend
from vmarchive.store.locking import (
    DEFAULT_LEASE,
    WAIT_ENV,
    LockContext,
    LockManager,
    default_wait,
    pid_alive,
)


class World:
    """A fake clock and process table shared by several lock managers."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.alive: set[int] = set()

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s

    def manager(self, backend: LocalBackend, pid: int, host: str = "h1") -> LockManager:
        self.alive.add(pid)
        ctx = LockContext(
            host=host,
            pid=pid,
            clock=self.clock,
            lease=300.0,
            is_alive=lambda p: p in self.alive,
            sleep=self.sleep,
        )
        return LockManager(backend, ctx)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def backend(tmp_path: pathlib.Path) -> LocalBackend:
    return LocalBackend(str(tmp_path))


def test_shared_locks_coexist_exclusive_excludes(world: World, backend: LocalBackend) -> None:
    a, b, c = (world.manager(backend, p) for p in (1, 2, 3))
    la = a.acquire("shared", refresh=False)
    lb = b.acquire("shared", refresh=False)
    with pytest.raises(LockedError, match=r"pid (1|2)"):
        c.acquire("exclusive", refresh=False)
    la.release()
    lb.release()
    lc = c.acquire("exclusive", refresh=False)
    with pytest.raises(LockedError, match="exclusive"):
        a.acquire("shared", refresh=False)
    with pytest.raises(LockedError):
        b.acquire("exclusive", refresh=False)
    lc.release()
    lc.release()  # idempotent
    assert list(backend.list("locks/")) == []


def test_failed_attempt_leaves_no_lock_object(world: World, backend: LocalBackend) -> None:
    a, b = world.manager(backend, 1), world.manager(backend, 2)
    held = a.acquire("exclusive", refresh=False)
    for _ in range(3):
        with pytest.raises(LockedError):
            b.acquire("shared", refresh=False)
    assert [o.key for o in backend.list("locks/")] == [held.key]


def test_expired_lease_is_stale_and_removed_by_exclusive(
    world: World, backend: LocalBackend
) -> None:
    a = world.manager(backend, 1, host="other-host")
    b = world.manager(backend, 2)
    held = a.acquire("shared", refresh=False)
    with pytest.raises(LockedError):
        b.acquire("exclusive", refresh=False)
    world.now += 301
    lb = b.acquire("exclusive", refresh=False)
    assert not backend.exists(held.key)  # the stale lock was removed
    # Its holder learns it lost the lock before committing anything.
    with pytest.raises(LockedError, match="expired"):
        held.check()
    lb.release()


def test_removed_or_lapsed_lock_fails_check(world: World, backend: LocalBackend) -> None:
    a = world.manager(backend, 1)
    held = a.acquire("shared", refresh=False)
    held.check()  # negative control: a live lock passes
    backend.delete(held.key)  # someone judged it stale
    with pytest.raises(LockedError, match="removed"):
        held.check()
    frozen = a.acquire("shared", refresh=False)
    world.now += 301  # the holder was frozen past its lease; the object is still there
    with pytest.raises(LockedError, match="expired"):
        frozen.check()


def test_dead_pid_on_same_host_is_stale_other_host_is_trusted(
    world: World, backend: LocalBackend
) -> None:
    here = world.manager(backend, 10)
    there = world.manager(backend, 11, host="h2")
    l_here = here.acquire("shared", refresh=False)
    l_there = there.acquire("shared", refresh=False)
    world.alive -= {10, 11}  # both processes died; only h1's death is visible to us
    me = world.manager(backend, 12)
    stale = {info.id: s for info, s in me.locks()}
    assert stale == {l_here.info.id: True, l_there.info.id: False}
    with pytest.raises(LockedError, match="h2"):
        me.acquire("exclusive", refresh=False)
    world.now += 301
    me.acquire("exclusive", refresh=False).release()


def test_refresh_extends_the_lease(world: World, backend: LocalBackend) -> None:
    a, b = world.manager(backend, 1, host="h2"), world.manager(backend, 2)
    held = a.acquire("shared", refresh=False)
    for _ in range(5):
        world.now += 200
        held.refresh()
    with pytest.raises(LockedError):
        b.acquire("exclusive", refresh=False)  # 1000 s later, still live
    assert held.info.expires == world.now + 300


def test_wait_retries_until_released(world: World, backend: LocalBackend) -> None:
    a, b = world.manager(backend, 1, host="h2"), world.manager(backend, 2)
    a.acquire("exclusive", refresh=False)
    with pytest.raises(LockedError):
        b.acquire("shared", wait=30, refresh=False)
    assert world.now >= 1_000_030
    # With a wait longer than the lease, the holder's lease runs out and we get in.
    b.acquire("shared", wait=600, refresh=False).release()


def test_unreadable_lock_counts_as_live_until_a_lease_old(
    world: World, backend: LocalBackend
) -> None:
    backend.put("locks/deadbeef", b"garbage")
    world.now = backend.stat("locks/deadbeef").mtime + 10
    b = world.manager(backend, 2)
    ((info, stale),) = b.locks()
    assert info.id == "deadbeef" and not stale
    with pytest.raises(LockedError):
        b.acquire("shared", refresh=False)
    world.now += 300
    assert b.locks()[0][1]
    b.acquire("exclusive", refresh=False).release()
    assert not backend.exists("locks/deadbeef")


def test_refresher_thread_runs(backend: LocalBackend) -> None:
    import time

    mgr = LockManager(backend, LockContext(host="h", pid=1, lease=300.0, is_alive=lambda p: True))
    lock = mgr.acquire("shared", refresh=False)
    first = lock.info.expires
    lock.start_refresher(interval=0.01)
    deadline = time.monotonic() + 10
    while lock.info.expires == first and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    assert lock.info.expires > first
    assert not backend.exists(lock.key)


def test_pid_alive() -> None:
    import os

    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    assert not pid_alive(2**22 + 12345)  # above pid_max on Linux


# -- shared lockers wait for an exclusive holder (FORMAT.md 15, rule 1) -------------------


def waiting_manager(world: World, backend: LocalBackend, pid: int, wait: float) -> LockManager:
    mgr = world.manager(backend, pid)
    mgr.ctx.wait = wait
    return mgr


def test_shared_locker_waits_until_the_exclusive_holder_leaves(
    world: World, backend: LocalBackend, caplog: pytest.LogCaptureFixture
) -> None:
    gc = world.manager(backend, 1, host="h2").acquire("exclusive", refresh=False)
    naps: list[float] = []

    def sleep(s: float) -> None:  # gc finishes during the writer's third nap
        naps.append(s)
        world.now += s
        if len(naps) == 3:
            gc.release()

    writer = waiting_manager(world, backend, 2, wait=120)
    writer.ctx.sleep = sleep
    start = world.now
    with caplog.at_level("WARNING", logger="vmarchive.store.locking"):
        lock = writer.acquire("shared", refresh=False)
    assert len(naps) == 3 and naps == sorted(naps)  # backoff grows
    assert [r.getMessage() for r in caplog.records] == [
        "repository is locked (exclusive) by pid 1 on h2; waiting up to 120 s"
    ]  # said once, so a command that seems to hang explains itself
    assert world.now - start < 120  # got in before the wait ended, not by staleness
    lock.release()
    # Negative control: without a wait the same situation is refused at once.
    gc = world.manager(backend, 1, host="h2").acquire("exclusive", refresh=False)
    naps.clear()
    impatient = waiting_manager(world, backend, 3, wait=0)
    impatient.ctx.sleep = sleep
    caplog.clear()
    with pytest.raises(LockedError, match=r"locked \(exclusive\) by pid 1 on h2"):
        impatient.acquire("shared", refresh=False)
    assert naps == [] and caplog.records == []
    assert [k.key for k in backend.list("locks/")] == [gc.key]


def test_wait_is_bounded_and_says_so(world: World, backend: LocalBackend) -> None:
    gc = world.manager(backend, 1, host="h2").acquire("exclusive", refresh=False)

    def sleep(s: float) -> None:  # a live gc: it keeps its lease fresh
        world.now += s
        gc.refresh()

    writer = waiting_manager(world, backend, 2, wait=100)
    writer.ctx.sleep = sleep
    start = world.now
    with pytest.raises(LockedError, match=r"gave up after waiting 100 s \(VMARCHIVE_LOCK_WAIT\)"):
        writer.acquire("shared", refresh=False)
    assert 100 <= world.now - start < 106
    assert [k.key for k in backend.list("locks/")] == [gc.key]  # ours withdrawn


def test_exclusive_lockers_and_own_locks_are_not_waited_for(
    world: World, backend: LocalBackend
) -> None:
    naps: list[float] = []
    mgr = waiting_manager(world, backend, 1, wait=100)
    mgr.ctx.sleep = naps.append
    held = world.manager(backend, 2, host="h2").acquire("shared", refresh=False)
    with pytest.raises(LockedError, match="shared"):
        mgr.acquire("exclusive", refresh=False)  # gc does not queue behind writers
    held.release()
    own = mgr.acquire("exclusive", refresh=False)
    with pytest.raises(LockedError, match=r"\(this process\)"):
        mgr.acquire("shared", refresh=False)  # waiting for ourselves would only stall
    assert naps == []
    own.release()
    mgr.acquire("shared", refresh=False).release()  # control: free again, no wait needed


def test_default_wait_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WAIT_ENV, raising=False)
    assert LockContext.default().wait == default_wait() == DEFAULT_LEASE
    monkeypatch.setenv(WAIT_ENV, "7.5")
    assert LockContext.default().wait == 7.5
    monkeypatch.setenv(WAIT_ENV, "soon")
    assert default_wait() == DEFAULT_LEASE


def test_writer_waits_for_gc_in_another_process(tmp_path: pathlib.Path) -> None:
    from storehelpers import make_repo, read_archive, write_archive

    from vmarchive.store import Repository

    make_repo(tmp_path / "r")
    alive = {1, 2}
    gc_ctx = LockContext(host="h2", pid=1, is_alive=alive.__contains__)
    gc_lock = Repository.open(str(tmp_path / "r"), lock_context=gc_ctx).lock("exclusive")
    naps: list[float] = []

    def sleep(s: float) -> None:
        naps.append(s)
        gc_lock.release()  # gc ends while the writer waits

    ctx = LockContext(host="h1", pid=2, is_alive=alive.__contains__, sleep=sleep, wait=60)
    repo = Repository.open(str(tmp_path / "r"), lock_context=ctx)
    aid = write_archive(repo, {"s": b"x" * 5000})
    assert naps and read_archive(repo, aid) == {"s": b"x" * 5000}
    # Negative control: the same writer with no wait fails while gc holds the lock.
    gc_lock = Repository.open(str(tmp_path / "r"), lock_context=gc_ctx).lock("exclusive")
    ctx.wait = 0
    naps.clear()
    with pytest.raises(LockedError, match="exclusive"):
        write_archive(repo, {"s": b"y" * 5000})
    assert naps == []
    gc_lock.release()


@pytest.mark.parametrize("wait", ["120", "0"])
def test_writer_process_waits_while_gc_holds_the_repository(
    tmp_path: pathlib.Path, wait: str
) -> None:
    """Real processes: a writer started while another process holds the exclusive lock
    says it waits, and publishes once the lock is gone; with no wait (the negative
    control) it fails at once with one LockedError naming the holder."""
    import os
    import subprocess
    import sys

    from storehelpers import make_repo

    from vmarchive.store import Repository

    here = pathlib.Path(__file__).resolve().parent
    make_repo(tmp_path / "r")
    gc_lock = Repository.open(str(tmp_path / "r")).lock("exclusive")
    env = dict(os.environ, PYTHONPATH=f"{here.parents[1]}{os.pathsep}{here}")
    env["VMARCHIVE_LOCK_WAIT"] = wait
    env.pop("VMARCHIVE_CRASH_AT", None)
    writer = subprocess.Popen(
        [sys.executable, str(here / "crash_writer.py"), str(tmp_path / "r"), "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stderr is not None
        first = writer.stderr.readline()  # blocks until the writer reports (or dies)
        if wait == "0":
            out, err = writer.communicate(timeout=120)
            assert writer.returncode != 0 and out == ""
            assert f"locked (exclusive) by pid {os.getpid()}" in first + err
        else:
            assert f"waiting up to {wait} s" in first and str(os.getpid()) in first
            gc_lock.release()  # gc finishes
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, err
            ids = {a.id for a in Repository.open(str(tmp_path / "r")).list_archives()}
            assert ids == {out.strip()}
    finally:
        gc_lock.release()
        if writer.poll() is None:
            writer.kill()
            writer.wait()
