"""Shared/exclusive locks, staleness and refresh, with an injected clock and pid table."""

from __future__ import annotations

import pathlib

import pytest

from vmarchive.errors import LockedError
from vmarchive.store.local import LocalBackend
from vmarchive.store.locking import LockContext, LockManager, pid_alive


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
