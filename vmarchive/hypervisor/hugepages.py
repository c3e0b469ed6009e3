"""Give QEMU back the transparent huge pages a background snapshot splits (hypervisor layer,
same host only).

Why: QEMU's background snapshot write-protects all guest RAM with userfaultfd while the
guest is stopped, then lifts the protection 4 KiB at a time as it copies.  Lifting it
inside a 2 MiB transparent huge page remaps that page with 512 page-table entries; the
memory stays one 2 MiB folio, but it is no longer mapped as one.  The *next* capture's
write-protect, inside its pause, then walks 512 entries where it walked one: measured
here on a 2 GiB guest, 7-8 ms pauses while guest RAM was huge-page mapped, 26-33 ms once
split -- the pause grows with RAM.  The kernel's khugepaged remaps them only slowly (by
default 16 MiB every 10 s).

:func:`restore_huge_pages` asks the kernel to map them with one entry again, at once:
``MADV_COLLAPSE`` through ``process_madvise(2)`` (Linux 6.1) on QEMU's process.  Only
2 MiB ranges that already are one whole, in-order 2 MiB folio are touched (page map and
page flags checked first), so nothing is copied and no memory is added: a range that was
never huge stays as it is.  Needs root (page frame numbers, and CAP_SYS_NICE for the
advice); anything that cannot be done is reported, never raised -- it is an optimisation
of the next capture's pause, not part of this one.

What it leaves: RAM the guest never touched.  QEMU's snapshot read-faults every page first,
which maps the zero page, and splits those mappings the same way; collapsing them would
allocate a real huge page per range (measured: +0.9 GiB for a half-empty 2 GiB guest), so
they stay, and the pause still grows with the untouched part of RAM (half-empty 2 GiB guest:
24-26 ms with the remap, 26-32 without).

None of this concerns guest RAM on hugetlbfs (libvirt ``<hugepages/>``), which QEMU protects
and releases 2 MiB at a time; :func:`probe_hugetlbfs` tells ``vmarchive doctor`` whether the
host can give guests such RAM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

PROC = Path("/proc")
HUGE = 2 << 20  #: the PMD-mapped transparent huge page size (x86-64, arm64 with 4 KiB pages)
PAGE = 4096
_PER_HUGE = HUGE // PAGE  # 512 page-map entries per huge page
#: process_madvise(2): the same number on x86-64 and the asm-generic table (arm64).
_SYS_PROCESS_MADVISE = {"x86_64": 440, "aarch64": 440}
_MADV_COLLAPSE = 25
#: Bytes per call (a deadline is checked between calls) and the default time budget: the
#: kernel remaps about 8 GiB/s here; a 1 TiB guest would take two minutes, not a capture's.
_STEP = 64 << 20
DEFAULT_BUDGET_S = 10.0
#: /proc/PID/pagemap entry: bit 63 present, bits 0-54 the page frame number (root only).
_PM_PRESENT = 1 << 63
_PM_PFN_MASK = (1 << 55) - 1
_RUN_OF_ENTRIES = struct.Struct(f"<{_PER_HUGE}Q")
#: /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
_KPF_COMPOUND_HEAD = 1 << 15
_KPF_THP = 1 << 22


@dataclass
class HugePageReport:
    """What :func:`restore_huge_pages` did; ``skipped`` says why it did nothing."""

    remapped_bytes: int = 0
    huge_bytes: int = 0
    failed_bytes: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    cut_short: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "cut_short": self.cut_short,
            "remapped_mib": round(self.remapped_bytes / (1 << 20), 1),
            "huge_mib": round(self.huge_bytes / (1 << 20), 1),
            "failed_mib": round(self.failed_bytes / (1 << 20), 1),
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
        }


def anonymous_mappings(pid: int, proc: Path = PROC) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of the process's private, writable, anonymous mappings holding at
    least one aligned huge page (guest RAM among them)."""
    for line in (proc / str(pid) / "maps").read_text().splitlines():
        fields = line.split()
        if len(fields) != 5 or not fields[1].startswith("rw") or fields[1][3] != "p":
            continue  # a path name (file, [heap], [stack]) or a shared mapping
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        start = -(-lo // HUGE) * HUGE
        end = hi // HUGE * HUGE
        if end > start:
            yield start, end


def whole_folio_ranges(
    pid: int, mappings: list[tuple[int, int]], proc: Path = PROC
) -> list[tuple[int, int]]:
    """The aligned 2 MiB ranges of ``mappings`` that map one whole 2 MiB transparent huge
    page in order (PMD- or PTE-mapped), merged into runs ``(start, length)``.

    Raises OSError when the page map or page flags cannot be read (not root).
    """
    runs: list[tuple[int, int]] = []
    pm = os.open(proc / str(pid) / "pagemap", os.O_RDONLY)
    try:
        kf = os.open(proc / "kpageflags", os.O_RDONLY)
        try:
            for start, end in mappings:
                for addr in range(start, end, HUGE):
                    if _is_whole_folio(pm, kf, addr):
                        if runs and runs[-1][0] + runs[-1][1] == addr:
                            runs[-1] = (runs[-1][0], runs[-1][1] + HUGE)
                        else:
                            runs.append((addr, HUGE))
        finally:
            os.close(kf)
    finally:
        os.close(pm)
    return runs


def _is_whole_folio(pm: int, kf: int, addr: int) -> bool:
    raw = os.pread(pm, 8 * _PER_HUGE, addr // PAGE * 8)
    if len(raw) != 8 * _PER_HUGE:
        return False
    first = struct.unpack_from("<Q", raw)[0]
    if not first & _PM_PRESENT:
        return False
    pfn = first & _PM_PFN_MASK
    if pfn == 0 or pfn % _PER_HUGE:
        return False  # no frame number (not root) or not the start of a huge page
    # Every entry present, with the first one's flags and the next frame number: the
    # expected bytes, compared at once (not a Python loop over 512 entries per range).
    # Entries whose flags differ (a page swapped out, or still write-protected) are not
    # taken either.
    if raw != _RUN_OF_ENTRIES.pack(*range(first, first + _PER_HUGE)):
        return False  # a hole, or pages of different folios
    flags = os.pread(kf, 8, pfn * 8)
    if len(flags) != 8:
        return False
    (kpf,) = struct.unpack("<Q", flags)
    return bool(kpf & _KPF_THP and kpf & _KPF_COMPOUND_HEAD)


def _process_madvise_number() -> int:
    """Raises OSError (ENOSYS) on a machine whose system call number we do not know."""
    nr = _SYS_PROCESS_MADVISE.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"no process_madvise number known for {platform.machine()}")
    return nr


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _collapse(
    pidfd: int, runs: list[tuple[int, int]], deadline: float = float("inf")
) -> tuple[int, int, bool]:
    """MADV_COLLAPSE the runs, at most :data:`_STEP` bytes per call; returns (bytes
    advised, bytes failed, whether the deadline cut it short).

    The kernel collapses every huge page of a call it can and answers with the last
    error if one failed, so a call that fails is gone through again a huge page at a time:
    the others then count as done (collapsing a page already mapped whole succeeds at
    once), and a page the running guest held busy (EAGAIN) gets a second try."""
    nr = _process_madvise_number()
    libc = ctypes.CDLL(None, use_errno=True)

    def advise(start: int, length: int) -> int:
        """Bytes advised, or minus the errno."""
        iov = _Iovec(start, length)
        n = int(libc.syscall(nr, pidfd, ctypes.byref(iov), 1, _MADV_COLLAPSE, 0))
        return n if n >= 0 else -ctypes.get_errno()

    done = failed = 0
    for run_start, run_length in runs:
        for start in range(run_start, run_start + run_length, _STEP):
            if time.monotonic() > deadline:
                return done, failed, True
            length = min(_STEP, run_start + run_length - start)
            n = advise(start, length)
            if n >= 0:
                done += n
                continue
            if -n in (errno.ENOSYS, errno.EPERM, errno.EINVAL) and not done:
                raise OSError(-n, os.strerror(-n))  # not supported or not allowed
            for page in range(start, start + length, HUGE):
                n = advise(page, HUGE)
                if n == -errno.EAGAIN:
                    n = advise(page, HUGE)
                if n >= 0:
                    done += n
                else:  # ENOMEM, or busy twice: the next page may still work
                    failed += HUGE
                    log.debug("MADV_COLLAPSE at %#x: %s", page, os.strerror(-n))
    return done, failed, False


def restore_huge_pages(
    pid: int | None, proc: Path = PROC, budget_s: float = DEFAULT_BUDGET_S
) -> HugePageReport:
    """Map QEMU's split transparent huge pages with one page-table entry again (see the
    module docstring), for at most ``budget_s`` seconds (the rest is left to khugepaged,
    and ``cut_short`` says so).  Never raises."""
    rep = HugePageReport()
    t0 = time.monotonic()
    try:
        if pid is None:
            rep.skipped = "QEMU's process is not visible here"
        else:
            _process_madvise_number()  # before reading page maps for nothing
            runs = whole_folio_ranges(pid, list(anonymous_mappings(pid, proc)), proc)
            rep.huge_bytes = sum(n for _, n in runs)
            if runs:
                pidfd = os.pidfd_open(pid)
                try:
                    rep.remapped_bytes, rep.failed_bytes, rep.cut_short = _collapse(
                        pidfd, runs, t0 + budget_s
                    )
                finally:
                    os.close(pidfd)
    except OSError as e:
        rep.skipped = f"{e.strerror or e} (process_madvise MADV_COLLAPSE needs Linux 6.1 and root)"
    except Exception as e:  # an optimisation: never let it fail a finished capture
        rep.skipped = f"unexpected: {e!r}"
    rep.seconds = time.monotonic() - t0
    if rep.skipped:
        log.debug("huge pages not restored: %s", rep.skipped)
    else:
        log.debug(
            "huge pages: %d of %d MiB remapped in %.2f s",
            rep.remapped_bytes >> 20,
            rep.huge_bytes >> 20,
            rep.seconds,
        )
    return rep


THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


class RemapProbe(msgspec.Struct, frozen=True):
    """Whether :func:`restore_huge_pages` can work on this host (``vmarchive doctor``)."""

    thp_mode: str  # always / madvise / never / unknown
    available: bool
    error: str | None = None


def probe_remap(thp_enabled: Path = THP_ENABLED) -> RemapProbe:
    """THP's mode, and whether remapping works: frame numbers are visible to us, and
    ``process_madvise(MADV_COLLAPSE)`` collapses a 2 MiB range of our own.  Never raises."""
    try:
        text = thp_enabled.read_text()
        mode = text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        mode = "unknown"
    if mode == "never":
        return RemapProbe(mode, False, "transparent huge pages are off: nothing gets split")
    import mmap

    buf = None
    try:
        _process_madvise_number()
        buf = mmap.mmap(-1, 2 * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = ctypes.c_char.from_buffer(buf)
        addr = ctypes.addressof(view)
        del view  # an exported buffer could not be closed
        start = -(-addr // HUGE) * HUGE
        buf[start - addr : start - addr + HUGE] = b"\x01" * HUGE  # populate it
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // PAGE * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
        if not entry & _PM_PFN_MASK:
            raise OSError(errno.EPERM, "page frame numbers are hidden (not root)")
        pidfd = os.pidfd_open(os.getpid())
        try:
            done, failed, _ = _collapse(pidfd, [(start, HUGE)])
        finally:
            os.close(pidfd)
        if failed or done != HUGE:
            raise OSError(errno.EAGAIN, "MADV_COLLAPSE did not collapse a test range")
        return RemapProbe(mode, True)
    except (OSError, ValueError) as e:
        return RemapProbe(mode, False, str(e.strerror if isinstance(e, OSError) else e))
    finally:
        if buf is not None:
            buf.close()


class HugetlbProbe(msgspec.Struct, frozen=True):
    """Whether guests can have their RAM on hugetlbfs here (``vmarchive doctor``)."""

    mountpoint: str | None  # where hugetlbfs is mounted, None: nowhere
    page_kib: int  # the default huge page size
    total: int  # huge pages reserved (vm.nr_hugepages)
    free: int


def probe_hugetlbfs(
    mounts: Path = Path("/proc/mounts"), meminfo: Path = Path("/proc/meminfo")
) -> HugetlbProbe:
    """hugetlbfs's mount point and the huge page pool, from /proc.  Never raises."""
    where = None
    with contextlib.suppress(OSError):
        for line in mounts.read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "hugetlbfs":
                where = fields[1]
                break
    info: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            with contextlib.suppress(ValueError, IndexError):
                info[key] = int(rest.split()[0])
    return HugetlbProbe(
        where,
        info.get("Hugepagesize", 0),
        info.get("HugePages_Total", 0),
        info.get("HugePages_Free", 0),
    )


__all__ = [
    "HugePageReport",
    "HugetlbProbe",
    "RemapProbe",
    "anonymous_mappings",
    "probe_hugetlbfs",
    "probe_remap",
    "restore_huge_pages",
    "whole_folio_ranges",
]
