"""The test bed itself: the guest boots under libvirt and its detectors tell the truth.

Every later capture/restore test trusts what the workload reports (ticks, the tick block on
disk, the counter and pattern pages in RAM, MISMATCH). These tests check each report against
the host's own view of the guest, and prove with a negative control that MISMATCH fires when
RAM and disk come from different instants -- and stays silent when they do not.
"""

from __future__ import annotations

import pathlib
import shutil
import time

import guestlib
import pytest
from guestlib import TWO_DISK_WRITER_SEED, GuestFactory

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def shared(module_guest_factory: GuestFactory) -> guestlib.Guest:
    """One qcow2 guest for the read-only observations below (a boot costs seconds)."""
    return module_guest_factory()


def paused(guest: guestlib.Guest) -> _Paused:
    return _Paused(guest)


class _Paused:
    """Pause the guest (QEMU drains and flushes its disks on stop), resume on exit."""

    def __init__(self, guest: guestlib.Guest) -> None:
        self.guest = guest

    def __enter__(self) -> None:
        self.guest.dom.suspend()

    def __exit__(self, *exc: object) -> None:
        self.guest.dom.resume()


def test_guest_boots_once_with_a_boot_id(shared: guestlib.Guest) -> None:
    text = shared.serial.text()
    assert shared.serial.boot_ids() == [shared.boot_id]
    assert shared.boot_id and len(shared.boot_id) == 16 and shared.boot_id != "0" * 16
    assert "CONFIG tick_ms=200 churn=0 fill=0 writer=off/" in text
    assert shared.serial.trouble() == []


def test_ticks_advance_contiguously(shared: guestlib.Guest) -> None:
    first = shared.wait_ticks(1)[-1]
    shared.wait_tick(first.n + 3)
    ticks = shared.serial.ticks()
    assert [t.n for t in ticks] == list(range(1, len(ticks) + 1))
    assert {t.boot_id for t in ticks} == {shared.boot_id}
    assert shared.serial.mismatches() == []


def test_disk_tick_block_follows_the_counter(shared: guestlib.Guest) -> None:
    counter_frame = shared.serial.counter_frame()
    assert counter_frame is not None
    seen = []
    for _ in range(2):
        with paused(shared):
            logged = shared.last_tick().n
            block = shared.read_tick_block()
            page = guestlib.parse_counter_page(shared.read_phys(counter_frame * guestlib.PAGE))
        assert block is not None, "no tick block on vda"
        assert page is not None, "counter page not at the reported frame"
        assert block.boot_id == page.boot_id == shared.boot_id
        # Paused between "write done" and "tick printed", or with the write in flight.
        assert block.counter in (logged, logged + 1)
        assert block.counter in (page.last_written, page.last_written + 1)
        # in_check names the tick under way (the next one) or nothing; a write of N in
        # flight means the guest is inside its check-and-write of N.
        assert page.in_check in (0, page.counter + 1), page
        if block.counter == page.last_written + 1:
            assert page.in_check == block.counter, (block, page)
        seen.append(block.counter)
        shared.wait_tick(block.counter + 2)
    assert seen[1] > seen[0]


def test_pattern_frames_hold_the_known_pages(shared: guestlib.Guest) -> None:
    frames = shared.serial.pattern_frames()
    assert sorted(frames) == list(range(guestlib.NPATTERN))
    assert len(set(frames.values())) == guestlib.NPATTERN
    for i, pfn in frames.items():
        assert shared.read_phys(pfn * guestlib.PAGE) == guestlib.pattern_page(i), f"page {i}"
    # Negative control: the comparison can fail -- the counter page is no pattern page, and
    # pattern pages differ from each other.
    counter_frame = shared.serial.counter_frame()
    assert counter_frame is not None
    other = shared.read_phys(counter_frame * guestlib.PAGE)
    assert all(other != guestlib.pattern_page(i) for i in range(guestlib.NPATTERN))
    assert shared.read_phys(frames[0] * guestlib.PAGE) != guestlib.pattern_page(1)


def test_ram_churn_dirties_guest_memory(
    shared: guestlib.Guest, guest_factory: GuestFactory
) -> None:
    churning = guest_factory(guestlib.GuestSpec(params={"churn": 16, "fill": 32}))
    assert "CONFIG tick_ms=200 churn=16 fill=32 " in churning.serial.text()
    churning.wait_ticks(2)
    # QEMU samples pages, so the figure is an estimate; the margins are wide on purpose.
    assert churning.dirty_rate_mib() >= 4
    assert shared.dirty_rate_mib() < 4  # control: the plain workload dirties almost nothing
    assert churning.serial.trouble() == [] and churning.serial.mismatches() == []


def test_raw_disk_guest_writes_its_ticks(raw_guest: guestlib.Guest) -> None:
    raw_guest.wait_ticks(3)
    before = raw_guest.last_tick().n
    block = raw_guest.read_tick_block()  # raw: the host page cache has every completed write
    after = raw_guest.last_tick().n
    assert block is not None and block.boot_id == raw_guest.boot_id
    assert before <= block.counter <= after + 1
    assert raw_guest.serial.mismatches() == []


def test_two_disk_guest_writer_is_reproducible(two_disk_guest: guestlib.Guest) -> None:
    g = two_disk_guest
    g.wait_ticks(3)
    with paused(g):
        wseq = g.last_tick().wseq
        vdb = guestlib.read_disk(g.disk_paths[1], "qcow2")
        tick_block = g.read_tick_block(0)
    assert wseq is not None and wseq > 0
    assert tick_block is not None and tick_block.boot_id == g.boot_id
    nblocks = len(vdb) // guestlib.PAGE
    # The pause may fall inside a tick: blocks of the tick after the logged one may be there.
    expected = guestlib.expected_writer_blocks(TWO_DISK_WRITER_SEED, wseq, nblocks)
    later = guestlib.writer_positions(TWO_DISK_WRITER_SEED, wseq + 16, nblocks)[wseq:]
    zero = bytes(guestlib.PAGE)
    for b in range(nblocks):
        got = vdb[b * guestlib.PAGE : (b + 1) * guestlib.PAGE]
        if b in later:
            continue
        if b in expected:
            assert got == guestlib.writer_block(TWO_DISK_WRITER_SEED, expected[b]), f"block {b}"
        else:
            assert got == zero, f"block {b} written but not by the writer"
    assert sum(1 for b in expected if b not in later) > 0


def test_destroy_mid_run_leaves_nothing_behind(guest_factory: GuestFactory) -> None:
    g = guest_factory()
    g.wait_ticks(2)
    assert guestlib.libvirt_leftovers(g.name), "the probe sees nothing of a running guest"
    g.destroy()
    assert not g.is_active()
    g.cleanup()
    assert guestlib.libvirt_leftovers(g.name) == []
    assert sorted(p.name for p in g.workdir.iterdir()) == ["disk0.qcow2", "serial.log"]


def save_outside_check(g: guestlib.Guest, image: pathlib.Path) -> guestlib.CounterPage:
    """``virsh save`` of the guest paused outside its check-and-write of the tick block;
    the counter page as saved.

    Saved inside it (after the check read the block, before the write), the guest restored
    against a newer disk overwrites that disk's block unread and MISMATCH cannot fire: the
    blind window ``guest/workload.c`` describes.  A pause that lands inside is resumed and
    taken again."""
    frame = g.serial.counter_frame()
    assert frame is not None
    for _ in range(20):
        g.dom.suspend()
        page = guestlib.parse_counter_page(g.read_phys(frame * guestlib.PAGE))
        assert page is not None and page.boot_id == g.boot_id, page
        if page.in_check == 0:
            g.save(image, running=True)
            return page
        g.dom.resume()
        time.sleep(0.05)
    raise AssertionError("20 pauses in a row inside the workload's check-and-write")


def test_mismatch_detector_fires_on_a_stale_disk_and_only_then(
    guest_factory: GuestFactory,
) -> None:
    g = guest_factory()
    g.wait_ticks(3)
    image = g.workdir / "state.save"
    page = save_outside_check(g, image)
    at_save = g.read_tick_block()  # stopped: flushed
    assert at_save is not None
    assert at_save.counter == page.last_written, (at_save, page)
    matching = g.workdir / "disk-at-save.qcow2"
    shutil.copyfile(g.disk_paths[0], matching)

    # Run 1: restore against the unchanged disk and let it write further ticks.
    mark = g.serial.mark()
    g.restore(image)
    g.wait_tick(at_save.counter + 4, since=mark)
    g.destroy()
    assert g.serial.boot_ids(mark) == []  # resumed, not rebooted
    assert g.serial.mismatches(mark) == []
    newer = g.read_tick_block()
    assert newer is not None and newer.counter > at_save.counter

    # Run 2: the same RAM against the newer disk -> MISMATCH.
    mark = g.serial.mark()
    g.restore(image)
    g.wait_for("MISMATCH", lambda: g.serial.mismatches(mark) or None)
    g.destroy()
    first = g.serial.mismatches(mark)[0]
    assert first.boot_id == first.disk_boot_id == g.boot_id
    assert first.ram == at_save.counter or first.ram + 1 == at_save.counter
    assert first.disk == newer.counter

    # Run 3 (control): the same RAM against the disk as it was at the save -> silence.
    shutil.copyfile(matching, g.disk_paths[0])
    mark = g.serial.mark()
    g.restore(image)
    ticks = g.wait_ticks(5, since=mark)
    g.destroy()
    assert g.serial.mismatches(mark) == []
    assert g.serial.boot_ids(mark) == []
    assert ticks[0].boot_id == g.boot_id
    assert ticks[0].n in (at_save.counter, at_save.counter + 1)
