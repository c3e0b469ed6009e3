"""libvirt connections and domains (hypervisor layer).

This is the boundary to libvirt: every ``libvirt.libvirtError`` raised below is translated
here into a :class:`vmarchive.errors.HypervisorError` subclass with structured fields
(``uri``, ``domain``, ``libvirt_code``, ``libvirt_message``).  Callers above this layer never
see libvirt objects except through :attr:`Domain.raw` / :attr:`Connection.raw`, which other
modules of this package use.

Typical use::

    with Connection.open("qemu:///system") as conn:
        dom = conn.lookup("guest1")
        xml = dom.xml(migratable=True)
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import uuid as uuid_mod
from collections.abc import Iterator
from types import TracebackType
from typing import Any, NoReturn

import libvirt
import msgspec

from vmarchive.errors import (
    ConnectionFailedError,
    DomainNotFoundError,
    HypervisorError,
)
from vmarchive.hypervisor import DEFAULT_URI as DEFAULT_URI  # its home before; still named here

log = logging.getLogger(__name__)


def _silent_error_handler(_ctx: object, _err: object) -> None:
    """libvirt prints every error on stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_silent_error_handler, None)

_loop_lock = threading.Lock()
_loop_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event loop and run it in a daemon thread (once per process).

    Must run before a connection is opened for that connection to deliver events; the
    connection code calls it, so callers rarely need to.
    """
    global _loop_thread
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:  # pragma: no cover - keep the loop alive
                    log.exception("libvirt event loop iteration failed")

        _loop_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _loop_thread.start()


def _fields(e: libvirt.libvirtError) -> dict[str, Any]:
    return {"libvirt_code": e.get_error_code(), "libvirt_message": e.get_error_message()}


def raise_libvirt(
    e: libvirt.libvirtError, what: str, *, domain: str | None = None, uri: str | None = None
) -> NoReturn:
    """Raise the vmarchive error matching libvirt error ``e`` (chained ``from e``).

    Raises:
        DomainNotFoundError: libvirt says the domain does not exist.
        HypervisorError: any other libvirt failure.
    """
    code = e.get_error_code()
    detail = e.get_error_message() or str(e)
    fields = _fields(e)
    if domain is not None:
        fields["domain"] = domain
    if uri is not None:
        fields["uri"] = uri
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        name = domain or "?"
        raise DomainNotFoundError(f"domain {name!r} not found", **fields) from e
    raise HypervisorError(f"{what}: {detail}", **fields) from e


@contextlib.contextmanager
def libvirt_errors(
    what: str, *, domain: str | None = None, uri: str | None = None
) -> Iterator[None]:
    """Translate libvirt errors raised in the ``with`` body (see :func:`raise_libvirt`)."""
    try:
        yield
    except libvirt.libvirtError as e:
        raise_libvirt(e, what, domain=domain, uri=uri)


class DomainState(enum.Enum):
    """libvirt's domain state, by name."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @property
    def is_active(self) -> bool:
        """True when a QEMU process exists (the guest runs or is paused)."""
        return self not in (DomainState.SHUTOFF, DomainState.CRASHED, DomainState.NOSTATE)


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: DomainState.NOSTATE,
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.BLOCKED,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PMSUSPENDED,
}


class Versions(msgspec.Struct, frozen=True):
    """Versions as dotted strings ("9.0.0"); ``qemu`` is empty when no hypervisor answers."""

    libvirt: str
    qemu: str
    hypervisor_type: str


def version_string(v: int) -> str:
    """libvirt's integer version (major*1e6 + minor*1e3 + micro) as "major.minor.micro"."""
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"


class Domain:
    """A libvirt domain (running or not) of an open :class:`Connection`."""

    def __init__(self, conn: Connection, raw: Any) -> None:
        self.connection = conn
        #: The ``libvirt.virDomain`` (for this package's modules only).
        self.raw: Any = raw
        self.name: str = str(raw.name())
        self.uuid: str = str(raw.UUIDString())

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, {self.uuid})"

    def errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Context manager translating libvirt errors about this domain."""
        return libvirt_errors(what, domain=self.name, uri=self.connection.uri)

    def state(self) -> DomainState:
        """Current state.

        Raises:
            DomainNotFoundError: the domain vanished.
            HypervisorError: libvirt failed.
        """
        with self.errors("cannot read domain state"):
            st, _reason = self.raw.state()
        return _STATES.get(st, DomainState.NOSTATE)

    def is_active(self) -> bool:
        """True when the domain has a QEMU process (raises like :meth:`state`)."""
        return self.state().is_active

    def xml(self, *, migratable: bool = False, inactive: bool = False) -> str:
        """The domain XML: live by default; ``migratable`` gives the form libvirt uses for
        migration and save images (VIR_DOMAIN_XML_MIGRATABLE | SECURE); ``inactive`` the
        persistent definition.

        Raises:
            DomainNotFoundError, HypervisorError.
        """
        flags = 0
        if migratable:
            flags |= libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_SECURE
        if inactive:
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        with self.errors("cannot read domain XML"):
            return str(self.raw.XMLDesc(flags))


class Connection:
    """An open libvirt connection.  Use as a context manager or call :meth:`close`."""

    def __init__(self, uri: str, raw: Any) -> None:
        self.uri = uri
        #: The ``libvirt.virConnect`` (for this package's modules only).
        self.raw: Any = raw

    @classmethod
    def open(cls, uri: str = DEFAULT_URI) -> Connection:
        """Open a read-write connection to ``uri`` (starts the event loop first).

        Raises:
            ConnectionFailedError: the daemon does not answer or refuses the connection.
        """
        ensure_event_loop()
        try:
            raw = libvirt.open(uri)
        except libvirt.libvirtError as e:
            detail = (e.get_error_message() or str(e)).splitlines()[0]
            raise ConnectionFailedError(
                f"cannot connect to {uri}: {detail}", uri=uri, **_fields(e)
            ) from e
        if raw is None:  # old bindings returned None instead of raising
            raise ConnectionFailedError(f"cannot connect to {uri}", uri=uri)
        return cls(uri, raw)

    def close(self) -> None:
        """Close the connection (idempotent; errors at close are logged, not raised)."""
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                raw.close()
            except libvirt.libvirtError:
                log.debug("closing %s failed", self.uri, exc_info=True)

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _conn(self) -> Any:
        if self.raw is None:
            raise HypervisorError("libvirt connection is closed", uri=self.uri)
        return self.raw

    def lookup(self, name_or_uuid: str) -> Domain:
        """Find a domain by name, or by UUID when the string is one.

        Raises:
            DomainNotFoundError: no such domain.
            HypervisorError: libvirt failed.
        """
        conn = self._conn()
        try:
            try:
                uuid_mod.UUID(name_or_uuid)
            except ValueError:
                raw = conn.lookupByName(name_or_uuid)
            else:
                try:
                    raw = conn.lookupByUUIDString(name_or_uuid)
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    raw = conn.lookupByName(name_or_uuid)
        except libvirt.libvirtError as e:
            raise_libvirt(e, "domain lookup failed", domain=name_or_uuid, uri=self.uri)
        return Domain(self, raw)

    def list_domains(self, *, active_only: bool = False) -> list[Domain]:
        """All domains (persistent and transient).

        Raises:
            HypervisorError: libvirt failed.
        """
        flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE if active_only else 0
        with libvirt_errors("cannot list domains", uri=self.uri):
            return [Domain(self, d) for d in self._conn().listAllDomains(flags)]

    def versions(self) -> Versions:
        """libvirt daemon and hypervisor (QEMU) versions.

        Raises:
            HypervisorError: libvirt failed.
        """
        conn = self._conn()
        with libvirt_errors("cannot read versions", uri=self.uri):
            lib = version_string(int(conn.getLibVersion()))
            hv_type = str(conn.getType())
            try:
                qemu = version_string(int(conn.getVersion()))
            except libvirt.libvirtError:
                qemu = ""
        return Versions(libvirt=lib, qemu=qemu, hypervisor_type=hv_type)

    def capabilities_xml(self) -> str:
        """The host capabilities XML (raises HypervisorError)."""
        with libvirt_errors("cannot read capabilities", uri=self.uri):
            return str(self._conn().getCapabilities())

    def domain_capabilities_xml(
        self, *, virttype: str = "kvm", arch: str | None = None, emulator: str | None = None
    ) -> str:
        """libvirt's domain capabilities for ``virttype`` ("kvm" or "qemu").

        Raises:
            HypervisorError: libvirt refuses (e.g. the virt type is not supported at all).
        """
        with libvirt_errors(f"cannot read domain capabilities for {virttype}", uri=self.uri):
            return str(self._conn().getDomainCapabilities(emulator, arch, None, virttype, 0))
