"""RamImage: pages in any order, re-sent any number of times, give the final image."""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmarchive.format import migstream as ms
from vmarchive.ops.capture_memory import OpaqueMemory, PipeReader, RamImage
from vmarchive.progress import NULL_PROGRESS

PAGE = 4096


class FakeStream:
    """A StreamWriter double: slots of chunk ids, chunks kept by id, zero -> hole."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.slots: dict[int, bytes] = {}
        self.chunks: dict[bytes, bytes] = {}
        self.writes = 0
        self.order: list[int] = []
        #: slots filled by write_if_present (nothing stored)
        self.present: list[int] = []
        self.appended = bytearray()
        self.hole_runs: list[tuple[int, int]] = []  # write_holes calls

    @staticmethod
    def content_id(data: bytes | bytearray | memoryview) -> bytes:
        data = bytes(data)
        return bytes(16) if not any(data) else hashlib.blake2b(data, digest_size=16).digest()

    def write_if_present(self, index: int, data: bytes) -> bytes | None:
        assert len(data) == min(self.chunk_size, self.size - index * self.chunk_size)
        cid = self.content_id(data)
        if cid != bytes(16) and cid not in self.chunks:
            return cid
        self.slots[index] = cid
        self.present.append(index)
        return None

    def write_chunk(
        self,
        index: int,
        data: bytes | bytearray | memoryview,
        chunk_id: bytes | None = None,
        *,
        handed_over: bool = False,
    ) -> bool:
        data = bytes(data)
        assert len(data) == min(self.chunk_size, self.size - index * self.chunk_size)
        cid = self.content_id(data)
        assert chunk_id in (None, cid)  # an id handed on must be the data's
        self.writes += 1
        self.order.append(index)
        new = cid != bytes(16) and cid not in self.chunks
        if cid != bytes(16):
            self.chunks[cid] = data
        self.slots[index] = cid
        return new

    def write_holes(self, first: int, count: int) -> None:
        assert count > 0 and (first + count - 1) * self.chunk_size < self.size
        self.hole_runs.append((first, count))
        for index in range(first, first + count):
            self.order.append(index)
            self.slots[index] = bytes(16)

    def slot_id(self, index: int) -> bytes:
        return self.slots[index]

    def read_chunk(self, cid: bytes) -> bytes:
        return self.chunks[cid]

    def image(self) -> bytes:
        out = bytearray(self.size)
        for i, cid in self.slots.items():
            if cid != bytes(16):
                out[i * self.chunk_size : i * self.chunk_size + len(self.chunks[cid])] = (
                    self.chunks[cid]
                )
        return bytes(out)

    def append(self, data: memoryview) -> None:
        self.appended += data


@settings(max_examples=60, deadline=None)
@given(
    npages=st.integers(1, 40),
    chunk_pages=st.sampled_from([1, 2, 4, 16]),
    max_open=st.integers(1, 5),
    sends=st.lists(st.tuples(st.integers(0, 39), st.integers(0, 255)), max_size=200),
)
def test_final_image_is_last_write_of_each_page(
    npages: int, chunk_pages: int, max_open: int, sends: list[tuple[int, int]]
) -> None:
    size = npages * PAGE
    sw = FakeStream(size, chunk_pages * PAGE)
    img = RamImage(sw, sw.read_chunk, max_open=max_open)
    expect = bytearray(size)
    for pfn, val in sends:
        pfn %= npages
        data = None if val == 0 else bytes([val]) * PAGE
        img.page(pfn * PAGE, data, PAGE)
        expect[pfn * PAGE : (pfn + 1) * PAGE] = data or bytes(PAGE)
    img.flush()
    assert sw.image() == bytes(expect)


def test_whole_chunks_wait_their_turn_so_the_image_is_stored_in_order() -> None:
    """Chunks are stored in the order their first page came: the store packs them in
    that order, and a restore reads the image in address order (a whole chunk stored at
    once, ahead of a partly sent earlier one, scattered an image over its packs: 810
    range reads from S3 instead of 43)."""
    cs = 16 * PAGE
    sw = FakeStream(8 * cs, cs)
    img = RamImage(sw, sw.read_chunk, max_open=3)
    img.page(0, b"\x01" * PAGE, PAGE)  # chunk 0: one page of it so far
    for i in range(1, 8):
        img.page(i * cs, bytes([i]) * cs, cs, 16)  # whole chunks 1..7
    img.page(PAGE, b"\x02" * PAGE, PAGE)  # chunk 0 again (already stored: reopened)
    img.flush()
    assert sw.order[:8] == list(range(8)), sw.order
    assert sw.image()[:PAGE] == b"\x01" * PAGE and sw.image()[PAGE : 2 * PAGE] == b"\x02" * PAGE
    assert sw.image()[cs:] == b"".join(bytes([i]) * cs for i in range(1, 8))


def test_known_whole_chunks_are_recorded_at_once_and_new_ones_keep_their_order() -> None:
    """A whole chunk the store holds already (most of a second capture's RAM) fills its
    slot at once, without waiting among the open chunks or being written; the new ones
    are still stored in the order they came, each hashed once (its id handed on)."""
    cs = 16 * PAGE
    sw = FakeStream(8 * cs, cs)
    known = {i: bytes([i]) * cs for i in (2, 3, 6)}
    for data in known.values():
        sw.chunks[sw.content_id(data)] = data
    told: list[int] = []
    img = RamImage(sw, sw.read_chunk, max_open=3, witness=lambda i, _d, _w: told.append(i))
    img.page(0, b"\x01" * PAGE, PAGE)  # chunk 0: one page of it so far
    for i in range(1, 8):
        img.page(i * cs, known.get(i, bytes([100 + i]) * cs), cs, 16)
    assert sw.present == [2, 3, 6]
    assert [i for i in told if i in known] == [2, 3, 6]  # the witness hears of them too
    img.flush()
    assert sw.order == [0, 1, 4, 5, 7], sw.order
    want = b"\x01" * PAGE + bytes(cs - PAGE)
    want += b"".join(known.get(i, bytes([100 + i]) * cs) for i in range(1, 8))
    assert sw.image() == want
    # a known chunk written to again afterwards is reopened (read back) as before
    img.page(2 * cs, b"\x09" * PAGE, PAGE)
    img.flush()
    assert sw.image()[2 * cs : 2 * cs + PAGE] == b"\x09" * PAGE
    assert img.reopened == 1


def test_memory_stays_bounded_by_open_chunks() -> None:
    sw = FakeStream(1024 * PAGE, 16 * PAGE)
    img = RamImage(sw, sw.read_chunk, max_open=2)
    for pass_ in range(3):
        for pfn in range(0, 1024, 7):
            img.page(pfn * PAGE, bytes([pass_ + 1]) * PAGE, PAGE)
            assert len(img._open) <= 2
    img.flush()
    assert img.reopened > 0


def test_pipe_reader_keeps_draining_after_consumer_error() -> None:
    r, w = os.pipe()

    class Boom:
        n = 0

        def feed(self, data: memoryview) -> None:
            self.n += 1
            raise ValueError("refused")

        def finish(self) -> None:
            raise AssertionError("finish after an error")

    _drained_after_its_error(r, w, PipeReader(r, Boom(), NULL_PROGRESS.task("m")))


def _drained_after_its_error(r: int, w: int, reader: PipeReader) -> None:
    """The writer of 4 MiB never blocks on ``reader`` (whose consumer fails with a
    ValueError): all is read, and the error is the reader's."""
    reader.start()

    def write() -> None:
        for _ in range(64):
            os.write(w, b"x" * 65536)
        os.close(w)

    t = threading.Thread(target=write)
    t.start()
    t.join(30)
    reader.join(30)
    assert not t.is_alive() and not reader.is_alive()
    assert isinstance(reader.error, ValueError)
    assert reader.bytes_read == 64 * 65536


class _Attached:
    """A consumer with a thread of its own that takes the reader's buffers itself."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.got = bytearray()
        self.finished = 0
        self.fail_after = fail_after
        self.thread: threading.Thread | None = None

    def attach(self, take: Any, failed: Any) -> None:
        def run() -> None:
            n = 0
            while (data := take()) is not None:
                self.got += data
                n += 1
                if n == self.fail_after:
                    failed(ValueError("refused"))
                    return

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def feed(self, data: memoryview) -> None:
        raise AssertionError("an attached consumer is not fed")

    def finish(self) -> None:
        assert self.thread is not None
        self.thread.join()
        self.finished += 1


def test_an_attached_consumer_takes_the_buffers_without_a_feeding_thread() -> None:
    r, w = os.pipe()
    consumer = _Attached()
    reader = PipeReader(r, consumer, NULL_PROGRESS.task("m"))
    reader.start()
    payload = os.urandom(3 << 20)
    os.write(w, payload)
    os.close(w)
    reader.join(30)
    assert reader.error is None and bytes(consumer.got) == payload
    assert consumer.finished == 1  # by the reader, once the stream ended
    assert reader._feeder.ident is None  # the control below feeds through it
    fed = _Attached()
    fed.attach = None  # type: ignore[assignment,method-assign]
    fed.feed = lambda data: fed.got.extend(data)  # type: ignore[method-assign]
    r, w = os.pipe()
    reader = PipeReader(r, fed, NULL_PROGRESS.task("m"))
    reader.start()
    os.write(w, payload[:4096])
    os.close(w)
    reader.join(30)
    assert bytes(fed.got) == payload[:4096] and reader._feeder.ident is not None


def test_an_attached_consumer_that_fails_leaves_the_channel_drained() -> None:
    """As with a fed consumer: after its error the rest is read and discarded, so the
    writer (QEMU) never blocks, and the error is the reader's."""
    r, w = os.pipe()
    consumer = _Attached(fail_after=2)
    _drained_after_its_error(
        r, w, PipeReader(r, consumer, NULL_PROGRESS.task("m"), max_buffer=1 << 16)
    )


def test_opaque_memory_appends_everything() -> None:
    r, w = os.pipe()
    sw = FakeStream(0, 1 << 20)
    reader = PipeReader(r, OpaqueMemory(sw), NULL_PROGRESS.task("m"))
    reader.start()
    payload = os.urandom(300_000)
    os.write(w, payload[:100_000])
    os.write(w, payload[100_000:])
    os.close(w)
    reader.join(30)
    assert reader.error is None and bytes(sw.appended) == payload


def test_held_reader_never_blocks_the_writer() -> None:
    """While held (switchover), the pipe is drained past the buffer limit: QEMU writes the
    last pages holding its big lock and must not block on us."""
    r, w = os.pipe()
    fed: list[int] = []

    class Slow:
        def feed(self, data: memoryview) -> None:
            fed.append(len(data))

        def finish(self) -> None:
            pass

    reader = PipeReader(r, Slow(), NULL_PROGRESS.task("m"), max_buffer=1 << 16, max_hold_s=60)
    reader.hold()
    reader.start()
    payload = b"y" * (4 << 20)  # 64 times the buffer limit

    def write_all() -> None:
        os.write(w, payload)
        os.close(w)

    t = threading.Thread(target=write_all)
    t.start()
    t.join(30)
    assert not t.is_alive(), "writer blocked while the reader was held"
    assert fed == []
    reader.go()
    reader.join(30)
    assert sum(fed) == len(payload) and reader.error is None


@settings(max_examples=60, deadline=None)
@given(
    nchunks=st.integers(1, 6),
    max_open=st.integers(1, 3),
    known=st.sets(st.integers(1, 255), max_size=4),
    sends=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 95), st.integers(0, 255)), max_size=120
    ),
)
def test_whole_chunks_zero_runs_and_pages_mixed_give_the_last_write(
    nchunks: int, max_open: int, known: set[int], sends: list[tuple[int, int, int]]
) -> None:
    """Whole chunks as bytes (the parser's runs, stored without a copy when first seen),
    zero runs over several slots (its 2 MiB zero runs: slots first seen, open or already
    stored) and single pages, mixed, with resends of each; some whole chunks are in the
    store already (``known``).  The witness was last told each slot that holds data what
    it holds, and nothing it was told changed afterwards."""
    cs = 16 * PAGE
    size = nchunks * cs
    sw = FakeStream(size, cs)
    for v in known:
        sw.chunks[sw.content_id(bytes([v]) * cs)] = bytes([v]) * cs
    told: dict[int, tuple[bytes | bytearray, bytes, bytes | None]] = {}

    def witness(index: int, data: bytes | bytearray, wire: bytes | None) -> None:
        told[index] = (data, bytes(data), wire)

    img = RamImage(sw, sw.read_chunk, max_open=max_open, witness=witness)
    expect = bytearray(size)
    for kind, n, val in sends:
        if kind == 0:  # zero slots n.. (as many as fit, up to 3)
            first = n % nchunks
            k = min(3, nchunks - first)
            off, length, data = first * cs, k * cs, None
            img.page(off, None, length, 16 * k)
        elif kind == 1:  # a whole chunk, as the parser's runs come (with their records)
            off, length = n % nchunks * cs, cs
            data = bytes([val]) * cs if val else None
            img.page(off, data, length, 16, None if data is None else _records(data))
        else:
            off, length = n % (nchunks * 16) * PAGE, PAGE
            data = bytes([val]) * PAGE if val else None
            img.page(off, data, length)
        expect[off : off + length] = data or bytes(length)
    img.flush()
    assert sw.image() == bytes(expect)
    for index, cid in sw.slots.items():
        if cid != bytes(16):
            content, then, wire = told[index]
            assert bytes(content) == then == sw.chunks[cid], index
            # records told with a slot are those of what it holds, never of earlier content
            assert wire in (None, ms.wire_digest(_records(then))), index


def _records(data: bytes) -> memoryview:
    """Stand-in records a whole chunk was parsed from (their digest names the content)."""
    return memoryview(b"records of " + data)


def test_a_whole_chunk_is_witnessed_with_its_records_until_written_to_again() -> None:
    """The digest of the records a whole chunk came in is told with it -- at once for a
    chunk the store holds, when stored for a new one -- and forgotten once a page of the
    slot is written again (its records are then no longer those).  The control: the
    same slots given without records are told without a digest."""
    cs = 16 * PAGE
    sw = FakeStream(4 * cs, cs)
    known = b"\x02" * cs
    sw.chunks[sw.content_id(known)] = known
    told: list[tuple[int, bytes | None]] = []
    img = RamImage(sw, sw.read_chunk, max_open=8, witness=lambda i, _d, w: told.append((i, w)))
    img.page(0, b"\x01" * cs, cs, 16, _records(b"\x01" * cs))
    img.page(cs, known, cs, 16, _records(known))
    img.page(2 * cs, b"\x03" * cs, cs, 16, _records(b"\x03" * cs))
    img.page(2 * cs + PAGE, b"\x04" * PAGE, PAGE)  # slot 2 written to again
    img.page(3 * cs, b"\x05" * cs, cs, 16)  # no records given
    assert told == [(1, ms.wire_digest(_records(known)))]  # the known one at once
    img.flush()
    assert told[1:] == [(0, ms.wire_digest(_records(b"\x01" * cs))), (2, None), (3, None)]


def test_zero_slots_seen_first_are_holes_at_once() -> None:
    """A zero run over slots never seen stores holes at once (nothing waits among the
    open chunks); a slot already open with data is zeroed, not left as it was."""
    cs = 16 * PAGE
    sw = FakeStream(4 * cs, cs)
    img = RamImage(sw, sw.read_chunk, max_open=8)
    img.page(0, b"\x05" * PAGE, PAGE)  # slot 0 open with data
    img.page(0, None, 3 * cs, 48)  # slots 0-2 zero
    assert sw.order == [1, 2]  # the unseen slots at once; slot 0 stays open
    img.page(3 * cs, b"\x07" * cs, cs, 16)
    img.flush()
    assert sw.image() == bytes(3 * cs) + b"\x07" * cs
    assert sw.slots[0] == bytes(16)


def test_runs_of_holes_are_stored_and_told_a_run_at_a_time() -> None:
    """Whole slots of zero records never seen are stored as holes one run at a time
    (``write_holes``), broken where a slot is open or stored already, and told to
    ``witness_holes`` as those runs; the image is the same as slot by slot.  The control:
    without ``witness_holes`` a witness hears of each hole, with its zeros."""
    cs = 4 * PAGE
    for bulk in (True, False):
        sw = FakeStream(10 * cs, cs)
        told: list[tuple[int, bytes]] = []
        runs: list[tuple[int, int]] = []

        def witness(
            i: int, d: bytes | bytearray, _w: bytes | None, told: list[tuple[int, bytes]] = told
        ) -> None:
            told.append((i, bytes(d)))

        def holes(first: int, n: int, runs: list[tuple[int, int]] = runs) -> None:
            runs.append((first, n))

        img = RamImage(
            sw, sw.read_chunk, max_open=8, witness=witness, witness_holes=holes if bulk else None
        )
        img.page(4 * cs, b"\x05" * PAGE, PAGE)  # slot 4 open with data
        img.page(0, None, 10 * cs, 40)  # every slot zero
        img.flush()
        assert sw.image() == bytes(10 * cs)
        if bulk:
            assert sw.hole_runs == runs == [(0, 4), (5, 5)]
            assert told == [(4, bytes(cs))]  # the open slot, zeroed, when stored
        else:
            assert sw.hole_runs == [] and runs == []
            assert sorted(i for i, _d in told) == list(range(10))
            assert all(d == bytes(cs) for _i, d in told)


def test_a_witness_not_told_of_known_chunks_hears_of_new_ones_only() -> None:
    """``witness_known=False``: neither a known whole chunk nor a known chunk put together
    page by page is told; a new chunk is.  The control: told of all three."""
    cs = 4 * PAGE
    known = bytes([7]) * cs
    for witness_known, want in ((True, {0, 1, 2}), (False, {2})):
        sw = FakeStream(4 * cs, cs)
        sw.chunks[sw.content_id(known)] = known
        told: list[int] = []

        def witness(
            index: int, _data: bytes | bytearray, _w: bytes | None, seen: list[int] = told
        ) -> None:
            seen.append(index)

        img = RamImage(sw, sw.read_chunk, max_open=1, witness=witness, witness_known=witness_known)
        img.page(0, known, cs, 4)  # slot 0: known, whole
        for p in range(4):  # slot 1: known, page by page
            img.page(cs + p * PAGE, bytes([7]) * PAGE, PAGE)
        img.page(2 * cs, bytes([8]) * cs, cs, 4)  # slot 2: new
        img.flush()
        assert set(told) == want and len(told) == len(want), (witness_known, told)
