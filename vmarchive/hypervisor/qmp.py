"""QMP commands and events for a libvirt domain (hypervisor layer).

libvirt owns the QEMU monitor socket, so commands go through
``libvirt_qemu.qemuMonitorCommand`` (or ``qemuMonitorCommandWithFiles`` when file
descriptors must travel with the command, as for ``getfd``/``add-fd`` before a
``migrate`` to ``fd:NAME``).  A command is one JSON object (``execute``, ``arguments``)
and a reply one JSON object, which ``json`` reads and writes; an error reply is read with
the qemu.qmp library's types (:class:`qemu.qmp.models.ErrorResponse`,
:class:`qemu.qmp.ExecuteError`) and becomes a :class:`vmarchive.errors.QMPCommandError`
(fields ``command``, ``error_class``, ``desc``, ``domain``) chained from the qemu.qmp
``ExecuteError``.  qemu.qmp is imported only then: the package imports asyncio (its
client is asynchronous), 23 ms of every command's start-up here for two ``json`` calls.

Events come from ``libvirt_qemu.qemuMonitorEventRegister`` on libvirt's event loop
thread; :class:`EventSubscription` queues them with QEMU's own timestamps, so the guest
pause can be measured exactly from the ``STOP`` and ``RESUME`` events.

Note: libvirt marks a domain "tainted: custom-monitor" after the first command through
this channel; that is expected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import libvirt
import libvirt_qemu
import msgspec

from vmarchive.errors import HypervisorError, QMPCommandError
from vmarchive.hypervisor.connection import Domain

log = logging.getLogger(__name__)


class QMP:
    """A QMP channel to one running domain, through libvirt.

    Thread-safe in the sense libvirt is: concurrent commands are serialised by libvirt.
    """

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        files: Sequence[int] = (),
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        ``files`` are passed to QEMU with the command (SCM_RIGHTS through libvirt); the
        caller keeps ownership of its descriptors.

        Raises:
            QMPCommandError: QEMU answered with an error (fields: command, error_class, desc).
            DomainNotFoundError: the domain vanished.
            HypervisorError: libvirt failed (domain not running, monitor gone, bad reply).
        """
        msg: dict[str, object] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        text = json.dumps(msg, separators=(",", ":"))
        with self.domain.errors(f"QMP {command} failed"):
            if files:
                out, returned = libvirt_qemu.qemuMonitorCommandWithFiles(
                    self.domain.raw, text, list(files), 0
                )
                for f in returned or ():  # QEMU does not send fds back for our commands
                    with contextlib.suppress(Exception):
                        f.close()
            else:
                out = libvirt_qemu.qemuMonitorCommand(self.domain.raw, text, 0)
        return self._parse_reply(command, msg, str(out))

    def _parse_reply(self, command: str, sent: dict[str, object], out: str) -> Any:
        try:
            reply = json.loads(out)
            if not isinstance(reply, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise HypervisorError(
                f"QMP {command}: unparseable reply from QEMU",
                domain=self.domain.name,
                command=command,
                reply=out[:200],
            ) from e
        if "error" in reply:
            from qemu.qmp import ExecuteError, Message
            from qemu.qmp.models import ErrorResponse

            try:
                answer = Message(reply)
                err = ExecuteError(ErrorResponse(answer), Message(sent), answer)
            except (KeyError, TypeError) as e:
                raise HypervisorError(
                    f"QMP {command}: malformed error reply",
                    domain=self.domain.name,
                    command=command,
                    reply=out[:200],
                ) from e
            raise QMPCommandError(
                f"QMP {command} failed on {self.domain.name}: {err.error_class}: {err}",
                domain=self.domain.name,
                command=command,
                error_class=err.error_class,
                desc=str(err),
            ) from err
        if "return" not in reply:
            raise HypervisorError(
                f"QMP {command}: reply has neither return nor error",
                domain=self.domain.name,
                command=command,
                reply=out[:200],
            )
        return reply["return"]

    def hmp(self, command_line: str) -> str:
        """Run a human monitor command (``info mtree -f``...) and return its text.

        Raises: like :meth:`execute`.
        """
        return str(self.execute("human-monitor-command", {"command-line": command_line}))

    def getfd(self, name: str, fd: int) -> None:
        """Hand ``fd`` to QEMU under ``name`` (for ``migrate`` uri ``fd:NAME``).

        Raises: like :meth:`execute`.
        """
        self.execute("getfd", {"fdname": name}, files=[fd])

    def closefd(self, name: str) -> None:
        """Close QEMU's copy of the fd ``name``.  Raises: like :meth:`execute`."""
        self.execute("closefd", {"fdname": name})

    @contextlib.contextmanager
    def passed_fd(self, name: str, fd: int, *, consumed: bool = False) -> Iterator[str]:
        """Pass ``fd`` as ``name`` for the ``with`` body; QEMU's copy is closed afterwards.

        A command such as ``migrate fd:NAME`` consumes the named fd; the closing then finds
        nothing to close, which is fine and ignored.  ``consumed``: the body's command
        takes the fd whenever it succeeds (QEMU removes a named fd it uses from the
        monitor's list: ``nbd-server-start`` with an ``fd`` address does, checked on QEMU
        7.2), so it is closed only when the body failed (one round trip less).
        """
        self.getfd(name, fd)
        try:
            yield name
        except BaseException:
            self._close_passed(name)
            raise
        if not consumed:
            self._close_passed(name)

    def _close_passed(self, name: str) -> None:
        try:
            self.closefd(name)
        except QMPCommandError:
            pass  # consumed by the command that used it
        except HypervisorError:
            log.debug("closefd %s failed", name, exc_info=True)

    def add_fd(self, fd: int, *, fdset_id: int | None = None, opaque: str | None = None) -> int:
        """Add ``fd`` to an fd set (``add-fd``); returns the fdset id (for ``/dev/fdset/N``).

        Raises: like :meth:`execute`.
        """
        args: dict[str, object] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        ret = self.execute("add-fd", args, files=[fd])
        return int(ret["fdset-id"])

    def remove_fd(self, fdset_id: int) -> None:
        """Remove a whole fd set.  Raises: like :meth:`execute`."""
        self.execute("remove-fd", {"fdset-id": fdset_id})

    def subscribe(self, names: Collection[str] | None = None) -> EventSubscription:
        """An :class:`EventSubscription` for this domain (enter it to register)."""
        return EventSubscription(self.domain, names)


class QMPEvent(msgspec.Struct, frozen=True):
    """One QMP event with QEMU's timestamp (when QEMU emitted it, host realtime clock)."""

    name: str
    seconds: int
    microseconds: int
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def timestamp_us(self) -> int:
        """QEMU's timestamp in microseconds since the epoch."""
        return self.seconds * 1_000_000 + self.microseconds

    @property
    def timestamp(self) -> float:
        """QEMU's timestamp in seconds since the epoch."""
        return self.timestamp_us / 1e6


def pause_us(events: Sequence[QMPEvent]) -> int | None:
    """Total time the vCPUs were stopped, from ``STOP``/``RESUME`` pairs, in microseconds.

    Pairs are matched in order; a ``STOP`` without a later ``RESUME`` is not counted.
    Returns ``None`` when no complete pair was seen.
    """
    total = 0
    seen = False
    stopped_at: int | None = None
    for ev in events:
        if ev.name == "STOP" and stopped_at is None:
            stopped_at = ev.timestamp_us
        elif ev.name == "RESUME" and stopped_at is not None:
            total += ev.timestamp_us - stopped_at
            stopped_at = None
            seen = True
    return total if seen else None


class EventSubscription:
    """QMP events of one domain, queued from libvirt's event thread.

    Registration happens on ``__enter__`` and is undone on ``__exit__`` whatever happens.
    ``names`` restricts the events kept (None = all).  Every event kept is also appended to
    :attr:`history`, so a caller can compute the pause afterwards with :func:`pause_us`.
    """

    def __init__(self, domain: Domain, names: Collection[str] | None = None) -> None:
        self.domain = domain
        self.names = frozenset(names) if names is not None else None
        self.history: list[QMPEvent] = []
        self._queue: queue.Queue[QMPEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._callback_id: int | None = None

    def _on_event(
        self,
        _conn: Any,
        _dom: Any,
        event: str,
        seconds: int,
        micros: int,
        details: str | None,
        _opaque: Any,
    ) -> None:
        # Runs on libvirt's event thread: never raise from here.
        try:
            if self.names is not None and event not in self.names:
                return
            data: dict[str, Any] = {}
            if details:
                try:
                    loaded = json.loads(details)
                    if isinstance(loaded, dict):
                        data = loaded
                except ValueError:
                    data = {"raw": details}
            ev = QMPEvent(event, int(seconds), int(micros), data)
            with self._lock:
                self.history.append(ev)
            self._queue.put(ev)
        except Exception:  # pragma: no cover - defensive
            log.exception("QMP event callback failed")

    def register(self) -> None:
        """Start receiving events (idempotent).

        Raises:
            DomainNotFoundError, HypervisorError: libvirt refused the registration.
        """
        if self._callback_id is not None:
            return
        conn = self.domain.connection.raw
        with self.domain.errors("cannot register for QMP events"):
            self._callback_id = int(
                libvirt_qemu.qemuMonitorEventRegister(
                    conn, self.domain.raw, None, self._on_event, None, 0
                )
            )

    def unregister(self) -> None:
        """Stop receiving events (idempotent; a failure is logged, never raised)."""
        cb, self._callback_id = self._callback_id, None
        if cb is None:
            return
        try:
            libvirt_qemu.qemuMonitorEventDeregister(self.domain.connection.raw, cb)
        except libvirt.libvirtError:
            log.debug("deregistering QMP event callback %s failed", cb, exc_info=True)

    def __enter__(self) -> EventSubscription:
        self.register()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unregister()

    def get(self, timeout: float | None = None) -> QMPEvent | None:
        """The next queued event, or None after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[QMPEvent]:
        """All events queued now, without waiting."""
        out: list[QMPEvent] = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def wait_for(
        self,
        name: str,
        timeout: float,
        predicate: Callable[[QMPEvent], bool] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> QMPEvent:
        """Wait for the next event called ``name`` (matching ``predicate``); earlier
        other events are consumed (they stay in :attr:`history`).

        Raises:
            HypervisorError: no such event within ``timeout`` seconds.
        """
        deadline = clock() + timeout
        while True:
            left = deadline - clock()
            if left <= 0:
                raise HypervisorError(
                    f"no QMP event {name} from {self.domain.name} within {timeout:g} s",
                    domain=self.domain.name,
                    event=name,
                )
            ev = self.get(left)
            if ev is not None and ev.name == name and (predicate is None or predicate(ev)):
                return ev
