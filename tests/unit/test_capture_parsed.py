"""ParsedConsumer's round trip: the stream regenerated from the store, parsed back, must
carry in every RAM slot the content whose chunk id the capture recorded there."""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any, cast

import pytest
from test_migstream import W, page, sample

from vmarchive.errors import DamageError, StreamError
from vmarchive.format import migstream as ms
from vmarchive.ops import capture_parsed
from vmarchive.ops.capture_parse import make_consumer, vouch
from vmarchive.ops.capture_parsed import ParentMemory, ParsedConsumer
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

    def flipped(block: ms.RamBlock, skip: frozenset[int] = frozenset()) -> Iterator[ms.RamExtent]:
        for off, n, data in real(block, skip):
            if (
                block.idstr == "pc.ram"
                and isinstance(data, bytes | bytearray | memoryview)
                and off == 0
            ):
                data = bytes([data[0] ^ 1]) + bytes(data[1:])
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

        def flipped(
            block: ms.RamBlock, skip: frozenset[int] = frozenset()
        ) -> Iterator[ms.RamExtent]:
            for off, n, data in real(block, skip):
                at = 37 * 4096 - off  # page 37: inside the run of pages 33-48
                if isinstance(data, bytes | bytearray | memoryview) and 0 <= at < n:
                    data = bytes(data[:at]) + bytes([data[at] ^ 1]) + bytes(data[at + 1 :])
                yield off, n, data

        monkeypatch.setattr(pc, "_stored_extents", flipped)
        r = pc.roundtrip(w)
        assert not r["ok"]
        assert r["problems"] == ["RAM block 'pc.ram' slot 18 differs after the round trip"]


def test_round_trip_reads_small_batches_in_order_several_at_once(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 2 slots, 3 read at once: the 32 data slots come back in order, none
    lost or repeated, and the reads really overlap (the first two meet at a barrier,
    which one read at a time would leave waiting: BrokenBarrierError)."""
    monkeypatch.setattr(capture_parsed, "_READ_BATCH", 2)
    repo, w, pc = _long_capture(tmp_path)
    with repo, w:
        real = w.read_chunks
        meet = threading.Barrier(2, timeout=10)
        calls: list[int] = []

        def reads(ids: list[bytes]) -> Any:
            calls.append(len(ids))
            if len(calls) <= 2:
                meet.wait()
            return real(ids)

        monkeypatch.setattr(w, "read_chunks", reads)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert r["pages"] == 96 and r["slots_checked"] == 48
        assert len(calls) == 24 and sum(calls) == _DATA_SLOTS  # 48 slots; 16 holes not read


# --- slots the parent's round trip vouches for ----------------------------------------------
#: 96 pages in 48 slots of 8 KiB: 32 data slots, slots 20-35 zero
_DATA_SLOTS = 32


def _stream(changed: frozenset[int] = frozenset(), pages: int = 96) -> bytes:
    seq = [
        (0, p, None if 40 <= p < 72 else page(p + 1 + (5000 if p in changed else 0)))
        for p in range(pages)
    ]
    return W(blocks=[("pc.ram", pages * 4096)], sections=[seq]).build()


def _consume(w: Any, data: bytes) -> ParsedConsumer:
    pc = ParsedConsumer(w)
    for i in range(0, len(data), 100_000):
        pc.feed(memoryview(data[i : i + 100_000]))
    pc.finish()
    pc.close_streams()
    return pc


def _committed(repo: Repository, data: bytes, **roundtrip: Any) -> str:
    """An archive of ``data`` with its round trip's result (``roundtrip`` overrides keys)."""
    with repo.writer() as w:
        pc = _consume(w, data)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        r.update(roundtrip)
        meta: dict[str, Any] = {
            "time": "t",
            "domain": "d",
            "kind": "full",
            "memory": {**pc.summary()},
        }
        meta["memory"]["roundtrip"] = r
        return w.commit(meta)


def _counting_reads(monkeypatch: pytest.MonkeyPatch, w: Any) -> list[int]:
    reads: list[int] = []
    real = w.read_chunks

    def counted(ids: list[bytes]) -> Any:
        reads.append(len(ids))
        return real(ids)

    monkeypatch.setattr(w, "read_chunks", counted)
    return reads


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), InitOptions(memory_chunk_size=8192))


def test_slots_unchanged_since_the_parent_are_not_read_back(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = ParentMemory.of(repo.load_archive(_committed(repo, _stream())))
    assert parent is not None
    with repo, repo.writer() as w:
        pc = _consume(w, _stream(frozenset({10, 11})))  # both pages of slot 5
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w, parent)
        assert r["ok"], r["problems"]
        # every slot but 5 (changed) and 0 (always checked) holds what the parent held:
        # 30 data slots and the 16 holes are left out of the regenerated stream
        assert r["slots_from_parent"] == 46 and r["parent"] == parent.archive
        assert r["slots_checked"] == 2 and r["pages"] == 4
        assert sum(reads) == 2  # slots 0 and 5
        # without the parent every data slot is read back (the control)
        reads.clear()
        r = pc.roundtrip(w)
        assert r["ok"] and r["slots_from_parent"] == 0 and r["parent"] is None
        assert sum(reads) == _DATA_SLOTS


def test_a_changed_slot_is_still_checked_against_what_was_captured(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = ParentMemory.of(repo.load_archive(_committed(repo, _stream())))
    with repo, repo.writer() as w:
        pc = _consume(w, _stream(frozenset({10, 11})))
        real = pc._stored_extents

        def flipped(
            block: ms.RamBlock, skip: frozenset[int] = frozenset()
        ) -> Iterator[ms.RamExtent]:
            for off, n, data in real(block, skip):
                if off == 5 * 8192 and isinstance(data, bytes | bytearray | memoryview):
                    data = bytes([data[0] ^ 1]) + bytes(data[1:])
                yield off, n, data

        monkeypatch.setattr(pc, "_stored_extents", flipped)
        r = pc.roundtrip(w, parent)
        assert r["problems"] == ["RAM block 'pc.ram' slot 5 differs after the round trip"]


def test_a_slot_taken_from_the_parent_must_not_come_back(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slot check expects nothing where the source was told to leave slots out: a
    source that sends one anyway (or a regenerator that invents records there) is caught."""
    parent = ParentMemory.of(repo.load_archive(_committed(repo, _stream())))
    with repo, repo.writer() as w:
        pc = _consume(w, _stream())
        real = pc._stored_extents

        def ignores_skip(
            block: ms.RamBlock, skip: frozenset[int] = frozenset()
        ) -> Iterator[ms.RamExtent]:
            return real(block, frozenset(s for s in skip if s != 3))

        monkeypatch.setattr(pc, "_stored_extents", ignores_skip)
        r = pc.roundtrip(w, parent)
        assert r["problems"] == [
            "RAM block 'pc.ram' slot 3 differs after the round trip",
            "RAM block 'pc.ram': 2 slots came back after the round trip, 1 expected",
        ]


def test_a_changed_slot_left_out_of_the_round_trip_is_caught(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that leaves out a slot the parent did not prove (the regenerator and the
    parser agree on the gap) is caught by the slot count."""
    parent = ParentMemory.of(repo.load_archive(_committed(repo, _stream())))
    with repo, repo.writer() as w:
        pc = _consume(w, _stream(frozenset({10, 11})))  # slot 5 changed
        real = pc._stored_extents

        def skips_more(
            block: ms.RamBlock, skip: frozenset[int] = frozenset()
        ) -> Iterator[ms.RamExtent]:
            return real(block, frozenset(skip) | {5})

        assert pc.roundtrip(w, parent)["ok"]  # the control
        monkeypatch.setattr(pc, "_stored_extents", skips_more)
        r = pc.roundtrip(w, parent)
        assert r["problems"] == [
            "RAM block 'pc.ram': 1 slots came back after the round trip, 2 expected"
        ]


@pytest.mark.parametrize(
    "override",
    [{"ok": False}, {"checker": "0123456789abcdef"}, {"checker": None}],
    ids=["parent-failed", "other-code", "no-checker"],
)
def test_no_slot_is_taken_from_a_parent_that_proved_nothing_for_this_code(
    repo: Repository, override: dict[str, Any]
) -> None:
    arch = repo.load_archive(_committed(repo, _stream(), **override))
    assert ParentMemory.of(arch) is None
    good = repo.load_archive(_committed(repo, _stream()))
    assert ParentMemory.of(good) is not None  # the control
    opaque = type(good)(good.id, {**good.metadata, "memory": {**good.metadata["memory"]}}, [])
    opaque.metadata["memory"]["format"] = "opaque"
    assert ParentMemory.of(opaque) is None


def test_a_block_of_another_size_takes_nothing_from_the_parent(repo: Repository) -> None:
    parent = ParentMemory.of(repo.load_archive(_committed(repo, _stream(pages=80))))
    assert parent is not None
    with repo, repo.writer() as w:
        pc = _consume(w, _stream())
        r = pc.roundtrip(w, parent)
        assert r["ok"] and r["slots_from_parent"] == 0 and r["slots_checked"] == 48


def test_the_checker_id_changes_with_the_code(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = capture_parsed.checker_id()
    assert mine is not None and mine == capture_parsed.checker_id.__wrapped__()
    edited = tmp_path / "migstream.py"
    edited.write_bytes(pathlib.Path(ms.__file__).read_bytes() + b"# one more line\n")
    monkeypatch.setattr(ms, "__file__", str(edited))
    assert capture_parsed.checker_id.__wrapped__() not in (None, mine)
    monkeypatch.setattr(ms, "__file__", str(tmp_path / "gone.py"))
    assert capture_parsed.checker_id.__wrapped__() is None


def test_read_back_in_batches_read_ahead_gives_every_slot_once_in_order(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round trip reads the next batch while this one is regenerated: with batches of
    5 slots (of 48; 16 holes) every stored slot comes once, in order, with its bytes; a
    generator given up early leaves no reading thread behind, and a failed read surfaces
    from the generator."""
    monkeypatch.setattr(capture_parsed, "_READ_BATCH", 5)
    repo, w, pc = _long_capture(tmp_path)
    with repo, w:
        assert pc.layout is not None
        (block,) = pc.layout.ram_blocks
        got = list(pc._stored_extents(block))
        assert [off for off, _n, _d in got] == [i * 8192 for i in range(48) if not 20 <= i < 36]
        for off, n, d in got:
            assert isinstance(d, bytes | bytearray | memoryview)
            assert bytes(d) == page(off // 4096 + 1) + page(off // 4096 + 2) and n == 8192
        assert pc.roundtrip(w)["ok"]

        def readers() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name.startswith("roundtrip-read")]

        gen = cast(Generator[ms.RamExtent, None, None], pc._stored_extents(block))
        next(gen)
        assert readers()  # the control: reading ahead
        gen.close()
        assert not readers()

        real = w.read_chunks
        calls: list[int] = []

        def failing(ids: list[bytes]) -> Any:
            calls.append(len(ids))
            if len(calls) == 3:
                raise DamageError("bad chunk")
            return real(ids)

        monkeypatch.setattr(w, "read_chunks", failing)
        with pytest.raises(DamageError):
            list(pc._stored_extents(block))
        assert not readers()


# --- slots checked while the parser holds them ----------------------------------------------
def _consume_live(
    w: Any, data: bytes, monkeypatch: pytest.MonkeyPatch, parent: Any | None = None
) -> ParsedConsumer:
    """``data`` parsed with live checks of 8 slots, room for every batch (none dropped);
    ``parent``: the archive the consumer is told of (:func:`vouch`)."""
    monkeypatch.setattr(capture_parsed, "_LIVE_BATCH", 8)
    monkeypatch.setattr(capture_parsed, "_LIVE_WAITING", 100)
    pc = ParsedConsumer(w, live_check=True)
    vouch(pc, parent)
    for i in range(0, len(data), 100_000):
        pc.feed(memoryview(data[i : i + 100_000]))
    pc.finish()
    pc.close_streams()
    return pc


def test_slots_checked_live_are_not_read_back(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 8 data slots, each led by the one before: every slot but slot 0
    (always checked at the end) is proven while parsed, the 16 holes too, and only slot 0
    is regenerated and read back at the end."""
    with repo, repo.writer() as w:
        pc = _consume_live(w, _stream(), monkeypatch)
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert pc.live is not None and pc.live.dropped == pc.live.failed == 0
        assert r["slots_checked_live"] == 48 - 1 and r["slots_from_parent"] == 0
        assert set(range(20, 36)) <= pc.live.taken()[0]  # the holes
        assert r["slots_checked"] == 1
        assert sum(reads) == 1
        assert not pc.sink.streams[0].read_back  # no copy kept for a read back (S3)
    with repo, repo.writer() as w:  # the control: without live checks all are read back
        pc = _consume(w, _stream())
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"] and r["slots_checked_live"] == 0 and sum(reads) == _DATA_SLOTS
        assert pc.sink.streams[0].read_back


def test_a_live_check_that_fails_proves_nothing(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that differs from what the capture recorded (slot 5, in the witness's copy)
    fails its batch: none of its slots is taken, the round trip at the end reads them
    back and passes (what was stored is right)."""
    real = capture_parsed._LiveCheck.offer

    def flipped(
        self: Any, bidx: int, index: int, data: bytes | bytearray, wire: bytes | None
    ) -> None:
        if index == 5:
            data = bytes([data[0] ^ 1]) + bytes(data[1:])
        real(self, bidx, index, data, wire)

    monkeypatch.setattr(capture_parsed._LiveCheck, "offer", flipped)
    with repo, repo.writer() as w:
        pc = _consume_live(w, _stream(), monkeypatch)
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert pc.live is not None and pc.live.failed == 1
        # slots 0-7 were one batch, with the holes 24-31 (whole slots of zero records,
        # offered as they come: the data slots wait among the open ones): none proven;
        # the next one, led by 7, still proves 8-14
        assert r["slots_checked_live"] == 48 - 16
        assert sum(reads) == 8  # the holes are regenerated, not read


def test_a_slot_whose_chunk_changed_after_its_live_check_is_checked_again(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    with repo, repo.writer() as w:
        pc = _consume_live(w, _stream(), monkeypatch)
        assert pc.live is not None
        assert 3 in pc.live.taken()[0]  # the control
        pc.live.proven[0][3] = bytes(16)  # proven with content the slot no longer holds
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"] and r["slots_checked_live"] == 48 - 2
        assert sum(reads) == 2  # slots 0 and 3


# --- slots proven by their records: the regenerator writes again what the capture read ---
_CS = 16 * 4096  # one slot: a run of 16 records


def _wired_stream() -> bytes:
    """16 slots of 16 pages, in order: data (runs from slot 1: slot 0's first record names
    the block), slots 5-6 zero, slot 9 with a zero page inside (no run: page by page)."""
    seq = [
        (0, p, None if p // 16 in (5, 6) or p == 9 * 16 + 3 else page(p + 1))
        for p in range(16 * 16)
    ]
    return W(blocks=[("pc.ram", 16 * _CS)], sections=[seq]).build()


def _live_streams(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The slots of each stream a live check regenerates and parses back, as it goes."""
    streams: list[list[int]] = []
    real = ms.check_round_trip

    def counted(*a: Any, **kw: Any) -> ms.RoundTripReport:
        expect = kw["page_check"].expect
        if expect is not None:
            streams.append(sorted(next(iter(expect.values()))))
        return real(*a, **kw)

    monkeypatch.setattr(ms, "check_round_trip", counted)
    return streams


@pytest.mark.parametrize("records_match", [True, False])
def test_slots_read_as_one_group_are_proven_by_their_records(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, records_match: bool
) -> None:
    """A slot whose records the regenerator writes again byte for byte is proven without a
    stream parsed back: only slot 0 (its first record names the block), the zero slots and
    slot 9 (a zero page inside) go through streams, each led by a slot proven before it.
    The control: records that do not match (``records_match`` False) send every slot
    through streams, which prove the same slots as before."""
    repo = Repository.init(str(tmp_path / "repo"), InitOptions(memory_chunk_size=_CS))
    if not records_match:
        monkeypatch.setattr(ms, "records_digest", lambda *_a: b"not the records read")
    with repo, repo.writer() as w:
        streams = _live_streams(monkeypatch)
        pc = _consume_live(w, _wired_stream(), monkeypatch)
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert pc.live is not None and pc.live.failed == pc.live.dropped == 0
        assert r["slots_checked_live"] == 16 - 1 and sum(reads) == 1  # slot 0, at the end
        through_streams = {i for s in streams for i in s[1:]}  # the first leads only
        if records_match:
            assert through_streams <= {5, 6, 9}, streams
            assert r["slots_checked_by_records"] == 16 - 4  # all but 0, 5, 6 and 9
        else:
            assert through_streams == set(range(1, 16)), streams
            assert r["slots_checked_by_records"] == 0


def test_a_regenerator_writing_other_bytes_is_not_vouched_for_by_the_records_read(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regenerator that writes one byte of slot 3 wrong: its records differ from those
    read, so the slot goes through a stream, which fails; the round trip at the end fails
    on it too (the control, without the fault, is the test above)."""
    real = ms._emit_block

    def wrong(o: Any, block: ms.RamBlock, extents: Any, *a: Any, **kw: Any) -> None:
        def flipped() -> Iterator[ms.RamExtent]:
            for off, n, d in extents:
                if off == 3 * _CS and isinstance(d, bytes | bytearray | memoryview):
                    d = bytes([d[0] ^ 1]) + bytes(d[1:])
                yield off, n, d

        real(o, block, flipped(), *a, **kw)

    monkeypatch.setattr(ms, "_emit_block", wrong)
    repo = Repository.init(str(tmp_path / "repo"), InitOptions(memory_chunk_size=_CS))
    with repo, repo.writer() as w:
        pc = _consume_live(w, _wired_stream(), monkeypatch)
        assert pc.live is not None
        taken = pc.live.taken()[0]
        assert 3 not in taken and 4 in taken
        r = pc.roundtrip(w)
        assert not r["ok"]
        assert any("slot 3 differs" in p for p in r["problems"]), r["problems"]


def test_batches_the_checker_has_no_room_for_are_left_to_the_round_trip(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser never waits for the live checks: while the checker is held up, batches
    that find no room are dropped, and the round trip at the end reads their slots."""
    go = threading.Event()
    real = capture_parsed._LiveCheck._check

    def held(self: Any, *a: Any) -> None:
        go.wait(10)
        real(self, *a)

    monkeypatch.setattr(capture_parsed._LiveCheck, "_check", held)
    with repo, repo.writer() as w:
        monkeypatch.setattr(capture_parsed, "_LIVE_BATCH", 4)
        monkeypatch.setattr(capture_parsed, "_LIVE_WAITING", 1)
        pc = ParsedConsumer(w, live_check=True)
        data = _stream()
        for i in range(0, len(data), 100_000):
            pc.feed(memoryview(data[i : i + 100_000]))
        done = threading.Thread(target=pc.finish)
        done.start()
        assert pc.live is not None
        deadline = time.monotonic() + 10
        while pc.live.dropped == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        go.set()
        done.join()
        pc.close_streams()
        assert pc.live.dropped > 0
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w)
        assert r["ok"], r["problems"]
        assert 0 < r["slots_checked_live"] < 48 - 1
        data_slots = set(range(48)) - set(range(20, 36))
        assert sum(reads) == len(data_slots - pc.live.taken()[0])


def test_the_capture_checks_live_in_snapshots_known_chunks_only_without_a_parent(
    repo: Repository,
) -> None:
    good = repo.load_archive(_committed(repo, _stream()))
    bad = repo.load_archive(_committed(repo, _stream(), ok=False))
    with repo, repo.writer() as w:
        for snapshot, parent, live, vouched in [
            (True, None, True, False),
            (True, bad, True, False),
            (True, good, True, True),
            (False, None, False, False),
        ]:
            pc = cast(ParsedConsumer, make_consumer(w, True, snapshot=snapshot))
            vouch(pc, parent)
            assert (pc.live is not None) == live, (snapshot, parent)
            assert pc.sink.live is pc.live
            assert pc.live is None or pc.live.vouched == vouched


def test_with_a_parent_only_new_chunks_are_checked_live(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots 5-9 changed since the parent: they are checked live (5 leads its batch and
    is read back, as is slot 0); the unchanged ones are the parent's, neither checked live
    nor read back."""
    parent = repo.load_archive(_committed(repo, _stream()))
    data = _stream(frozenset(range(10, 20)))  # pages 10-19: slots 5-9
    with repo, repo.writer() as w:
        pc = _consume_live(w, data, monkeypatch, parent)
        reads = _counting_reads(monkeypatch, w)
        r = pc.roundtrip(w, ParentMemory.of(parent))
        assert r["ok"], r["problems"]
        assert r["slots_checked_live"] == 4 and r["slots_from_parent"] == 48 - 6
        assert sum(reads) == 2
    with repo, repo.writer() as w:  # the control: the parent unknown to the live checks
        pc = _consume_live(w, data, monkeypatch)
        assert pc.live is not None and not pc.live.vouched
        r = pc.roundtrip(w, ParentMemory.of(parent))
        assert r["ok"] and r["slots_checked_live"] > 4, r


@pytest.mark.parametrize("abandoned", [True, False])
def test_an_abandoned_consumer_leaves_no_live_check_running(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, abandoned: bool
) -> None:
    """A failed capture abandons the consumer: its live checker finishes the batch in hand
    and ends.  The control: a consumer that is not abandoned checks every batch."""
    go = threading.Event()
    checked: list[int] = []
    real = capture_parsed._LiveCheck._check

    def held(self: Any, *a: Any) -> None:
        go.wait(10)
        checked.append(1)
        real(self, *a)

    monkeypatch.setattr(capture_parsed._LiveCheck, "_check", held)
    monkeypatch.setattr(capture_parsed, "_LIVE_BATCH", 4)
    monkeypatch.setattr(capture_parsed, "_LIVE_WAITING", 100)
    with repo, repo.writer() as w:
        pc = ParsedConsumer(w, live_check=True)
        data = _stream()
        for i in range(0, len(data), 100_000):
            pc.feed(memoryview(data[i : i + 100_000]))
        pc.finish()
        live = pc.live
        assert live is not None
        if abandoned:
            t = threading.Thread(target=pc.abandon)
            t.start()
            deadline = time.monotonic() + 10
            while not live._stop and time.monotonic() < deadline:
                time.sleep(0.005)
            go.set()
            t.join(10)
            assert not t.is_alive()
        else:
            go.set()
            live.taken()
        assert not [t for t in threading.enumerate() if t.name == "memory-livecheck"]
        assert (len(checked) == 1) == abandoned, checked
