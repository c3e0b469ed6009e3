"""ParsedConsumer's round trip: the stream regenerated from the store, parsed back, must
carry in every RAM slot the content whose chunk id the capture recorded there."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from test_migstream import W, page, sample

from vmarchive.errors import StreamError
from vmarchive.format import migstream as ms
from vmarchive.ops.capture_parsed import ParsedConsumer
from vmarchive.store import InitOptions, Repository


def _capture(tmp_path: pathlib.Path) -> tuple[Repository, Any, ParsedConsumer]:
    repo = Repository.init(str(tmp_path / "repo"), InitOptions(memory_chunk_size=8192))
    w = repo.writer()
    pc = ParsedConsumer(w)
    data = sample().build()
    for i in range(0, len(data), 1000):  # arrives in pieces, as from the pipe
        pc.feed(memoryview(data[i : i + 1000]))
    pc.finish()
    pc.close_streams()
    return repo, w, pc


def test_round_trip_of_a_stored_stream_is_ok(tmp_path: pathlib.Path) -> None:
    repo, w, pc = _capture(tmp_path)
    with repo, w:
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert r["pages"] == 20


def test_round_trip_sees_a_page_that_changed_on_the_way(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, w, pc = _capture(tmp_path)
    real = pc._stored_extents

    def flipped(block: ms.RamBlock) -> Iterator[tuple[int, int, bytes | None]]:
        for off, n, data in real(block):
            if block.idstr == "pc.ram" and data is not None and off == 0:
                data = bytes([data[0] ^ 1]) + data[1:]
            yield off, n, data

    monkeypatch.setattr(pc, "_stored_extents", flipped)
    with repo, w:
        r = pc.roundtrip(w)
        assert not r["ok"]
        assert any("'pc.ram' slot 0 differs" in p for p in r["problems"]), r["problems"]


def test_a_stream_the_parser_rejects_surfaces_its_error_from_feed(tmp_path: pathlib.Path) -> None:
    """Many more pieces than the pipe holds follow the bad start: feed never blocks, and
    it raises the parser's own error (what the capture's opaque retry looks at)."""
    repo = Repository.init(str(tmp_path / "repo"), InitOptions())
    with repo, repo.writer() as w:
        pc = ParsedConsumer(w)
        raised: BaseException | None = None
        for _ in range(64):
            try:
                pc.feed(memoryview(b"NOT A QEMU STREAM" * 100))
            except BaseException as e:
                raised = e
                break
        if raised is None:  # every piece fitted before the parser failed
            with pytest.raises(StreamError):
                pc.finish()
        else:
            assert isinstance(raised, StreamError) and not isinstance(raised, BrokenPipeError)


def _long_capture(tmp_path: pathlib.Path) -> tuple[Repository, Any, ParsedConsumer]:
    """96 pages in order, data and zero runs: the parser hands runs of 16 pages to the
    page images, and the round trip's parse-back hands runs to the slot check."""
    seq = [(0, p, None if 40 <= p < 72 else page(p + 1)) for p in range(96)]
    w_ = W(blocks=[("pc.ram", 96 * 4096)], sections=[seq])
    repo = Repository.init(str(tmp_path / "repo"), InitOptions(memory_chunk_size=8192))
    w = repo.writer()
    pc = ParsedConsumer(w)
    data = w_.build()
    for i in range(0, len(data), 100_000):
        pc.feed(memoryview(data[i : i + 100_000]))
    pc.finish()
    pc.close_streams()
    return repo, w, pc


def test_round_trip_of_runs_is_ok_and_sees_a_flip_inside_a_run(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, w, pc = _long_capture(tmp_path)
    with repo, w:
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert r["pages"] == 96
        real = pc._stored_extents

        def flipped(block: ms.RamBlock) -> Iterator[tuple[int, int, bytes | None]]:
            for off, n, data in real(block):
                at = 37 * 4096 - off  # page 37: inside the run of pages 33-48
                if data is not None and 0 <= at < n:
                    data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
                yield off, n, data

        monkeypatch.setattr(pc, "_stored_extents", flipped)
        r = pc.roundtrip(w)
        assert not r["ok"]
        assert r["problems"] == ["RAM block 'pc.ram' slot 18 differs after the round trip"]
