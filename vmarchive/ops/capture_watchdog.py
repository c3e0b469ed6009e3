"""A helper process that cleans up after a capture whose process died (ops layer).

``kill -9`` of vmarchive at the wrong moment would otherwise leave the guest stopped: in
switchover mode QEMU waits at ``pre-switchover`` (vCPUs stopped) for a ``migrate-continue``
that never comes, and after a completed migration for a ``cont``.  So each live capture
starts this watchdog with a pipe on its stdin.  The pipe reaches EOF when the capture
process ends, however it ends; if the capture's marker file is still there then, the
watchdog takes the per-domain lock (free once the capture process is gone) and runs the
same cleanup as the capture's own ``finally`` (:func:`clean_domain`).

It also holds a copy of the read end of the migration channel (passed over the socket
with SCM_RIGHTS) and drains it after the capture died.  That matters in snapshot mode:
a failing background snapshot in QEMU 7.2 can deadlock QEMU (its main loop faults on a
write-protected guest page while the snapshot thread, bailing out, waits for the main
loop's lock), so a background snapshot must always be allowed to finish.

Whatever it does is appended, step by step and with the time, to ``STATE_DIR/UUID.watchdog.log``
(:func:`log_path`): the capture that started it is gone, so this is the only account of why a
guest was, or was not, resumed.  A watchdog with nothing to do writes nothing.

Run as ``python -m vmarchive.ops.capture_watchdog`` with one end of a unix socket pair on
stdin; the first line sent over it names the domain (:meth:`Watchdog.arm`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Watchdog:
    """The parent's handle: :meth:`arm` it with the domain (:meth:`start` does both),
    :meth:`hold_stream` / :meth:`drop_stream` around a migration, :meth:`release` after
    the capture ended.

    The process is started unarmed and told its domain over the socket, so it can be
    started before the capture knows the domain (:func:`prestart`).  One that is never
    armed does nothing and exits when the socket closes.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._marker: Path | None = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", __name__],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                stderr=None,
                start_new_session=True,  # a Ctrl-C to the capture must not kill it too
                close_fds=True,
            )
            self._sock = ours
        except OSError as e:  # pragma: no cover - no python to run?
            log.warning("cannot start the capture watchdog: %s", e)
            ours.close()
        finally:
            theirs.close()

    @classmethod
    def start(cls, state_dir: Path, uuid: str, name: str, uri: str) -> Watchdog:
        """A watchdog armed for this domain: the one :func:`prestart` started if it is
        still there, else a new one."""
        global _spare
        wd, _spare = _spare, None
        if wd is not None and wd.alive() and wd.arm(state_dir, uuid, name, uri):
            return wd
        if wd is not None:
            wd.release()
        wd = cls()
        wd.arm(state_dir, uuid, name, uri)
        return wd

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def arm(self, state_dir: Path, uuid: str, name: str, uri: str) -> bool:
        """Tell the watchdog which domain it watches over; False if it could not be told
        (then it has gone: the capture runs without one, as when none could start)."""
        self._marker = marker_path(state_dir, uuid)
        if self._sock is None:
            return False
        line = json.dumps([str(state_dir), uuid, name, uri]) + "\n"  # escapes any newline
        try:
            self._sock.sendall(line.encode())
        except OSError as e:
            log.warning("cannot reach the capture watchdog: %s", e)
            return False
        return True

    def hold_stream(self, fd: int) -> None:
        """Give the watchdog a copy of the migration channel's read end."""
        if self._sock is not None:
            try:
                socket.send_fds(self._sock, [b"h"], [fd])
            except OSError as e:
                log.warning("cannot pass the migration channel to the watchdog: %s", e)

    def drop_stream(self) -> None:
        """The migration is over: the watchdog closes its copy of the channel."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"d")

    def release(self) -> None:
        """Tell the watchdog we are done (idempotent).

        With the capture's marker still there (its own clean-up was incomplete), the
        watchdog cleans up now: waited for (up to 10 s), so the command ends after it.
        Without one it has nothing to do and exits by itself; waiting for that (another
        interpreter's exit, 15-16 ms here) was on every capture's path to its end, so a
        daemon thread reaps it instead.
        """
        proc, self._proc = self._proc, None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if proc is None:
            return
        if self._marker is None or not self._marker.exists():
            threading.Thread(target=proc.wait, name="watchdog-reaper", daemon=True).start()
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.debug("capture watchdog still running (cleaning up)")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 1 << 20):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _watch() -> int:
    """The watchdog's life: told its domain (a line of JSON: a list of four strings), then
    messages -- ``h`` with a descriptor to hold, ``d`` to drop it -- until the capture's end
    of the socket closes.  Never told its domain: nothing to watch over."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    chan = socket.socket(fileno=0)
    held: int | None = None
    head = b""
    armed: list[str] | None = None
    while True:
        msg, fds, _flags, _addr = socket.recv_fds(chan, 4096, 4)
        for fd in fds:
            if held is not None:
                os.close(held)
            held = fd
        if not msg:
            break
        if armed is None:
            head += msg
            if b"\n" not in head:
                continue
            line, msg = head.split(b"\n", 1)
            armed = [str(f) for f in json.loads(line)]
        if msg.endswith(b"d") and held is not None:
            os.close(held)
            held = None
    if armed is None or len(armed) != 4:
        if held is not None:
            _drain(held)
        return 0
    state_dir, uuid, name, uri = Path(armed[0]), *armed[1:]
    _log_to(state_dir, uuid)
    drainer: threading.Thread | None = None
    if held is not None:
        # Keep the migration going to its end: never make a background snapshot fail.
        drainer = threading.Thread(target=_drain, args=(held,), daemon=True)
        drainer.start()
    try:
        return _clean(state_dir, uuid, name, uri)
    finally:
        if drainer is not None:
            drainer.join(3600)


def _clean(state_dir: Path, uuid: str, name: str, uri: str) -> int:
    if not marker_path(state_dir, uuid).exists():
        return 0
    from vmarchive.errors import DomainNotFoundError, LockedError, VmarchiveError
    from vmarchive.hypervisor.connection import Connection
    from vmarchive.hypervisor.qmp import QMP
    from vmarchive.ops.capture_cleanup import Marker, clean_domain, domain_lock

    deadline = time.monotonic() + 120
    while True:
        try:
            with domain_lock(state_dir, uuid, name) as path:
                marker = Marker.load(path)
                if marker is None:
                    return 0
                log.warning("capture of %s ended abnormally; cleaning up", name)
                with Connection.open(uri) as conn:
                    try:
                        dom = conn.lookup(uuid)
                        qmp = QMP(dom) if dom.is_active() else None
                    except DomainNotFoundError:
                        qmp = None  # gone with its QEMU: only our files are left
                    done = clean_domain(qmp, marker)
                    level = logging.INFO if done else logging.WARNING
                    log.log(level, "cleanup of %s %s", name, "done" if done else "incomplete")
                    return 0 if done else 1
        except LockedError:
            # The capture is still finishing (or a new one started and cleans up itself).
            if time.monotonic() > deadline:
                log.info("%s still locked after 120 s: left to whoever holds it", name)
                return 0
            time.sleep(0.05)
        except VmarchiveError as e:
            log.warning("watchdog cleanup of %s failed: %s", name, e)
            return 1


def marker_path(state_dir: Path, uuid: str) -> Path:
    """Where the capture of domain ``uuid`` keeps its marker (:func:`domain_lock
    <vmarchive.ops.capture_cleanup.domain_lock>` yields it).  Defined here, in the module
    that imports nothing of vmarchive at start-up, so the watchdog finds the marker
    without loading libvirt."""
    return state_dir / f"{uuid}.json"


def log_path(state_dir: Path, uuid: str) -> Path:
    """Where a watchdog that acted says what it did, step by step (appended to)."""
    return state_dir / f"{uuid}.watchdog.log"


def _log_to(state_dir: Path, uuid: str) -> None:
    # Warnings to the capture's stderr (the user may still see them); every step, with the
    # time, to a file beside the marker: the capture that started it is gone, so this is
    # the only account of why a guest was (or was not) resumed.  Created only when written.
    err = logging.StreamHandler()
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("vmarchive watchdog: %(message)s"))
    handlers: list[logging.Handler] = [err]
    with contextlib.suppress(OSError):
        f = logging.FileHandler(log_path(state_dir, uuid), delay=True)
        f.setFormatter(logging.Formatter(f"%(asctime)s watchdog {os.getpid()}: %(message)s"))
        handlers.append(f)
    logging.basicConfig(level=logging.INFO, handlers=handlers)


#: The watchdog :func:`prestart` started, for the next :meth:`Watchdog.start` to take.
_spare: Watchdog | None = None


def prestart() -> None:
    """Start a watchdog now, for the next capture to arm (:meth:`Watchdog.start`).

    A capture command calls this first thing, before its imports: the interpreter the
    watchdog is (~30 ms of CPU) then starts while this process loads its modules on one
    core, instead of on the core that libvirtd and QEMU answer the capture's QMP commands
    on just before its instant.  Second captures of the bench guest (512 MiB): the time
    from the command's imports to its ``migrate`` was 49.7 ms with a watchdog started
    there and 39.0 ms without one, and the whole command 317 against 304 ms (medians of 8).
    """
    global _spare
    if _spare is None:
        _spare = Watchdog()


def main() -> int:
    return _watch()


if __name__ == "__main__":
    sys.exit(main())
