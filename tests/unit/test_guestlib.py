"""The test bed's pure parts: the workload's byte layouts and serial-log parsing.

The integration tests (tests/integration/test_testbed.py) check these against a real guest;
here we pin the layouts so an accidental edit shows up without booting anything."""

from __future__ import annotations

import pathlib
import struct

import guestlib
import pytest


def test_splitmix64_reference_value() -> None:
    # First output of splitmix64 seeded with 0 (the widely published reference value).
    assert guestlib.splitmix64(0)[1] == 0xE220A8397B1DCDAF


def test_pattern_pages_are_distinct_and_self_describing() -> None:
    pages = [guestlib.pattern_page(i) for i in range(guestlib.NPATTERN)]
    assert all(len(p) == guestlib.PAGE for p in pages)
    assert len(set(pages)) == guestlib.NPATTERN
    assert pages[5][:24] == b"VMARCHIVE-PATTERN".ljust(24, b"\0")
    assert struct.unpack_from("<Q", pages[5], 24) == (5,)
    assert guestlib.pattern_page(5) == pages[5]  # deterministic
    with pytest.raises(ValueError):
        guestlib.pattern_page(guestlib.NPATTERN)


def test_tick_block_round_trip_and_rejection() -> None:
    counter, boot = 1234, 0xFEEDFACE12345678
    block = guestlib.TICK_MAGIC + struct.pack("<QQQ", boot, counter, counter ^ (2**64 - 1))
    block = block.ljust(guestlib.PAGE, b"\0")
    assert guestlib.parse_tick_block(block) == guestlib.TickBlock(f"{boot:016x}", counter)
    torn = block[:24] + struct.pack("<Q", counter + 1) + block[32:]
    assert guestlib.parse_tick_block(torn) is None
    assert guestlib.parse_tick_block(bytes(guestlib.PAGE)) is None


def test_writer_expectation_keeps_the_last_write_per_block() -> None:
    seed, nblocks = 99, 8
    positions = guestlib.writer_positions(seed, 40, nblocks)
    expected = guestlib.expected_writer_blocks(seed, 40, nblocks)
    assert set(expected) == set(positions)
    for block, k in expected.items():
        assert positions[k] == block and block not in positions[k + 1 :]
    assert guestlib.writer_block(seed, 3) != guestlib.writer_block(seed, 4)
    assert guestlib.writer_block(seed, 3)[16:32] == struct.pack("<QQ", seed, 3)


def test_serial_log_parsing(tmp_path: pathlib.Path) -> None:
    log = tmp_path / "serial.log"
    log.write_text(
        "CONFIG tick_ms=200 churn=0 fill=0 writer=off/0 writer_blocks=16\r\n"
        "COUNTER pfn=0x8fe4\r\n"
        "PATTERN 0 pfn=0x8fe3\r\nPATTERN 1 pfn=0x8fe2\r\n"
        "GUEST UP boot=00000000deadbeef\r\n"
        "tick 1 boot=00000000deadbeef\r\n"
        "MISMATCH ram=7 disk=9 boot=00000000deadbeef disk_boot=00000000deadbeef\r\n"
        "tick 2 boot=00000000deadbeef wseq=32\r\n"
        "INIT workload exited with status 1\r\n"
    )
    s = guestlib.SerialLog(log)
    assert s.boot_ids() == ["00000000deadbeef"]
    assert s.counter_frame() == 0x8FE4
    assert s.pattern_frames() == {0: 0x8FE3, 1: 0x8FE2}
    assert s.ticks() == [
        guestlib.Tick(1, "00000000deadbeef", None),
        guestlib.Tick(2, "00000000deadbeef", 32),
    ]
    assert s.mismatches() == [guestlib.Mismatch(7, 9, "00000000deadbeef", "00000000deadbeef")]
    assert s.trouble() == ["INIT workload exited with status 1"]
    mark = log.read_bytes().index(b"tick 2")
    assert [t.n for t in s.ticks(since=mark)] == [2]
    assert s.mismatches(since=mark) == []
