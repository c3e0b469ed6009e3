"""`vmarchive doctor`: can this host capture guests, and how (ops layer).

Runs the probes of :mod:`vmarchive.hypervisor.probe` and judges each fact as a
:class:`Check` — status ok / warn / fail, a plain-words explanation, what to do.  Nothing
here changes the host: where a setting would help (``vm.unprivileged_userfaultfd``) the
check says what it does and leaves the decision to the administrator.

A check is *required* when capture cannot work without it; :attr:`DoctorReport.ok` is
False only when a required check failed (the CLI then exits non-zero).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from msgspec.structs import asdict

from vmarchive.hypervisor.connection import DEFAULT_URI
from vmarchive.hypervisor.hugepages import (
    THP_ENABLED,
    HugetlbProbe,
    RemapProbe,
    probe_hugetlbfs,
    probe_remap,
)
from vmarchive.hypervisor.probe import (
    DEFAULT_QEMU,
    KvmProbe,
    LibvirtProbe,
    QemuProbe,
    UffdProbe,
    probe_kvm,
    probe_libvirt,
    probe_qemu,
    probe_userfaultfd,
)

__all__ = ["DEFAULT_URI", "Check", "DoctorOptions", "DoctorReport", "Status", "run_doctor"]

log = logging.getLogger(__name__)


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


class Check(msgspec.Struct, frozen=True):
    """One judged fact about the host."""

    name: str
    status: Status
    summary: str
    explanation: str = ""
    action: str = ""
    required: bool = False
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass(frozen=True)
class DoctorOptions:
    uri: str = DEFAULT_URI
    #: QEMU binary to probe; None: the one libvirt uses (else :data:`DEFAULT_QEMU`).
    qemu_binary: str | None = None
    kvm_device: str = "/dev/kvm"
    uffd_sysctl: str = "/proc/sys/vm/unprivileged_userfaultfd"
    #: User QEMU runs as under libvirt; None: from /etc/libvirt/qemu.conf.
    qemu_user: str | None = None
    timeout: float = 30.0
    thp_enabled: Path = THP_ENABLED


class DoctorReport(msgspec.Struct, frozen=True):
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """No required check failed."""
        return not any(c.required and c.status is Status.FAIL for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_dict() for c in self.checks]}


def check_libvirt(p: LibvirtProbe) -> Check:
    if not p.connected or p.error:
        return Check(
            "libvirt",
            Status.FAIL,
            f"cannot use libvirt at {p.uri}",
            explanation=p.error or "the connection failed",
            action="start libvirtd (and virtlogd), or pass the right URI with --connect",
            required=True,
            details=asdict(p),
        )
    return Check(
        "libvirt",
        Status.OK,
        f"connected to {p.uri}: libvirt {p.libvirt_version}, QEMU {p.qemu_version or 'unknown'}",
        required=True,
        details=asdict(p),
    )


def check_qemu(p: QemuProbe) -> Check:
    if not p.ran:
        return Check(
            "qemu",
            Status.FAIL,
            f"cannot run QEMU binary {p.binary}",
            explanation=p.error or "",
            action="install qemu-system-x86 or pass the binary with --qemu",
            required=True,
            details=asdict(p),
        )
    return Check(
        "qemu", Status.OK, f"{p.binary} runs (QEMU {p.version})", required=True, details=asdict(p)
    )


def check_switchover(p: QemuProbe) -> Check:
    has = p.capabilities.get("pause-before-switchover", False)
    if has:
        return Check(
            "pause-before-switchover",
            Status.OK,
            "QEMU supports pause-before-switchover: capture --mode switchover works",
            explanation="The guest keeps running while its memory is copied; it is paused for "
            "milliseconds at the end while every disk gets a temporary overlay.",
            details={"binary": p.binary},
        )
    return Check(
        "pause-before-switchover",
        Status.FAIL if p.ran else Status.WARN,
        "QEMU lacks pause-before-switchover" if p.ran else "not checked (QEMU did not run)",
        explanation="Without it the switchover mode cannot take disks and memory at one instant.",
        action="use QEMU 2.11 or newer",
        details={"binary": p.binary},
    )


def check_background_snapshot(q: QemuProbe, u: UffdProbe) -> Check:
    has = q.capabilities.get("background-snapshot", False)
    details = {"binary": q.binary, "accepted_as_root": q.background_snapshot_accepted}
    if not has:
        return Check(
            "background-snapshot",
            Status.WARN,
            "QEMU lacks background-snapshot" if q.ran else "not checked (QEMU did not run)",
            explanation="capture --mode snapshot needs it; --mode switchover still works.",
            action="use QEMU 6.0 or newer for the snapshot mode",
            details=details,
        )
    if q.background_snapshot_accepted is False:
        return Check(
            "background-snapshot",
            Status.WARN,
            "QEMU has background-snapshot but this kernel cannot back it",
            explanation=f"QEMU said: {q.background_snapshot_error}",
            action="use a kernel with userfaultfd write-protect (5.7+); --mode switchover still works",
            details=details,
        )
    return Check(
        "background-snapshot",
        Status.OK,
        "QEMU supports background-snapshot (and accepted it on this kernel)",
        explanation="capture --mode snapshot saves memory as it was when the guest was "
        "briefly stopped, while the guest runs on; it also needs userfaultfd, see below.",
        details=details,
    )


UFFD_PLAIN = (
    "QEMU's snapshot mode watches guest memory for writes with the kernel's userfaultfd "
    "write-protect. The kernel lets only privileged processes use userfaultfd while the "
    "setting vm.unprivileged_userfaultfd is 0; libvirt runs QEMU as an unprivileged user "
    "({user}), so the snapshot mode cannot work under libvirt here. "
    "Setting `sysctl vm.unprivileged_userfaultfd=1` (persist it in /etc/sysctl.d/) lets every "
    "local user create userfaultfd objects; that widens what an unprivileged attacker can do "
    "with kernel bugs, which is why it is off by default. vmarchive never changes it: "
    "without it, captures use the switchover mode (a pause of some milliseconds more)."
)


def check_userfaultfd(u: UffdProbe) -> Check:
    details = asdict(u)
    if not u.syscall_ok or not u.wp_supported:
        return Check(
            "userfaultfd",
            Status.WARN,
            "the kernel has no usable userfaultfd write-protect",
            explanation=(u.syscall_error or "UFFD_FEATURE_PAGEFAULT_FLAG_WP is missing")
            + "; capture --mode snapshot cannot work, --mode switchover still does.",
            action="a kernel 5.7+ built with CONFIG_USERFAULTFD and write-protect support",
            details=details,
        )
    if u.qemu_user_ok:
        return Check(
            "userfaultfd",
            Status.OK,
            f"userfaultfd write-protect works, also for QEMU's user {u.qemu_user}",
            explanation="capture --mode snapshot can be used under libvirt.",
            details=details,
        )
    if u.qemu_user_ok is False:
        return Check(
            "userfaultfd",
            Status.WARN,
            f"kernel supports userfaultfd write-protect, but QEMU's user {u.qemu_user} may not use it "
            f"(vm.unprivileged_userfaultfd = {u.unprivileged_sysctl})",
            explanation=UFFD_PLAIN.format(user=u.qemu_user),
            action="nothing, unless you want the snapshot mode: then an administrator may run "
            "`sysctl vm.unprivileged_userfaultfd=1`",
            details=details,
        )
    return Check(
        "userfaultfd",
        Status.WARN,
        "kernel supports userfaultfd write-protect; could not test QEMU's user",
        explanation=u.qemu_user_error or "QEMU's user is unknown",
        action="run `vmarchive doctor` as root to test it",
        details=details,
    )


def check_kvm(k: KvmProbe, lv: LibvirtProbe) -> Check:
    details = asdict(k) | {
        "hardware_backed": k.hardware_backed,
        "paravirtual_only": k.paravirtual_only,
        "usable": k.usable,
        "libvirt_offers_kvm": lv.libvirt_offers_kvm,
    }
    if k.usable:
        return Check(
            "kvm",
            Status.OK,
            f"KVM is usable ({', '.join(k.modules)}): guests run at full speed",
            details=details,
        )
    if not k.device_present:
        why = f"{k.device} does not exist"
    elif not k.opened:
        why = f"{k.device} cannot be opened: {k.open_error}"
    elif k.paravirtual_only:
        why = (
            f"{k.device} is provided by {', '.join(k.modules)}, a paravirtual KVM that runs only "
            "guest kernels built for it (the CPU shows no vmx/svm hardware virtualization); "
            "ordinary guests hang on it"
        )
        if lv.libvirt_offers_kvm:
            why += ". libvirt still lists type 'kvm' as supported: do not rely on that"
    elif not k.create_vcpu_ok:
        why = f"{k.device} refuses to create a VM or vCPU"
    else:
        why = f"{k.device} works but no hardware KVM module ({', '.join(k.modules) or 'none'}) backs it"
    return Check(
        "kvm",
        Status.WARN,
        "KVM is not usable: guests run under TCG (type='qemu'), slowly but correctly",
        explanation=why
        + ". Capture works under TCG, but QEMU 7.2's precopy misses writes there, so"
        " switchover mode pauses a TCG guest for the whole memory copy (hundreds of ms);"
        " snapshot mode (userfaultfd) pauses it for milliseconds.",
        action="define guests with <domain type='qemu'>; for speed, a host with hardware virtualization",
        details=details,
    )


def check_modes(lv: LibvirtProbe, q: QemuProbe, u: UffdProbe) -> Check:
    base = lv.connected and lv.error is None and q.ran
    switchover = base and q.capabilities.get("pause-before-switchover", False)
    snapshot = (
        base
        and q.capabilities.get("background-snapshot", False)
        and q.background_snapshot_accepted is not False
        and bool(u.wp_supported and u.qemu_user_ok)
    )
    modes = [m for m, ok in (("snapshot", snapshot), ("switchover", switchover)) if ok]
    details = {"switchover": switchover, "snapshot": snapshot}
    if not modes:
        return Check(
            "capture",
            Status.FAIL,
            "live capture is not possible on this host",
            explanation="neither capture mode has what it needs (see the failures above)",
            action="fix the failed checks above",
            required=True,
            details=details,
        )
    return Check(
        "capture",
        Status.OK,
        f"live capture works: --mode auto will use {modes[0]}"
        + ("" if snapshot else " (snapshot mode unavailable)"),
        required=True,
        details=details,
    )


def check_huge_pages(h: RemapProbe) -> Check:
    """Whether snapshot captures can map guest RAM with huge pages again afterwards."""
    details = asdict(h)
    if h.available:
        return Check(
            "huge-pages",
            Status.OK,
            "guest RAM is remapped with huge pages after each snapshot capture",
            explanation="QEMU's write tracking splits them; remapped, the next capture's "
            "pause does not grow with RAM.",
            details=details,
        )
    if h.thp_mode == "never":
        return Check(
            "huge-pages",
            Status.OK,
            "transparent huge pages are off: snapshot captures split nothing",
            details=details,
        )
    return Check(
        "huge-pages",
        Status.WARN,
        "huge pages split by a snapshot capture cannot be remapped here",
        explanation=f"{h.error}; from the second snapshot capture of a guest on, its pause "
        "grows with its RAM in use (about 10 ms per GiB here) until khugepaged remaps the pages.",
        action="run captures as root on Linux 6.1 or later (process_madvise MADV_COLLAPSE)",
        details=details,
    )


_HUGETLB_WHY = (
    "A guest whose RAM is on huge pages (libvirt <memoryBacking><hugepages/>) is "
    "write-protected and sent 2 MiB at a time by a snapshot capture instead of 4 KiB: on the "
    "2-core benchmark host QEMU sent a 512 MiB guest's RAM at 2.2-2.4 GiB/s instead of "
    "350-410 MiB/s, and the pause stayed at 7-10 ms from 0.5 to 2 GiB of RAM."
)


def check_hugetlbfs(h: HugetlbProbe) -> Check:
    """Whether guests can be given huge-page RAM, which snapshot captures favour (advice:
    always OK, the summary says which case this is)."""
    size = f"{h.page_kib // 1024} MiB" if h.page_kib >= 1024 else f"{h.page_kib} KiB"
    if h.mountpoint is None:
        summary = "no hugetlbfs mounted: guests cannot have huge-page RAM (optional)"
        todo = (
            " To offer it: mount -t hugetlbfs hugetlbfs /dev/hugepages before libvirtd "
            "starts, reserve pages (sysctl vm.nr_hugepages) and give guests <hugepages/>."
        )
    elif h.total == 0:
        summary = f"hugetlbfs at {h.mountpoint}, but no huge page is reserved (optional)"
        todo = f" To offer it: reserve {size} pages (sysctl vm.nr_hugepages=N)."
    else:
        summary = f"hugetlbfs at {h.mountpoint}: {h.free} of {h.total} huge pages of {size} free"
        todo = ""
    return Check(
        "hugetlbfs", Status.OK, summary, explanation=_HUGETLB_WHY + todo, details=asdict(h)
    )


def run_doctor(options: DoctorOptions | None = None) -> DoctorReport:
    """Probe the host and judge it.  Never raises for a missing capability."""
    o = options or DoctorOptions()
    lv = probe_libvirt(o.uri)
    binary = o.qemu_binary or lv.emulator or DEFAULT_QEMU
    q = probe_qemu(binary, timeout=o.timeout)
    u = probe_userfaultfd(sysctl_path=o.uffd_sysctl, qemu_user=o.qemu_user)
    k = probe_kvm(o.kvm_device)
    checks = [
        check_libvirt(lv),
        check_qemu(q),
        check_switchover(q),
        check_background_snapshot(q, u),
        check_userfaultfd(u),
        check_kvm(k, lv),
        check_modes(lv, q, u),
        check_huge_pages(probe_remap(o.thp_enabled)),
        check_hugetlbfs(probe_hugetlbfs()),
    ]
    for c in checks:
        log.debug("doctor: %s %s: %s", c.status.value, c.name, c.summary)
    return DoctorReport(checks)
