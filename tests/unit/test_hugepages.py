"""Which ranges :mod:`vmarchive.hypervisor.hugepages` remaps, on a fake ``/proc``.

The page map and page flags are files written at the offsets the kernel serves them at;
each case that must be left alone (a hole, another folio, no THP flag, a misaligned
frame, a file or shared mapping) is beside one that must be taken, so a check that
stopped working would show.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import time
from pathlib import Path

import pytest

from vmarchive.hypervisor import hugepages as hp

PID = 4242
HUGE = hp.HUGE
PRESENT = 1 << 63
THP_HEAD = (1 << 22) | (1 << 15)


class FakeProc:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / str(PID)).mkdir(parents=True)
        self.maps: list[str] = []
        self.pagemap = bytearray()
        self.kpageflags = bytearray()

    def mapping(self, start: int, end: int, perms: str = "rw-p", path: str = "") -> None:
        self.maps.append(f"{start:x}-{end:x} {perms} 00000000 00:00 0 {path}".rstrip())

    def map_pages(self, addr: int, pfns: list[int | None]) -> None:
        """Page-map entries from ``addr`` on: a frame number, or None for not present."""
        at = addr // 4096 * 8
        need = at + 8 * len(pfns)
        if len(self.pagemap) < need:
            self.pagemap += bytes(need - len(self.pagemap))
        for i, pfn in enumerate(pfns):
            struct.pack_into("<Q", self.pagemap, at + 8 * i, 0 if pfn is None else PRESENT | pfn)

    def flags(self, pfn: int, value: int) -> None:
        need = (pfn + 1) * 8
        if len(self.kpageflags) < need:
            self.kpageflags += bytes(need - len(self.kpageflags))
        struct.pack_into("<Q", self.kpageflags, pfn * 8, value)

    def huge(self, addr: int, pfn: int, flags: int = THP_HEAD) -> None:
        """A whole 2 MiB folio at ``addr`` (frames pfn .. pfn+511)."""
        self.map_pages(addr, list(range(pfn, pfn + 512)))
        self.flags(pfn, flags)

    def write(self) -> Path:
        (self.root / str(PID) / "maps").write_text("\n".join(self.maps) + "\n")
        (self.root / str(PID) / "pagemap").write_bytes(bytes(self.pagemap))
        (self.root / "kpageflags").write_bytes(bytes(self.kpageflags))
        return self.root


def test_only_private_writable_anonymous_mappings_with_a_whole_huge_page(tmp_path: Path) -> None:
    p = FakeProc(tmp_path)
    p.mapping(0x1000, 0x600000)  # unaligned start: the huge pages at 2 and 4 MiB
    p.mapping(0x600000, 0x700000)  # smaller than a huge page
    p.mapping(0x800000, 0xC00000, path="/usr/bin/qemu")
    p.mapping(0xC00000, 0x1000000, perms="rw-s")
    p.mapping(0x1000000, 0x1400000, perms="r--p")
    p.mapping(0x1400000, 0x1800000, path="[heap]")
    assert list(hp.anonymous_mappings(PID, p.write())) == [(0x200000, 0x600000)]


def test_whole_folios_are_taken_and_merged_into_runs(tmp_path: Path) -> None:
    p = FakeProc(tmp_path)
    base = 0x40000000
    p.huge(base, 512 * 10)
    p.huge(base + HUGE, 512 * 3)  # adjacent: one run of 4 MiB
    # not taken, one fault each:
    hole = [*range(512 * 20, 512 * 20 + 511), None]
    p.map_pages(base + 2 * HUGE, hole)
    p.flags(512 * 20, THP_HEAD)
    mixed = [*range(512 * 30, 512 * 30 + 256), *range(512 * 40 + 256, 512 * 40 + 512)]
    p.map_pages(base + 3 * HUGE, mixed)
    p.flags(512 * 30, THP_HEAD)
    p.huge(base + 4 * HUGE, 512 * 50, flags=1 << 15)  # compound head, but not a THP
    p.map_pages(base + 5 * HUGE, list(range(512 * 60 + 1, 512 * 61 + 1)))  # misaligned
    p.flags(512 * 60 + 1, THP_HEAD)
    # taken again after the gap
    p.huge(base + 6 * HUGE, 512 * 70)
    root = p.write()
    runs = hp.whole_folio_ranges(PID, [(base, base + 7 * HUGE)], root)
    assert runs == [(base, 2 * HUGE), (base + 6 * HUGE, HUGE)]


def test_frame_numbers_hidden_from_non_root_give_nothing(tmp_path: Path) -> None:
    p = FakeProc(tmp_path)
    p.map_pages(0x40000000, [0] * 512)  # present, PFN zeroed as for an unprivileged reader
    p.flags(0, THP_HEAD)
    assert hp.whole_folio_ranges(PID, [(0x40000000, 0x40000000 + HUGE)], p.write()) == []


def test_restore_huge_pages_never_raises_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hp.restore_huge_pages(None).skipped == "QEMU's process is not visible here"
    rep = hp.restore_huge_pages(PID, tmp_path)  # no such process in the fake /proc
    assert rep.skipped and rep.remapped_bytes == 0
    monkeypatch.setattr(platform, "machine", lambda: "sparc64")
    assert "sparc64" in str(hp.restore_huge_pages(PID, tmp_path).skipped)


def test_nothing_to_remap_calls_no_madvise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = FakeProc(tmp_path)
    p.mapping(0x40000000, 0x40400000)
    p.map_pages(0x40000000, [None] * 1024)
    root = p.write()

    def boom(*a: object) -> tuple[int, int]:
        raise AssertionError("process_madvise called with nothing to remap")

    monkeypatch.setattr(hp, "_collapse", boom)
    rep = hp.restore_huge_pages(PID, root)
    assert rep.skipped is None and rep.huge_bytes == 0 and rep.remapped_bytes == 0
    # the control: with a whole folio there, it is called
    p.huge(0x40000000, 512 * 8)
    root = p.write()
    monkeypatch.setattr(
        hp, "_collapse", lambda fd, runs, deadline: (sum(n for _, n in runs), 0, False)
    )
    monkeypatch.setattr(os, "pidfd_open", lambda pid: 99)  # hp.os
    monkeypatch.setattr(os, "close", lambda fd: None)
    rep = hp.restore_huge_pages(PID, root)
    assert (rep.huge_bytes, rep.remapped_bytes, rep.skipped) == (HUGE, HUGE, None)


def test_the_remap_stops_at_its_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls of at most 64 MiB, the deadline checked between them: a huge guest's remap
    is cut short (and says so) rather than lengthening the capture without bound."""
    calls: list[int] = []

    class FakeLibc:
        def syscall(self, nr: int, fd: int, iov: object, n: int, advice: int, flags: int) -> int:
            length = int(iov._obj.len)  # type: ignore[attr-defined]
            calls.append(length)
            return length

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())  # hp.ctypes
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    runs = [(0x40000000, 200 << 20), (0x80000000, HUGE)]
    assert hp._collapse(7, runs) == ((200 << 20) + HUGE, 0, False)
    assert calls == [64 << 20, 64 << 20, 64 << 20, 8 << 20, HUGE]
    calls.clear()
    clock = iter([0.0, 1.0, 2.0, 99.0])
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))  # hp.time
    assert hp._collapse(7, runs, deadline=5.0) == (3 * (64 << 20), 0, True)
    assert len(calls) == 3


def test_a_failed_call_is_gone_through_a_huge_page_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One busy huge page fails a whole 64 MiB call although the kernel collapsed the rest:
    the call is repeated page by page, a busy page (EAGAIN) once more, and only the pages
    that still fail are counted failed."""
    base = 0x40000000
    busy_once = base + 3 * HUGE  # the guest wrote to it during the first two tries
    no_memory = base + 5 * HUGE  # fails every time
    tries: dict[int, int] = {}

    class FakeLibc:
        def syscall(self, nr: int, fd: int, iov: object, n: int, advice: int, flags: int) -> int:
            start, length = int(iov._obj.base), int(iov._obj.len)  # type: ignore[attr-defined]
            bad = None
            for page in range(start, start + length, HUGE):
                tries[page] = tries.get(page, 0) + 1
                if page == no_memory:
                    bad = errno.ENOMEM
                elif page == busy_once and tries[page] <= 2:
                    bad = errno.EAGAIN
            if bad is not None:
                ctypes.set_errno(bad)
                return -1
            return length

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: FakeLibc())  # hp.ctypes
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert hp._collapse(7, [(base, 8 * HUGE)]) == (7 * HUGE, HUGE, False)
    assert tries[busy_once] == 3 and tries[no_memory] == 2 and tries[base] == 2
    # a page busy on every try is counted failed (no endless retrying)
    tries.clear()
    busy_once = base + 7 * HUGE
    tries[busy_once] = -10
    assert hp._collapse(7, [(base, 8 * HUGE)]) == (6 * HUGE, 2 * HUGE, False)
