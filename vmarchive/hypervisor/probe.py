"""Host capability probes for ``vmarchive doctor`` (hypervisor layer).

Each probe looks at one thing the capture depends on and returns a plain record of
facts; judging them (ok / warn / fail, what to do) is the ``ops.doctor`` module's job.
Probes never change host settings and never raise for a missing capability: the
absence is the answer.  Paths (device, sysfs, procfs, binaries) are parameters so tests
can point a probe at something that does not exist or at a faked tree.

* :func:`probe_libvirt` — can we connect; libvirt and QEMU versions; what libvirt says
  about virt type ``kvm``.
* :func:`probe_qemu` — a throwaway plain QEMU (``-machine none -S``) asked over QMP with
  qemu.qmp's :class:`~qemu.qmp.QMPClient` which migration capabilities the binary has,
  and whether it accepts ``background-snapshot`` on this kernel.
* :func:`probe_userfaultfd` — userfaultfd write-protect in the kernel (the syscall and
  ``UFFDIO_API``), and whether libvirt's unprivileged QEMU user may use it.
* :func:`probe_kvm` — whether ``/dev/kvm`` can run ordinary guests or TCG will be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import fcntl
import os
import pwd
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET

import msgspec
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from vmarchive.errors import HypervisorError
from vmarchive.hypervisor.connection import DEFAULT_URI, Connection

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
MIGRATION_CAPABILITIES = ("pause-before-switchover", "background-snapshot")


# --- libvirt ------------------------------------------------------------------------------


class LibvirtProbe(msgspec.Struct, frozen=True):
    uri: str
    connected: bool
    error: str | None = None
    libvirt_version: str | None = None
    qemu_version: str | None = None
    #: The emulator libvirt would use for x86_64 (from domain capabilities).
    emulator: str | None = None
    #: Whether libvirt reports virt type ``kvm`` as supported (None: could not ask).
    libvirt_offers_kvm: bool | None = None


def _domcaps_emulator(xml: str) -> str | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    path = root.findtext("path")
    return path.strip() if path else None


def probe_libvirt(uri: str = DEFAULT_URI) -> LibvirtProbe:
    """Connect to ``uri`` and read versions and libvirt's view of KVM (never raises)."""
    try:
        conn = Connection.open(uri)
    except HypervisorError as e:
        return LibvirtProbe(uri=uri, connected=False, error=e.message)
    with conn:
        try:
            v = conn.versions()
        except HypervisorError as e:
            return LibvirtProbe(uri=uri, connected=True, error=e.message)
        emulator: str | None = None
        offers_kvm: bool | None
        try:
            emulator = _domcaps_emulator(conn.domain_capabilities_xml(virttype="kvm"))
            offers_kvm = True
        except HypervisorError:
            offers_kvm = False
            with contextlib.suppress(HypervisorError):
                emulator = _domcaps_emulator(conn.domain_capabilities_xml(virttype="qemu"))
        return LibvirtProbe(
            uri=uri,
            connected=True,
            libvirt_version=v.libvirt,
            qemu_version=v.qemu or None,
            emulator=emulator,
            libvirt_offers_kvm=offers_kvm,
        )


# --- QEMU binary --------------------------------------------------------------------------


class QemuProbe(msgspec.Struct, frozen=True):
    binary: str
    ran: bool
    error: str | None = None
    version: str | None = None
    #: Capability name -> present in this binary (for :data:`MIGRATION_CAPABILITIES`).
    capabilities: dict[str, bool] = msgspec.field(default_factory=dict)
    #: QEMU (running as the probing user) accepted background-snapshot=on; None: not tried.
    background_snapshot_accepted: bool | None = None
    background_snapshot_error: str | None = None


async def _ask_qemu(binary: str, timeout: float) -> QemuProbe:
    tmp = tempfile.mkdtemp(prefix="vmarchive-doctor-")
    sock = os.path.join(tmp, "qmp.sock")
    qmp = QMPClient("vmarchive-doctor")
    proc: asyncio.subprocess.Process | None = None
    try:
        await qmp.start_server(sock)
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-machine",
            "none",
            "-nodefaults",
            "-S",
            "-display",
            "none",
            "-qmp",
            f"unix:{sock}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        accept = asyncio.ensure_future(qmp.accept())
        exited = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait(
            {accept, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if accept not in done:
            accept.cancel()
            with contextlib.suppress(asyncio.CancelledError, QMPError):
                await accept
            err = b""
            if exited in done and proc.stderr is not None:
                err = await proc.stderr.read()
            why = err.decode(errors="replace").strip().splitlines()[-1:] or ["no QMP connection"]
            return QemuProbe(binary=binary, ran=False, error=f"QEMU did not start: {why[0]}")
        exited.cancel()
        accept.result()  # raises if the QMP handshake failed
        ver = await qmp.execute("query-version")
        assert isinstance(ver, dict)
        q = ver["qemu"]
        version = f"{q['major']}.{q['minor']}.{q['micro']}"
        caps_reply = await qmp.execute("query-migrate-capabilities")
        assert isinstance(caps_reply, list)
        names = {str(c["capability"]) for c in caps_reply}
        caps = {c: c in names for c in MIGRATION_CAPABILITIES}
        accepted: bool | None = None
        bs_err: str | None = None
        if caps["background-snapshot"]:
            try:
                await qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "background-snapshot", "state": True}]},
                )
                accepted = True
            except QMPError as e:
                accepted, bs_err = False, str(e)
        with contextlib.suppress(QMPError):
            await qmp.execute("quit")
        return QemuProbe(
            binary=binary,
            ran=True,
            version=version,
            capabilities=caps,
            background_snapshot_accepted=accepted,
            background_snapshot_error=bs_err,
        )
    finally:
        # After "quit" QEMU hangs up; qemu.qmp may re-raise that EOF from disconnect().
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
        shutil.rmtree(tmp, ignore_errors=True)


def probe_qemu(binary: str = DEFAULT_QEMU, *, timeout: float = 30.0) -> QemuProbe:
    """Start ``binary`` with no machine and ask it over QMP (never raises)."""
    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        return QemuProbe(
            binary=binary, ran=False, error=f"{binary} does not exist or is not executable"
        )
    try:
        return asyncio.run(asyncio.wait_for(_ask_qemu(binary, timeout), timeout + 15))
    except Exception as e:  # a probe reports, never raises: any failure is the answer
        return QemuProbe(
            binary=binary, ran=False, error=f"QMP probe failed: {type(e).__name__}: {e}"
        )


# --- userfaultfd --------------------------------------------------------------------------

SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api): 3 x u64 = 24 bytes
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_USER_MODE_ONLY = 1


class _UffdioApi(ctypes.Structure):
    _fields_ = [
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class UffdProbe(msgspec.Struct, frozen=True):
    #: The userfaultfd syscall worked for the probing user (root: has CAP_SYS_PTRACE).
    syscall_ok: bool
    syscall_error: str | None = None
    #: The kernel offers write-protect faults (UFFD_FEATURE_PAGEFAULT_FLAG_WP).
    wp_supported: bool = False
    features: int = 0
    #: Value of vm.unprivileged_userfaultfd (None: not readable).
    unprivileged_sysctl: int | None = None
    #: The user QEMU runs as under libvirt, and whether that user can open a userfaultfd.
    qemu_user: str | None = None
    qemu_user_ok: bool | None = None
    qemu_user_error: str | None = None


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def libvirt_qemu_user(qemu_conf: str = "/etc/libvirt/qemu.conf") -> str | None:
    """The user libvirt runs QEMU as: ``user =`` in qemu.conf, else Debian's default."""
    try:
        with open(qemu_conf) as f:
            for line in f:
                m = re.match(r'\s*user\s*=\s*"([^"]+)"', line)
                if m:
                    return m.group(1).lstrip("+")
    except OSError:
        pass
    for name in ("libvirt-qemu", "qemu"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


def _try_as_user(user: str, nr: int) -> tuple[bool | None, str | None]:
    """Make the userfaultfd call QEMU 7.2 makes (no UFFD_USER_MODE_ONLY) in a forked child
    that has dropped to ``user``; ``(works, error)``, works None when it could not be tried."""
    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        return None, f"no such user {user!r}"
    if os.geteuid() != 0:
        return None, "not running as root: cannot test as another user"
    libc = _libc()
    pid = os.fork()
    if pid == 0:  # child: only syscalls, then _exit
        code = 100
        try:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            fd = int(libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK))
            code = 0 if fd >= 0 else min(ctypes.get_errno(), 99) or 99
        except BaseException:
            code = 101
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 0:
        return True, None
    if 0 < code < 100:
        return False, f"{errno_mod.errorcode.get(code, code)}: {os.strerror(code)}"
    return None, f"could not switch to user {user} for the test (child exit {code})"


def probe_userfaultfd(
    *,
    sysctl_path: str = "/proc/sys/vm/unprivileged_userfaultfd",
    qemu_user: str | None = None,
    machine: str | None = None,
) -> UffdProbe:
    """Probe userfaultfd write-protect for us and for libvirt's QEMU user (never raises).

    ``qemu_user`` defaults to :func:`libvirt_qemu_user`; ``machine`` to ``os.uname()``.
    """
    sysctl: int | None = None
    try:
        with open(sysctl_path) as f:
            sysctl = int(f.read().strip())
    except (OSError, ValueError):
        sysctl = None
    user = qemu_user if qemu_user is not None else libvirt_qemu_user()
    nr = SYS_USERFAULTFD.get(machine or os.uname().machine)
    if nr is None:
        return UffdProbe(
            syscall_ok=False,
            syscall_error="unknown architecture",
            unprivileged_sysctl=sysctl,
            qemu_user=user,
        )
    libc = _libc()
    fd = int(libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        code = ctypes.get_errno()
        return UffdProbe(
            syscall_ok=False,
            syscall_error=f"{errno_mod.errorcode.get(code, code)}: {os.strerror(code)}",
            unprivileged_sysctl=sysctl,
            qemu_user=user,
        )
    try:
        api = _UffdioApi(UFFD_API, 0, 0)
        try:
            fcntl.ioctl(fd, UFFDIO_API, api)
            features = int(api.features)
            err = None
        except OSError as e:
            features, err = 0, f"UFFDIO_API failed: {e}"
    finally:
        os.close(fd)
    user_ok: bool | None = None
    user_err: str | None = None
    if user is not None:
        user_ok, user_err = _try_as_user(user, nr)
    return UffdProbe(
        syscall_ok=err is None,
        syscall_error=err,
        wp_supported=bool(features & UFFD_FEATURE_PAGEFAULT_FLAG_WP),
        features=features,
        unprivileged_sysctl=sysctl,
        qemu_user=user,
        qemu_user_ok=user_ok,
        qemu_user_error=user_err,
    )


# --- KVM ----------------------------------------------------------------------------------

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_API_VERSION = 12
#: Kernel modules that back /dev/kvm with hardware virtualization.
HW_KVM_MODULES = ("kvm_intel", "kvm_amd")
#: Known software/paravirtual KVM back-ends that cannot run ordinary guest kernels.
PV_KVM_MODULES = ("kvm_pvm",)


class KvmProbe(msgspec.Struct, frozen=True):
    device: str
    device_present: bool
    opened: bool = False
    open_error: str | None = None
    api_version: int | None = None
    create_vm_ok: bool = False
    create_vcpu_ok: bool = False
    #: Loaded KVM vendor modules found in sysfs (kvm_intel, kvm_amd, kvm_pvm...).
    modules: tuple[str, ...] = ()
    #: The CPU flags show hardware virtualization (vmx or svm).
    cpu_virt_flags: tuple[str, ...] = ()

    @property
    def hardware_backed(self) -> bool:
        return any(m in HW_KVM_MODULES for m in self.modules)

    @property
    def paravirtual_only(self) -> bool:
        return not self.hardware_backed and any(m in PV_KVM_MODULES for m in self.modules)

    @property
    def usable(self) -> bool:
        """Ordinary guests (any OS) can run on KVM here."""
        return self.create_vcpu_ok and self.hardware_backed


def probe_kvm(
    device: str = "/dev/kvm", *, sysfs_modules: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo"
) -> KvmProbe:
    """Open ``device``, create a VM and a vCPU, and see which module backs it (never raises).

    A /dev/kvm that creates VMs is not enough: a paravirtual back-end such as ``kvm_pvm``
    accepts the ioctls but runs only guest kernels built for it.  Ordinary guests need a
    hardware back-end (``kvm_intel``/``kvm_amd``), which also shows as vmx/svm CPU flags.
    """
    modules = tuple(
        m
        for m in (*HW_KVM_MODULES, *PV_KVM_MODULES)
        if os.path.isdir(os.path.join(sysfs_modules, m))
    )
    flags: tuple[str, ...] = ()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = tuple(sorted({"vmx", "svm"} & set(line.split(":", 1)[1].split())))
                    break
    except OSError:
        pass
    if not os.path.exists(device):
        return KvmProbe(device=device, device_present=False, modules=modules, cpu_virt_flags=flags)
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return KvmProbe(
            device=device,
            device_present=True,
            open_error=str(e),
            modules=modules,
            cpu_virt_flags=flags,
        )
    api: int | None = None
    vm_ok = vcpu_ok = False
    try:
        api = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if api == KVM_API_VERSION:
            vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
            vm_ok = True
            try:
                vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
                vcpu_ok = True
                os.close(vcpu)
            finally:
                os.close(vm)
    except OSError:
        pass
    finally:
        os.close(fd)
    return KvmProbe(
        device=device,
        device_present=True,
        opened=True,
        api_version=api,
        create_vm_ok=vm_ok,
        create_vcpu_ok=vcpu_ok,
        modules=modules,
        cpu_virt_flags=flags,
    )
