"""Image files go to the kernel's writeback while they are written (restore's rebuilt
disks, whose final fsync holds the incoming guest back, and export's files), so the fsync
that ends them finds little left to write."""

from __future__ import annotations

import os
import pathlib
import random
import types

import pytest

from vmarchive.ops import fileio, restore

MIB = 1 << 20


def record_writeback_starts(
    monkeypatch: pytest.MonkeyPatch, threshold: int
) -> list[tuple[int, int]]:
    """With fileio's writeback threshold at ``threshold``: the (offset, length) ranges
    handed to the kernel from now on (they still are)."""
    monkeypatch.setattr(fileio, "WRITEBACK_BYTES", threshold)
    started: list[tuple[int, int]] = []
    real = fileio.start_writeback

    def recorded(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(fileio, "start_writeback", recorded)
    return started


def test_fill_starts_writeback_of_every_range_it_wrote(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = record_writeback_starts(monkeypatch, MIB)
    rng = random.Random(3)
    chunk = 256 * 1024
    slots = 40
    data = {i: rng.randbytes(chunk) for i in range(slots) if i % 7 != 3}  # some holes
    extents = [(i * chunk, chunk, data.get(i)) for i in range(slots)]
    stream = types.SimpleNamespace(size=slots * chunk)
    f = restore._DiskFile(tmp_path / "disk.raw", "raw", stream, bytes(16))  # type: ignore[arg-type]
    f.create()
    try:
        written = f.fill(iter(extents), None, lambda: False, lambda _n: None)
    finally:
        f.close()
    assert written == len(data) * chunk
    image = (tmp_path / "disk.raw").read_bytes()
    assert image == b"".join(data.get(i, bytes(chunk)) for i in range(slots))
    # every range handed over holds at least the threshold; together they cover all data
    # written before the last (shorter) stretch, which the final fsync writes
    assert started and all(n >= MIB for _o, n in started)
    covered: set[int] = set()
    for off, n in started:
        covered.update(range(off // chunk, (off + n) // chunk))
    last = max(off + n for off, n in started)
    assert {i for i in data if (i + 1) * chunk <= last} <= covered
    assert slots * chunk - last < MIB + chunk


def test_start_writeback_is_best_effort() -> None:
    """On Linux the call exists; a bad descriptor is ignored (the fsync reports errors)."""
    assert fileio.sync_file_range() is not None
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    fileio.start_writeback(w, 0, MIB)  # closed fd: no exception


def test_pwrite_all_continues_short_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: memoryview, pos: int) -> int:
        calls.append(pos)
        return real(fd, data[:1000], pos)  # at most 1000 bytes a call

    monkeypatch.setattr(os, "pwrite", short)  # fileio.os
    path = tmp_path / "f"
    data = bytes(range(256)) * 20  # 5120 bytes
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert fileio.pwrite_all(fd, data, 100) == len(data)
    finally:
        os.close(fd)
    assert calls == [100, 1100, 2100, 3100, 4100, 5100]
    assert path.read_bytes() == bytes(100) + data
