"""Bridge from the migration stream parser to store streams (ops layer).

:class:`ParsedConsumer` receives the raw stream bytes (pushed by the pipe reader) and runs
:func:`vmarchive.format.migstream.parse_stream` on them in its own thread.  Its sink writes

* one ``ram`` stream per RAMBlock (``ram:<idstr>``; attrs: block, index, page size), each
  page's final content (later precopy passes rewrite their chunk, see
  :class:`~vmarchive.ops.capture_memory.RamImage`), zero pages as holes;
* one ``devstate`` stream: the device section bodies, verbatim, in stream order; its attrs
  carry the parser's :class:`StreamLayout` (header, configuration, blocks, section
  records, vmdesc) under ``"layout"``.

:meth:`ParsedConsumer.roundtrip` regenerates a stream from what was stored and parses it
again: the layout, the device state and a digest of every RAM page must come back equal.

A RAM slot holding the same chunk (or hole) at the same place as in the parent archive,
whose own round trip passed with the same code (:func:`checker_id`), is left out of the
regenerated stream and not read back again: the records the regenerator writes for a slot
depend only on its block, its offset and its content, so the parent's check already proved
those bytes (:class:`ParentMemory`).  A block's first slot is always checked: its first
record names the block, the others continue it, in the check as in the restore.

The same argument lets a capture check its slots while it still holds them
(:class:`_LiveCheck`, snapshot captures): batches of the slots the parser stores are
regenerated and parsed back beside the parse, and those that still hold the same chunk at
the end are left out of the final round trip -- which then reads back from the repository
only what neither the parent nor the live checks covered, instead of the whole RAM (no
parent) or every changed slot.

Most slots need no stream of their own for that: a slot whose pages came as one group of
CONTINUE page records (the parser's runs) is proven when the regenerator, asked for the
records of its content where the block continues, writes those very bytes again
(:func:`~vmarchive.format.migstream.records_digest` against the digest of the records
read): identical bytes parse as they did in the capture, into the content whose id the slot
holds.  That ties the stored slot to what QEMU sent, which a stream parsed back does not (it
compares the regenerator with what was stored), at a quarter of its cost.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import xxhash

from vmarchive.format import migstream as ms
from vmarchive.ops.capture_memory import RamImage, _slot_id

log = logging.getLogger(__name__)

DEVSTATE_STREAM = "devstate"
#: Slots read back per batch by the round trip (at most 4 MiB of 64 KiB chunks), and the
#: batches being read at once.  The memory packs are read back from the device (O_DIRECT):
#: one 8 MiB batch at a time kept one request in flight, and the round trip of a first
#: capture waited on it (0.47-0.53 s for a 512 MiB guest here); three of 4 MiB keep the
#: device busier (0.35-0.46 s) and hold no more memory (16 MiB with the batch in use).
_READ_BATCH = 64
_READS_AHEAD = 3
#: Slots per live check (at most 8 MiB of 64 KiB chunks), and the batches that may wait
#: for the checker: the parser never waits for it, a batch that finds no room is left to
#: the round trip at the end (read back from the repository then).  Smaller batches cost
#: more: first captures of the bench guest took 1.40 / 1.36 / 1.27 s (medians of 5) with
#: 32 / 64 / 128 slots; 256 was no faster than 128 and held ~20 MiB more at its peak.
_LIVE_BATCH = 128
_LIVE_WAITING = 2
#: Slots per live check, holes included: a hole holds no memory and its zero records cost
#: little to regenerate and parse back, but every batch costs a stream of its own.
_LIVE_SLOTS = 16 * _LIVE_BATCH
#: The vmdesc of a live check's stream, which carries no device sections.
_NO_DEVICES = b'{"page_size": 4096, "devices": []}'


@functools.cache
def checker_id() -> str | None:
    """Names the code of the round trip (the regenerator, the parser and the slot check):
    a digest of the two modules' files, so any change to them gives another id.  None
    when the files cannot be read (then no round trip is taken over from a parent)."""
    h = xxhash.xxh3_64()
    for mod in (ms, sys.modules[__name__]):
        try:
            h.update(Path(str(mod.__file__)).read_bytes())
        except (OSError, TypeError):
            return None
    return h.hexdigest()


class ParentBlock(msgspec.Struct, frozen=True):
    """One RAM block of the parent archive: its length, chunk and page size, slot table."""

    size: int
    chunk_size: int
    page_size: int
    table: bytes


class ParentMemory(msgspec.Struct, frozen=True):
    """The RAM slots of a parent archive whose round trip passed with this code."""

    archive: str
    blocks: Mapping[str, ParentBlock]

    @classmethod
    def of(cls, archive: Any) -> ParentMemory | None:
        """From a loaded archive (``store.Archive``); None unless its memory was parsed,
        its round trip passed and was made by the same code (:func:`checker_id`)."""
        mem = archive.metadata.get("memory")
        rt = mem.get("roundtrip") if isinstance(mem, dict) else None
        mine = checker_id()
        if not isinstance(rt, dict) or rt.get("ok") is not True or mine is None:
            return None
        if mem.get("format") != "parsed" or rt.get("checker") != mine:
            return None
        blocks = {}
        for st in archive.streams:
            a = st.attrs
            if st.kind == "ram" and isinstance(a.get("block"), str) and a.get("page_size"):
                blocks[a["block"]] = ParentBlock(
                    st.size, st.chunk_size, int(a["page_size"]), bytes(st.table)
                )
        return cls(archive.id, blocks) if blocks else None


class _Sink:
    def __init__(self, w: Any) -> None:
        self.w = w
        self.live: _LiveCheck | None = None  # set by the consumer, which owns it
        self.images: dict[int, RamImage] = {}
        self.streams: dict[int, Any] = {}
        self.dev: Any = None
        self.version = 0
        self.config = b""
        self.ram: ms.RamSection | None = None

    def header(self, version: int) -> None:
        self.version = version

    def configuration(self, data: bytes) -> None:
        self.config = bytes(data)

    def ram_section(self, ram: ms.RamSection) -> None:
        self.ram = ram

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        live = self.live
        if live is not None:
            live.start(
                ms.StreamLayout(self.version, self.config, self.ram, blocks, [], _NO_DEVICES)
            )
        for b in blocks:
            sw = self.w.stream(
                f"ram:{b.idstr}",
                "ram",
                b.used_length,
                attrs={"block": b.idstr, "index": b.index, "page_size": b.page_size},
                # the round trip reads the image back at once, unless checked live
                read_back=live is None,
            )
            self.streams[b.index] = sw
            self.images[b.index] = RamImage(
                sw,
                self.w.read_chunk,
                zero_id=getattr(self.w, "zero_id", bytes(16)),
                witness=None if live is None else functools.partial(live.offer, b.index),
                witness_holes=None
                if live is None
                else functools.partial(live.offer_holes, b.index),
                # known chunks are mostly the parent's, at the same place: its round trip
                # vouches for those, and the others are few enough to read back
                witness_known=live is None or not live.vouched,
            )

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        self.images[block.index].page(offset, data, block.page_size)

    def ram_pages(self, block: ms.RamBlock, offset: int, data: bytes | None, count: int) -> None:
        self.images[block.index].page(offset, data, count * block.page_size, count)

    def ram_pages_wired(
        self, block: ms.RamBlock, offset: int, data: bytes, count: int, wire: memoryview
    ) -> None:
        # the records read are of use to the live checks only (_LiveCheck.offer)
        self.images[block.index].page(
            offset, data, count * block.page_size, count, None if self.live is None else wire
        )

    def _devstream(self) -> Any:
        if self.dev is None:
            self.dev = self.w.stream(DEVSTATE_STREAM, "devstate", None, attrs={}, read_back=True)
        return self.dev

    def device_section(self, record: ms.SectionRecord, data: memoryview) -> None:
        self._devstream().append(data)

    def vmdesc(self, data: bytes) -> None:
        pass


class _SlotCheck:
    """The round trip's page check: the pages parsed back from the regenerated stream, cut
    into each ``ram`` stream's slots, must have the chunk ids the capture recorded there.

    So the proof reaches back to the live capture (whose pages made those ids), not only
    from the regenerator to the parser.  Pages arrive in order, once each.  The slots in
    ``inherited`` (block index -> slot indexes) were left out of the regenerated stream:
    none of their pages may come back, and every other slot must.
    """

    def __init__(
        self,
        w: Any,
        blocks: list[ms.RamBlock],
        streams: dict[int, Any],
        inherited: Mapping[int, set[int]] | None = None,
        expect: Mapping[int, Mapping[int, bytes]] | None = None,
    ) -> None:
        self.w = w
        self.blocks = {b.index: b for b in blocks}
        self.streams = streams
        self.inherited = inherited or {}
        #: block index -> slot -> id: these slots must come back with these ids, no other
        #: (a live check's stream); None: every slot not inherited, with its id now
        self.expect = expect
        self.zero = getattr(w, "zero_id", bytes(16))
        self.open: dict[int, tuple[int, bytearray]] = {}
        self._per_block: dict[int, int] = dict.fromkeys(self.blocks, 0)  # slots checked
        self.bad: list[str] = []

    @property
    def checked(self) -> int:
        """Slots checked so far, all blocks."""
        return sum(self._per_block.values())

    def _want(self, bidx: int, index: int) -> bytes | None:
        """The id the slot must have after the round trip (None: it must not come back)."""
        if self.expect is not None:
            return self.expect.get(bidx, {}).get(index)
        if index in self.inherited.get(bidx, ()):
            return None
        return _slot_id(self.streams[bidx], index)

    def page(self, block: ms.RamBlock, offset: int, data: bytes | memoryview | None) -> None:
        self.pages(block, offset, data, 1)

    def pages(
        self, block: ms.RamBlock, offset: int, data: bytes | memoryview | None, count: int
    ) -> None:
        """``count`` pages at consecutive offsets (``data`` back to back; None: zero)."""
        cs = int(self.streams[block.index].chunk_size)
        length = count * block.page_size
        if data is None and not offset % cs and not length % cs:
            # whole slots of zero records (holes, inherited slots): no buffer to hash.  A
            # slot still open is an earlier one (pages come in order): complete.
            cur = self.open.pop(block.index, None)
            if cur is not None:
                self._check(block.index, *cur)
            for index in range(offset // cs, (offset + length) // cs):
                self._check_zero(block.index, index)
            return
        if isinstance(data, bytes) and len(data) == cs and not offset % cs:
            # a whole chunk in one piece (the parser's runs): its id directly, once the
            # slot before it (complete: pages come in order) is checked
            cur = self.open.get(block.index)
            if cur is None or cur[0] != offset // cs:
                if cur is not None:
                    self._check(block.index, *self.open.pop(block.index))
                self._check(block.index, offset // cs, data)
                return
        mv = None if data is None else memoryview(data)
        end = offset + count * block.page_size
        while offset < end:
            index = offset // cs
            n = min(end, (index + 1) * cs) - offset  # bytes of the run in this slot
            cur = self.open.get(block.index)
            if cur is None or cur[0] != index:
                if cur is not None:
                    self._check(block.index, *cur)
                cur = (index, bytearray(min(cs, block.used_length - index * cs)))
                self.open[block.index] = cur
            if mv is not None:
                within = offset - index * cs
                cur[1][within : within + n] = mv[:n]
                mv = mv[n:]
            offset += n

    def _check(self, bidx: int, index: int, buf: bytes | bytearray) -> None:
        self._per_block[bidx] += 1
        if self.w.content_id(buf) != self._want(bidx, index):
            self._differs(bidx, index)

    def _check_zero(self, bidx: int, index: int) -> None:
        self._per_block[bidx] += 1
        if self._want(bidx, index) != self.zero:
            self._differs(bidx, index)

    def _differs(self, bidx: int, index: int) -> None:
        if len(self.bad) < 10:
            name = self.blocks[bidx].idstr
            self.bad.append(f"RAM block {name!r} slot {index} differs after the round trip")

    def problems(self) -> list[str]:
        for bidx, (index, buf) in self.open.items():
            self._check(bidx, index, buf)
        self.open.clear()
        for bidx, b in self.blocks.items():
            cs = int(self.streams[bidx].chunk_size)
            if self.expect is not None:
                want = len(self.expect.get(bidx, ()))
            else:
                want = -(-b.used_length // cs) - len(self.inherited.get(bidx, ()))
            if self._per_block[bidx] != want:
                self.bad.append(
                    f"RAM block {b.idstr!r}: {self._per_block[bidx]} slots came back"
                    f" after the round trip, {want} expected"
                )
        return self.bad


#: A slot offered to the live checks: its index, content (None: a hole), chunk id, and the
#: digest of the records it was parsed from when they were one group (else None).
_Offered = tuple[int, "bytes | bytearray | None", bytes, "bytes | None"]


class _LiveCheck:
    """Round trips of RAM slots while the parser still holds their content.

    Without a parent to vouch for it, the round trip at the end reads back every RAM slot
    from the repository: for a first capture of the bench guest 350 MB from the device,
    beside the disk reads, 0.34 s of its 0.46 s; with one, every slot that changed.  With
    a parent whose round trip covers this code (``vouched``) only chunks new to the
    repository are offered: a known one is mostly the parent's at the same place.  Here
    each slot the sink stores (its content and id, :class:`RamImage`'s witness; a hole
    without its zeros; with the digest of its records when they were one group) joins a
    batch, which a thread of its own checks: a slot with such a digest by its records
    (module docstring), the others by regenerating them as a stream of their own -- the
    stream's header, configuration and block list, those slots, every other slot UNSENT,
    no device sections --, parsed back and the pages compared with the ids.  A slot's
    records depend only on its block, offset and content, and on whether they open the
    block (module docstring), so a slot proven here that holds the same chunk at the end
    is left out of the final round trip.

    Not proven here: a stream's first slot (its first record names the block here; in the
    restore it continues the block) -- the batch's lead, the previous batch's last slot,
    proven there --, slots rewritten after their check (their id changed), slots of a
    stream that failed, and batches dropped because the checker was behind: the parser
    never waits for it.  The final round trip checks those as before.
    """

    def __init__(self, w: Any, streams: dict[int, Any]) -> None:
        self.w = w
        self.streams = streams
        self.zero = getattr(w, "zero_id", bytes(16))
        self.layout: ms.StreamLayout | None = None
        #: block index -> slot -> the id the slot was proven with
        self.proven: dict[int, dict[int, bytes]] = {}
        #: block index -> the slots of ``proven`` proven by the records read, not a stream
        self.by_records: dict[int, set[int]] = {}
        self.dropped = 0  # batches
        self.failed = 0  # batches whose check did not pass
        #: a parent's round trip covers this code: only new chunks are offered
        self.vouched = False
        self._block = -1
        #: (slot, content or None for a hole, id, wire digest or None): the batch being
        #: filled
        self._batch: list[_Offered] = []
        self._data = 0  # slots of the batch that hold data
        self._lead: _Offered | None = None
        self._waiting: queue.Queue[tuple[int, list[Any]] | None] = queue.Queue(_LIVE_WAITING)
        self._stop = False
        self._closed = False  # the end is queued
        self._thread = threading.Thread(target=self._run, name="memory-livecheck", daemon=True)

    def start(self, layout: ms.StreamLayout) -> None:
        """The stream's head is known (at its block list): checks may begin."""
        self.layout = layout
        self._thread.start()

    def offer(self, bidx: int, index: int, data: bytes | bytearray, wire: bytes | None) -> None:
        """Slot ``index`` of block ``bidx`` holds ``data`` now (the parser's thread);
        ``wire``: the :func:`~vmarchive.format.migstream.wire_digest` of the records it
        was parsed from, when they were one group (:class:`RamImage`)."""
        if self._stop:
            return
        cid = _slot_id(self.streams[bidx], index)
        self._room(bidx)
        # A hole is checked here too, without its zeros: nothing is read back for it at
        # the end either, but its records were regenerated and parsed there, after the
        # capture: the round trip of a first capture of an 8 GiB guest with 0.25 GiB in
        # use (130,000 holes) took 0.62-0.72 s at the end, 0.14-0.16 s with the holes
        # checked here; of the bench guest (2,900 holes) 60-70 ms, 20-50 ms.
        hole = cid == self.zero
        self._batch.append((index, None if hole else data, cid, None if hole else wire))
        self._data += not hole

    def offer_holes(self, bidx: int, first: int, count: int) -> None:
        """Slots ``first`` .. ``first + count - 1`` of block ``bidx`` are holes now, stored
        at once (:meth:`offer` of each, without a Python step per slot)."""
        while count > 0 and not self._stop:
            self._room(bidx)
            k = max(1, min(count, _LIVE_SLOTS - len(self._batch)))
            self._batch += zip(
                range(first, first + k),
                itertools.repeat(None),
                itertools.repeat(self.zero),
                itertools.repeat(None),
            )
            first += k
            count -= k

    def _room(self, bidx: int) -> None:
        """The batch being filled is for ``bidx`` and has room for a slot."""
        if bidx != self._block or self._data >= _LIVE_BATCH or len(self._batch) >= _LIVE_SLOTS:
            self._submit()
            if bidx == self._block and self._lead is not None:
                # the previous batch's last slot leads the next one: its first record,
                # which names the block, proves nothing, and that slot is proven already
                self._batch.append(self._lead)
                self._data = int(self._lead[1] is not None)
            self._block = bidx

    def _submit(self) -> None:
        batch, self._batch = self._batch, []
        self._data = 0
        self._lead = batch[-1] if batch else None
        if batch:
            try:
                self._waiting.put_nowait((self._block, batch))
            except queue.Full:
                self.dropped += 1
                self._lead = None

    def close(self) -> None:
        """The last slot was offered (or the parser stopped): check what is pending."""
        if self._thread.ident is None or self._closed:
            return
        self._closed = True
        self._submit()
        self._waiting.put(None)  # the thread takes every batch: there is room soon

    def stop(self) -> None:
        """Nothing more is checked; the thread ends once it has taken what waits."""
        self._stop = True
        self.close()

    def taken(self) -> dict[int, set[int]]:
        """Waits for the checks; block index -> the slots proven that hold the same chunk
        now (a block's slot 0 excepted: the final round trip always checks it)."""
        if self._thread.ident is None:
            return {}
        self._thread.join()
        out: dict[int, set[int]] = {}
        for bidx, slots in self.proven.items():
            # the table once, not a copy of each id (a large guest's holes: ~10^5 slots)
            tbl = self.streams[bidx].table()
            zero = self.zero  # past the table's end: unwritten, a hole
            out[bidx] = {
                i for i, cid in slots.items() if i and (tbl[16 * i : 16 * i + 16] or zero) == cid
            }
        return out

    def _run(self) -> None:
        while True:
            item = self._waiting.get()
            if item is None:
                return
            if self._stop:
                continue
            try:
                self._check(*item)
            except Exception:  # the final round trip checks what was not proven
                log.debug("live round trip check stopped", exc_info=True)
                self._stop = True

    def _check(self, bidx: int, batch: list[_Offered]) -> None:
        layout = self.layout
        assert layout is not None
        slots = {index: (data, cid, wire) for index, data, cid, wire in batch}  # the last counts
        order = sorted(slots)
        cs = int(self.streams[bidx].chunk_size)
        ram_block = layout.ram_blocks[bidx]  # a block's index is its place in the list
        proven = self.proven.setdefault(bidx, {})
        by_records = self.by_records.setdefault(bidx, set())
        # A slot that came as one group of records, which the regenerator writes again
        # byte for byte: those bytes parse as they did in the capture, into this content.
        # Regenerating its records into a digest costs a fraction of a stream parsed back
        # (first capture of the bench guest: ~0.1 against ~0.4 s of CPU for 5,300 slots).
        # Any other slot, and one whose records come out otherwise (a zero page the
        # capture got as a data record), goes through a stream of its own, as before.
        rest = []
        for index in order:
            data, cid, wire = slots[index]
            if (
                wire is not None
                and data is not None
                and ms.records_digest(ram_block, index * cs, data) == wire
            ):
                proven[index] = cid
                by_records.add(index)
            else:
                rest.append(index)
        if not rest:
            return
        # the stream's first slot names the block and proves nothing: the batch's lead
        # (proven by the batch before) where it is not among the rest
        mini = rest if rest[0] == order[0] else [order[0], *rest]
        if len(mini) < 2:
            return

        def source(block: ms.RamBlock) -> Iterator[ms.RamExtent]:
            done = 0
            for index in mini if block.index == bidx else ():
                off = index * cs
                if off > done:
                    yield done, off - done, ms.UNSENT
                data = slots[index][0]
                if data is None:
                    # a hole is left out: a gap, which the regenerator fills with zero
                    # records (runs merged), as _stored_extents leaves them
                    done = min(off + cs, block.used_length)
                    continue
                yield off, len(data), data
                done = off + len(data)
            if done < block.used_length:
                yield done, block.used_length - done, ms.UNSENT

        expect = {bidx: {i: slots[i][1] for i in mini}}
        check = _SlotCheck(self.w, layout.ram_blocks, self.streams, expect=expect)
        report = ms.check_round_trip(layout, b"", source, page_check=check)
        if not report.ok:
            self.failed += 1
            log.debug("live round trip of %d slots: %s", len(mini), "; ".join(report.problems))
            return
        for index in mini[1:]:
            proven[index] = slots[index][1]
            by_records.discard(index)


class ParsedConsumer:
    """Parses the stream as it arrives and stores it as page images + devstate.

    ``live_check``: check the RAM slots as they are stored (:class:`_LiveCheck`), for a
    capture whose pages come once each (a background snapshot: precopy resends would be
    checked again and again); :meth:`take_parent` narrows it to the new chunks.
    """

    def __init__(self, w: Any, *, live_check: bool = False) -> None:
        self.w = w
        self.sink = _Sink(w)
        self.live = _LiveCheck(w, self.sink.streams) if live_check else None
        self.sink.live = self.live
        self.input = ms.BufferPipe(depth=8)
        self.layout: ms.StreamLayout | None = None
        self.error: BaseException | None = None
        self.size = 0
        self._failed: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._run, name="migration-parser", daemon=True)

    def _run(self) -> None:
        try:
            self.layout = ms.parse_stream(self.input, self.sink)
            for img in self.sink.images.values():
                img.flush()
            if self.live is not None:
                self.live.close()
        except BaseException as e:
            log.debug("parser stopped", exc_info=True)
            if self.live is not None:
                self.live.stop()
            self.error = e
            self.input.reader_gone = True  # a feeder waiting on the full pipe gives up
            if self._failed is not None:
                self._failed(e)

    def abandon(self, timeout: float = 60.0) -> None:
        """The capture failed, its stream has ended: the live checks stop and their thread
        is joined (it only finishes the batch in hand)."""
        live = self.live
        if live is None or self._thread.ident is None:
            return
        self._thread.join(timeout)  # the parser closes or stops the live checks as it ends
        if not self._thread.is_alive():
            live.stop()
            live._thread.join(timeout)

    def take_parent(self, parent: Any | None) -> None:
        """Before the stream: the round trip may take slots from ``parent`` (an archive).
        Where its round trip covers this code (:meth:`ParentMemory.of`), only the chunks
        new to the repository are checked live: a known chunk is mostly the parent's at the
        same place, which needs no check, and the others are few enough to read back (and
        asking which is which would cost the parser's thread ~1 us per slot)."""
        assert self._thread.ident is None, "take_parent after the stream started"
        if self.live is not None and parent is not None and ParentMemory.of(parent) is not None:
            self.live.vouched = True

    def _start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def attach(
        self, take: Callable[[], bytes | None], failed: Callable[[BaseException], None]
    ) -> None:
        """Parse the buffers ``take()`` gives (None: the end) in the parser's thread, in
        place of :meth:`feed`: the channel reader's queue, without a thread between that
        hands each buffer on (~400 of them in a second capture, 6-7 ms of CPU).  ``failed``
        is told the parser's error as it stops (the reader then reads on and discards)."""

        def counted() -> bytes | None:
            data = take()
            if data:
                self.size += len(data)
            return data

        self._failed = failed
        self.input = ms.BufferPipe(source=counted)
        self._start()

    def feed(self, data: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._start()
        self.size += len(data)
        try:
            self.input.write(data)
        except BrokenPipeError:
            assert self.error is not None  # the parser stopped: its error is the cause
            raise self.error from None

    def finish(self) -> None:
        """After the last :meth:`feed`, or once :meth:`attach`'s source has ended."""
        if self._failed is None:
            self.input.close_write()
        self._start()
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.layout is not None
        dev = self.sink._devstream()
        dev.attrs["layout"] = self.layout.to_json()

    def summary(self) -> dict[str, Any]:
        lay = self.layout
        out: dict[str, Any] = {"format": "parsed", "refused": None, "stream_bytes": self.size}
        if lay is not None:
            st = lay.stats
            out.update(
                {
                    "blocks": [
                        {"name": b.idstr, "size": b.used_length, "page_size": b.page_size}
                        for b in lay.ram_blocks
                    ],
                    "device_sections": len(lay.records),
                    "devstate_bytes": lay.devstate_size,
                    "page_records": st.page_records,
                    "zero_records": st.zero_records,
                    "resent_pages": st.resent_pages,
                    "unsent_pages": st.unsent_pages,
                    "chunks_reopened": sum(i.reopened for i in self.sink.images.values()),
                }
            )
        return out

    def close_streams(self) -> int:
        n = 0
        for sw in [*self.sink.streams.values(), self.sink._devstream()]:
            n += int(sw.close().bytes_new)
        return n

    # -- round trip ------------------------------------------------------------------------
    def _inherited(self, parent: ParentMemory | None) -> dict[int, set[int]]:
        """Block index -> the slots holding the parent's chunk at the same place."""
        out: dict[int, set[int]] = {}
        if parent is None or self.layout is None:
            return out
        for b in self.layout.ram_blocks:
            p = parent.blocks.get(b.idstr)
            sw = self.sink.streams[b.index]
            cs = int(sw.chunk_size)
            if p is None or (p.size, p.chunk_size, p.page_size) != (b.used_length, cs, b.page_size):
                continue
            mine = sw.table()
            mine += bytes(max(0, len(p.table) - len(mine)))  # unwritten slots: holes
            n = len(p.table) // 16
            same = set(range(1, n))  # slot 0: see the module's docstring
            # groups of 16 slots compared at once; slot by slot only where they differ
            for g in range(0, 16 * n, 256):
                if mine[g : g + 256] != p.table[g : g + 256]:
                    for at in range(g, min(g + 256, 16 * n), 16):
                        if mine[at : at + 16] != p.table[at : at + 16]:
                            same.discard(at // 16)
            out[b.index] = same
        return out

    def _stored_extents(
        self, block: ms.RamBlock, skip: set[int] | frozenset[int] = frozenset()
    ) -> Iterator[ms.RamExtent]:
        """The block's slots as stored, read back in batches (adjacent chunks of a pack
        with one range read: one read per 64 KiB chunk was most of the round trip); holes
        are left out (gaps, which the regenerator fills with zero records), the slots in
        ``skip`` are :data:`~vmarchive.format.migstream.UNSENT` runs (no records), neither
        is read."""
        sw = self.sink.streams[block.index]
        cs = int(sw.chunk_size)
        zero = getattr(self.w, "zero_id", bytes(16))
        nslots = -(-block.used_length // cs)
        # Python work per slot only for the slots to send: an idle guest's are a few
        todo = [i for i in range(nslots) if i not in skip] if skip else range(nslots)

        def batch(k: int) -> tuple[list[int], list[bytes], list[bytes | memoryview]]:
            slots = list(todo[k : k + _READ_BATCH])
            ids = [_slot_id(sw, i) for i in slots]
            return slots, ids, self.w.read_chunks([c for c in ids if c != zero])

        # The next batches are read while this one is regenerated: their range reads and
        # their decompression release the GIL, so they run beside the regenerator and the
        # parser.  Taken in order (a queue of futures), whichever read ends first.
        done = 0  # offset up to which the block is accounted for
        starts = iter(range(0, len(todo), _READ_BATCH))
        with ThreadPoolExecutor(_READS_AHEAD, thread_name_prefix="roundtrip-read") as pool:
            ahead = collections.deque(
                pool.submit(batch, k) for k in itertools.islice(starts, _READS_AHEAD)
            )
            while ahead:
                slots, ids, chunks = ahead.popleft().result()
                k = next(starts, None)
                if k is not None:
                    ahead.append(pool.submit(batch, k))
                data = iter(chunks)
                for i, cid in zip(slots, ids, strict=True):
                    off = i * cs
                    if off > done:
                        yield done, off - done, ms.UNSENT  # slots skipped
                    done = min(off + cs, block.used_length)
                    if cid == zero:
                        continue  # a gap: the regenerator writes zero records, runs merged
                    yield off, done - off, next(data)
        if done < block.used_length:
            yield done, block.used_length - done, ms.UNSENT

    def roundtrip(self, w: Any, parent: ParentMemory | None = None) -> dict[str, Any]:
        """Regenerate the stream from the stored streams, parse it again, compare
        (:func:`vmarchive.format.migstream.check_round_trip`).  The RAM slots that hold
        ``parent``'s chunk (or hole) at the same place are left out of the regenerated
        stream and not read back: the parent's round trip proved them (see the module's
        docstring); so are the slots the live checks proved (:class:`_LiveCheck`).

        Never raises for a mismatch: the result goes into the manifest.
        """
        assert self.layout is not None
        inherited = self._inherited(parent)
        taken = sum(len(v) for v in inherited.values())
        live = by_records = 0
        if self.live is not None:
            for bidx, slots in self.live.taken().items():
                have = inherited.setdefault(bidx, set())
                live += len(slots - have)
                by_records += len((slots - have) & self.live.by_records.get(bidx, set()))
                have |= slots
        check = _SlotCheck(self.w, self.layout.ram_blocks, self.sink.streams, inherited)

        def source(block: ms.RamBlock) -> Iterator[ms.RamExtent]:
            return self._stored_extents(block, inherited.get(block.index, frozenset()))

        report = ms.check_round_trip(self.layout, self._read_devstate(), source, page_check=check)
        if not report.ok:
            log.warning("memory stream does not round-trip: %s", "; ".join(report.problems))
        return {
            "ok": report.ok,
            "problems": list(report.problems),
            "stream_bytes": report.stream_bytes,
            "pages": report.pages,
            "checker": checker_id(),
            "slots_checked": check.checked,
            "slots_from_parent": taken,
            "parent": parent.archive if parent is not None and taken else None,
            "slots_checked_live": live,
            "slots_checked_by_records": by_records,
        }

    def _read_devstate(self) -> bytes:
        dev = self.sink._devstream()
        out = bytearray()
        zero = getattr(self.w, "zero_id", bytes(16))
        cs = int(dev.chunk_size)
        size = int(dev.size) if dev.size is not None else 0
        for i in range(-(-size // cs)):
            cid = _slot_id(dev, i)
            n = min(cs, size - i * cs)
            out += bytes(n) if cid == zero else self.w.read_chunk(cid)
        return bytes(out)
