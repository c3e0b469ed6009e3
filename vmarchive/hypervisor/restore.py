"""libvirt calls a restore needs: target checks, save-image restore, volumes (hypervisor layer).

* :func:`check_target` -- before anything is written: the machine type exists on the
  target's emulator, the target's QEMU is not older than the source's, and the guest's CPU
  definition runs there (``virConnectCompareHypervisorCPU``).
* :func:`restore_image` -- ``virDomainRestoreFlags`` of a save image (a file or a FIFO).
* :func:`find_domain` / :func:`remove_domain` -- what ``--replace`` and cleanup need.
* :class:`Pool` -- storage volumes of a pool on the (possibly remote) target: create,
  upload through a ``virStream`` (sparse: holes are skipped, never sent), delete.  That is
  how disks and the save image reach another host over the one libvirt connection.
* :func:`set_guest_time` -- the guest agent's ``guest-set-time`` through libvirt.

libvirt errors are translated here (see :mod:`.connection`).
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from typing import Any

import libvirt
import msgspec

from vmarchive.errors import (
    HostPreconditionError,
    HypervisorError,
    NotFoundError,
)
from vmarchive.hypervisor.connection import Connection, Domain, libvirt_errors

log = logging.getLogger(__name__)


class TargetCheck(msgspec.Struct, frozen=True):
    """What :func:`check_target` found (for the restore's report)."""

    machine: str | None
    cpu: str  # "identical", "superset", "not checked: ..."
    qemu: str


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return ()


def check_target(
    conn: Connection,
    *,
    arch: str | None,
    machine: str | None,
    virttype: str,
    emulator: str | None,
    cpu_xml: str | None,
    cpu_mode: str | None,
    source_qemu: str | None,
) -> TargetCheck:
    """Check the target can run the archived guest; raises HostPreconditionError if not.

    Raises:
        HostPreconditionError: machine type unknown to the target's emulator, target QEMU
            older than the source (QEMU does not migrate backwards), CPU incompatible.
        HypervisorError: libvirt failed otherwise.
    """
    raw = conn._conn()
    qemu = conn.versions().qemu
    if source_qemu and qemu and _version_tuple(qemu) < _version_tuple(source_qemu):
        raise HostPreconditionError(
            f"the target runs QEMU {qemu}, older than the archive's {source_qemu}: "
            "QEMU cannot load a newer QEMU's migration stream",
            qemu=qemu,
        )
    try:
        raw.getDomainCapabilities(emulator, arch, machine, virttype, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_CONFIG_UNSUPPORTED):
            raise HostPreconditionError(
                f"the target cannot run machine type {machine!r} ({arch}, {virttype}): "
                f"{e.get_error_message()}",
                machine=machine,
            ) from e
        raise HypervisorError(f"cannot read the target's domain capabilities: {e}") from e
    cpu = "not checked: the guest XML has no CPU definition"
    if cpu_xml is not None and cpu_mode == "host-passthrough":
        cpu = "not checked: host-passthrough (the target's own CPU)"
    elif cpu_xml is not None:
        try:
            r = raw.compareHypervisorCPU(
                emulator,
                arch,
                machine,
                virttype,
                cpu_xml,
                libvirt.VIR_CONNECT_COMPARE_CPU_FAIL_INCOMPATIBLE,
            )
        except libvirt.libvirtError as e:
            raise HostPreconditionError(
                f"the target cannot run the guest's CPU: {e.get_error_message()}",
                cpu=cpu_xml,
            ) from e
        if r == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:  # pragma: no cover - flag raises first
            raise HostPreconditionError("the target cannot run the guest's CPU", cpu=cpu_xml)
        cpu = {libvirt.VIR_CPU_COMPARE_IDENTICAL: "identical"}.get(r, "superset")
    return TargetCheck(machine=machine, cpu=cpu, qemu=qemu)


def find_domain(conn: Connection, name: str | None = None, uuid: str | None = None) -> Any:
    """The raw domain named ``name`` (or with ``uuid``), or None."""
    raw = conn._conn()
    try:
        if name is not None:
            return raw.lookupByName(name)
        if uuid is not None:
            return raw.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise HypervisorError(f"domain lookup failed: {e.get_error_message()}") from e
    return None


def domain_name(raw: Any) -> str:
    return str(raw.name())


def remove_domain(conn: Connection, name: str, *, keep_nvram: bool = False) -> bool:
    """Destroy domain ``name`` if it runs and undefine it if persistent; False if absent.
    ``keep_nvram``: leave its UEFI variable store file (else libvirt deletes it).

    Raises HypervisorError if libvirt refuses.
    """
    raw = find_domain(conn, name)
    if raw is None:
        return False
    with libvirt_errors("cannot remove domain", domain=name, uri=conn.uri):
        # A transient domain is gone once destroyed: ask before.
        persistent = raw.isPersistent()
        if raw.isActive():
            raw.destroy()
        if persistent:
            raw.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | (
                    libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
                    if keep_nvram
                    else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
            )
    return True


def restore_image(
    conn: Connection, path: str, *, name: str, paused: bool, dxml: str | None = None
) -> Domain:
    """Restore the save image at ``path`` (``virDomainRestoreFlags``) and return the domain.

    ``path`` is read sequentially by libvirt and QEMU: a FIFO works.  ``paused`` starts the
    guest paused whatever the image says (else running).

    Raises HypervisorError (with libvirt's message) if the restore fails; no domain is
    left behind then (libvirt removes its half-started QEMU).
    """
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
    with libvirt_errors("restore failed", domain=name, uri=conn.uri):
        conn._conn().restoreFlags(path, dxml, flags)
    return conn.lookup(name)


def define_domain(conn: Connection, xml: str, *, name: str) -> Domain:
    """Define (persistently, shut off) the domain ``xml`` describes and return it.

    Raises HypervisorError (with libvirt's message) if libvirt refuses the XML.
    """
    with libvirt_errors("cannot define the domain", domain=name, uri=conn.uri):
        conn._conn().defineXML(xml)
    return conn.lookup(name)


#: Where libvirtd (system instance) writes QEMU's stderr and its own notes per domain.
QEMU_LOG_DIR = "/var/log/libvirt/qemu"


def domain_log_file(name: str) -> str:
    """libvirt's per-domain QEMU log on this host (the system daemon's layout)."""
    return f"{QEMU_LOG_DIR}/{name}.log"


def set_guest_time(dom: Domain) -> None:
    """Set the guest's clock from the host through the guest agent (guest-set-time).

    Raises HypervisorError if there is no agent or it does not answer.
    """
    with dom.errors("cannot set the guest time through the guest agent"):
        dom.raw.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC)


def connection_hostname(conn: Connection) -> str:
    with libvirt_errors("cannot read the target's host name", uri=conn.uri):
        return str(conn._conn().getHostname())


class Pool:
    """A storage pool on the target and the volumes a restore creates in it."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        try:
            self.raw = conn._conn().storagePoolLookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise NotFoundError(f"no storage pool {name!r} on {conn.uri}") from e
            raise HypervisorError(f"storage pool lookup failed: {e.get_error_message()}") from e
        with libvirt_errors(f"cannot use storage pool {name!r}", uri=conn.uri):
            if not self.raw.isActive():
                raise HostPreconditionError(f"storage pool {name!r} is not active")
            self.raw.refresh(0)
            root = ET.fromstring(self.raw.XMLDesc(0))
        self.type = root.get("type", "")
        self.path = root.findtext("./target/path") or ""

    def exists(self, volume: str) -> bool:
        try:
            self.raw.storageVolLookupByName(volume)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return False
            raise HypervisorError(f"volume lookup failed: {e.get_error_message()}") from e
        return True

    def delete(self, volume: str) -> None:
        """Delete ``volume`` if it exists (errors are logged: this runs in cleanup)."""
        try:
            self.raw.storageVolLookupByName(volume).delete(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                log.warning("cannot delete volume %s/%s: %s", self.name, volume, e)

    def create(self, volume: str, capacity: int, fmt: str) -> str:
        """Create a volume and return its path on the target. Raises HypervisorError."""
        xml = (
            f"<volume><name>{_esc(volume)}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation unit='bytes'>0</allocation>"
            f"<target><format type='{_esc(fmt)}'/><permissions><mode>0600</mode>"
            f"</permissions></target></volume>"
        )
        with libvirt_errors(f"cannot create volume {volume!r}", uri=self.conn.uri):
            vol = self.raw.createXML(xml, 0)
            return str(vol.path())

    def open_upload(self, volume: str, size: int) -> VolumeUpload:
        """Start a sparse upload of ``size`` bytes into ``volume``. Raises HypervisorError."""
        raw = self.conn._conn()
        with libvirt_errors(f"cannot upload volume {volume!r}", uri=self.conn.uri):
            vol = self.raw.storageVolLookupByName(volume)
            st = raw.newStream(0)
            vol.upload(st, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
        return VolumeUpload(st, volume, size, self.conn.uri)


class VolumeUpload:
    """A sparse upload in progress: sequential :meth:`write` of data and :meth:`hole` runs,
    then :meth:`finish` (which fills the rest with a hole) or :meth:`abort`."""

    def __init__(self, stream: Any, volume: str, size: int, uri: str) -> None:
        self._st = stream
        self.volume = volume
        self.size = size
        self.uri = uri
        self.pos = 0
        self.sent = 0

    def _fail(self, e: libvirt.libvirtError) -> HypervisorError:
        self.abort()
        return HypervisorError(
            f"upload of volume {self.volume!r} failed: {e.get_error_message()}", uri=self.uri
        )

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        view = memoryview(data)
        n = len(view)
        if self.pos + n > self.size:
            raise HypervisorError(f"upload of volume {self.volume!r} exceeds {self.size} bytes")
        try:
            while view:
                k = self._st.send(view[: 1 << 20].tobytes())
                view = view[k:]
        except libvirt.libvirtError as e:
            raise self._fail(e) from e
        self.pos += n
        self.sent += n
        return n

    def hole(self, length: int) -> None:
        if length <= 0:
            return
        try:
            self._st.sendHole(length, 0)
        except libvirt.libvirtError as e:
            raise self._fail(e) from e
        self.pos += length

    def finish(self) -> None:
        self.hole(self.size - self.pos)
        try:
            self._st.finish()
        except libvirt.libvirtError as e:
            raise self._fail(e) from e

    def abort(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._st.abort()


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")
