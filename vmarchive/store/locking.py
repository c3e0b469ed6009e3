"""Repository locks (store layer): shared for writers, exclusive for gc/prune/forget.

Object stores have no atomic "create if no other lock exists", so a lock is taken
optimistically (the scheme restic uses): publish our own lock object
``locks/<random id>``, then list ``locks/``; if a live conflicting lock is there, remove
ours and fail (or retry).  Two racing lockers may both back off; they can never both
win, because each one lists only after its own lock is published.

A lock is *stale* when its lease has expired (holders refresh it every ``lease / 3``)
or when it was taken on this host by a process that no longer exists.  Stale locks are
ignored, and exclusive lockers delete them.  A holder whose lock has vanished (someone
judged it stale) learns it at :meth:`Lock.check`, which the writer calls before it
publishes a manifest, so it never commits without the protection it believed it had.

Shared lockers (writers, restore, forget, verify) *wait* for an exclusive holder (gc,
prune) for up to ``LockContext.wait`` seconds, one lease by default: a live gc usually
ends within it, and a dead gc's lock is stale by then, so a capture scheduled while gc runs
does not fail.  Exclusive lockers do not wait (a writer may run for hours).  A process never
waits for a lock it holds itself: that would only delay the same :class:`LockedError`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from vmarchive.errors import FormatError, LockedError, UnsupportedVersionError
from vmarchive.format import constants as C
from vmarchive.format.lock import LockInfo, decode_lock, encode_lock, is_stale
from vmarchive.store.backend import Backend, ObjectNotFoundError

log = logging.getLogger(__name__)

LockKind = Literal["shared", "exclusive"]

DEFAULT_LEASE = C.DEFAULT_LOCK_LEASE
#: Environment variable: seconds a shared locker waits for an exclusive lock (default:
#: one lease, so even the lock of a gc that died is stale before the wait ends).
WAIT_ENV = "VMARCHIVE_LOCK_WAIT"


def default_wait(lease: float = DEFAULT_LEASE) -> float:
    """``VMARCHIVE_LOCK_WAIT`` seconds when set (and a number >= 0), else ``lease``."""
    value = os.environ.get(WAIT_ENV)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            log.warning("ignoring %s=%r (not a number of seconds)", WAIT_ENV, value)
    return lease


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class LockContext:
    """Who we are and what time it is; injectable so tests are deterministic."""

    host: str
    pid: int
    clock: Callable[[], float] = time.time
    lease: float = DEFAULT_LEASE
    is_alive: Callable[[int], bool] = pid_alive
    sleep: Callable[[float], None] = time.sleep
    #: Seconds a shared locker waits for an exclusive holder before LockedError.
    wait: float = 0.0

    @classmethod
    def default(cls) -> LockContext:
        return cls(host=socket.gethostname(), pid=os.getpid(), wait=default_wait())


class Lock:
    """A held lock; release it (or use it as a context manager)."""

    def __init__(self, backend: Backend, ctx: LockContext, info: LockInfo) -> None:
        self._backend = backend
        self._ctx = ctx
        self.info = info
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None
        self._released = False
        self._mutex = threading.Lock()

    @property
    def key(self) -> str:
        return f"locks/{self.info.id}"

    def refresh(self) -> None:
        """Extend the lease. Raises :class:`LockedError` if our lock was removed."""
        with self._mutex:
            if self._released:
                return
            if self._ctx.clock() > self.info.expires:
                # Our lease lapsed (process frozen?): gc may have judged us stale and
                # deleted chunks we deduplicated against (FORMAT.md 15, rule 4).
                raise LockedError(
                    f"our {self.info.kind} lock {self.info.id} expired before it was refreshed",
                    lock=self.info.id,
                )
            if not self._backend.exists(self.key):
                raise LockedError(
                    f"our {self.info.kind} lock {self.info.id} was removed (judged stale?)",
                    lock=self.info.id,
                )
            now = self._ctx.clock()
            info = LockInfo(
                kind=self.info.kind,
                host=self.info.host,
                pid=self.info.pid,
                created=self.info.created,
                expires=now + self._ctx.lease,
                id=self.info.id,
            )
            self._backend.put(self.key, encode_lock(info))
            self.info = info

    def start_refresher(self, interval: float | None = None) -> None:
        """Refresh the lease in a daemon thread until :meth:`release`."""
        if self._thread is not None:
            return
        period = (
            interval if interval is not None else min(C.DEFAULT_LOCK_REFRESH, self._ctx.lease / 3)
        )

        def run() -> None:
            while not self._stop.wait(period):
                try:
                    self.refresh()
                except Exception as e:
                    log.warning("cannot refresh lock %s: %s", self.info.id, e)
                    self._error = e
                    return

        self._thread = threading.Thread(target=run, name="vmarchive-lock-refresh", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise :class:`LockedError` unless the lock is still ours and unexpired."""
        if self._error is not None:
            raise LockedError(f"lost lock {self.info.id}: {self._error}") from self._error
        self.refresh()

    def release(self) -> None:
        """Stop refreshing and delete the lock object (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._released:
                return
            self._released = True
        self._backend.delete(self.key)

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockManager:
    """Takes locks in one repository's ``locks/``."""

    def __init__(self, backend: Backend, ctx: LockContext | None = None) -> None:
        self._backend = backend
        self.ctx = ctx or LockContext.default()

    def is_stale(self, info: LockInfo) -> bool:
        """Whether ``info`` no longer protects anything."""
        return is_stale(info, self.ctx.clock(), self.ctx.host, self.ctx.is_alive)

    def locks(self) -> list[tuple[LockInfo, bool]]:
        """Every readable lock and whether it is stale. Raises :class:`BackendError`."""
        out: list[tuple[LockInfo, bool]] = []
        for obj in self._backend.list("locks/"):
            try:
                info = decode_lock(self._backend.get(obj.key))
            except ObjectNotFoundError:
                continue  # released while we listed
            except (FormatError, UnsupportedVersionError):
                # Unreadable: count it live until it is a lease old, then stale.
                log.warning("unreadable lock object %s", obj.key)
                lock_id = obj.key.rsplit("/", 1)[1]
                info = LockInfo(
                    kind="exclusive",
                    host="?",
                    pid=0,
                    created=obj.mtime,
                    expires=obj.mtime + self.ctx.lease,
                    id=lock_id,
                )
            out.append((info, self.is_stale(info)))
        return out

    def acquire(self, kind: LockKind, *, wait: float | None = None, refresh: bool = True) -> Lock:
        """Take a lock of ``kind``, retrying with backoff for up to ``wait`` seconds
        (``None``: ``ctx.wait`` for a shared lock, no wait for an exclusive one).

        Raises :class:`LockedError` naming the holder if a live conflicting lock
        remains, :class:`BackendError` on storage failure.
        """
        if wait is None:
            wait = self.ctx.wait if kind == "shared" else 0.0
        start = self.ctx.clock()
        deadline = start + wait
        delay = 0.2
        waiting_for: str | None = None
        while True:
            lock = self._try(kind)
            if isinstance(lock, Lock):
                if refresh:
                    lock.start_refresher()
                return lock
            h = lock
            ours = h.host == self.ctx.host and h.pid == self.ctx.pid
            now = self.ctx.clock()
            if now >= deadline or ours:
                waited = (
                    f"; gave up after waiting {now - start:.0f} s ({WAIT_ENV})"
                    if waiting_for is not None
                    else ""
                )
                raise LockedError(
                    f"repository is locked ({h.kind}) by pid {h.pid} on {h.host} "
                    f"since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(h.created))}"
                    + (" (this process)" if ours else "")
                    + waited,
                    holder=h.id,
                    host=h.host,
                    pid=h.pid,
                )
            if waiting_for != h.id:
                # A warning: a user whose command seems to hang should learn why.
                waiting_for = h.id
                log.warning(
                    "repository is locked (%s) by pid %d on %s; waiting up to %.0f s",
                    h.kind,
                    h.pid,
                    h.host,
                    deadline - now,
                )
            self.ctx.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(delay * 2, 5.0)

    def _try(self, kind: LockKind) -> Lock | LockInfo:
        now = self.ctx.clock()
        info = LockInfo(
            kind=kind,
            host=self.ctx.host,
            pid=self.ctx.pid,
            created=now,
            expires=now + self.ctx.lease,
            id=secrets.token_hex(16),
        )
        lock = Lock(self._backend, self.ctx, info)
        self._backend.put(lock.key, encode_lock(info), create_only=True)
        try:
            for other, stale in self.locks():
                if other.id == info.id:
                    continue
                if stale:
                    if kind == "exclusive":
                        log.info(
                            "removing stale lock %s (pid %d on %s)", other.id, other.pid, other.host
                        )
                        self._backend.delete(f"locks/{other.id}")
                    continue
                if kind == "exclusive" or other.kind == "exclusive":
                    lock.release()
                    return other
        except BaseException:
            lock.release()
            raise
        return lock
