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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from vmarchive.format import migstream as ms
from vmarchive.ops.capture_memory import RamImage, _slot_id

log = logging.getLogger(__name__)

DEVSTATE_STREAM = "devstate"
#: Slots read back per batch by the round trip (at most 8 MiB of 64 KiB chunks).
_READ_BATCH = 128


class _Sink:
    def __init__(self, w: Any) -> None:
        self.w = w
        self.images: dict[int, RamImage] = {}
        self.streams: dict[int, Any] = {}
        self.dev: Any = None

    def header(self, version: int) -> None:
        pass

    def configuration(self, data: bytes) -> None:
        pass

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        for b in blocks:
            sw = self.w.stream(
                f"ram:{b.idstr}",
                "ram",
                b.used_length,
                attrs={"block": b.idstr, "index": b.index, "page_size": b.page_size},
                read_back=True,  # the round trip reads the image back at once
            )
            self.streams[b.index] = sw
            self.images[b.index] = RamImage(
                sw, self.w.read_chunk, zero_id=getattr(self.w, "zero_id", bytes(16))
            )

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        self.images[block.index].page(offset, data, block.page_size)

    def ram_pages(self, block: ms.RamBlock, offset: int, data: bytes | None, count: int) -> None:
        self.images[block.index].page(offset, data, count * block.page_size, count)

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
    from the regenerator to the parser.  Pages arrive in order, once each.
    """

    def __init__(self, w: Any, blocks: list[ms.RamBlock], streams: dict[int, Any]) -> None:
        self.w = w
        self.blocks = {b.index: b for b in blocks}
        self.streams = streams
        self.open: dict[int, tuple[int, bytearray]] = {}
        self.checked = 0
        self.bad: list[str] = []

    def page(self, block: ms.RamBlock, offset: int, data: bytes | memoryview | None) -> None:
        self.pages(block, offset, data, 1)

    def pages(
        self, block: ms.RamBlock, offset: int, data: bytes | memoryview | None, count: int
    ) -> None:
        """``count`` pages at consecutive offsets (``data`` back to back; None: zero)."""
        cs = int(self.streams[block.index].chunk_size)
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
        self.checked += 1
        if self.w.content_id(buf) != _slot_id(self.streams[bidx], index) and len(self.bad) < 10:
            name = self.blocks[bidx].idstr
            self.bad.append(f"RAM block {name!r} slot {index} differs after the round trip")

    def problems(self) -> list[str]:
        for bidx, (index, buf) in self.open.items():
            self._check(bidx, index, buf)
        self.open.clear()
        return self.bad


class ParsedConsumer:
    """Parses the stream as it arrives and stores it as page images + devstate."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.sink = _Sink(w)
        self.input = ms.BufferPipe(depth=8)
        self.layout: ms.StreamLayout | None = None
        self.error: BaseException | None = None
        self.size = 0
        self._thread = threading.Thread(target=self._run, name="migration-parser", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.layout = ms.parse_stream(self.input, self.sink)
            for img in self.sink.images.values():
                img.flush()
        except BaseException as e:
            log.debug("parser stopped", exc_info=True)
            self.error = e
            self.input.reader_gone = True  # a feeder waiting on the full pipe gives up

    def feed(self, data: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.size += len(data)
        try:
            self.input.write(data)
        except BrokenPipeError:
            assert self.error is not None  # the parser stopped: its error is the cause
            raise self.error from None

    def finish(self) -> None:
        self.input.close_write()
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
    def _stored_extents(self, block: ms.RamBlock) -> Iterator[tuple[int, int, bytes | None]]:
        """The block's slots as stored, read back in batches (adjacent chunks of a pack
        with one range read: one read per 64 KiB chunk was most of the round trip)."""
        sw = self.sink.streams[block.index]
        cs = int(sw.chunk_size)
        zero = getattr(self.w, "zero_id", bytes(16))
        nslots = -(-block.used_length // cs)
        for first in range(0, nslots, _READ_BATCH):
            ids = [_slot_id(sw, i) for i in range(first, min(first + _READ_BATCH, nslots))]
            data = iter(self.w.read_chunks([c for c in ids if c != zero]))
            for i, cid in enumerate(ids, first):
                off = i * cs
                n = min(cs, block.used_length - off)
                yield off, n, (None if cid == zero else next(data))

    def roundtrip(self, w: Any) -> dict[str, Any]:
        """Regenerate the stream from the stored streams, parse it again, compare
        (:func:`vmarchive.format.migstream.check_round_trip`).

        Never raises for a mismatch: the result goes into the manifest.
        """
        assert self.layout is not None
        check = _SlotCheck(self.w, self.layout.ram_blocks, self.sink.streams)
        report = ms.check_round_trip(
            self.layout, self._read_devstate(), self._stored_extents, page_check=check
        )
        if not report.ok:
            log.warning("memory stream does not round-trip: %s", "; ".join(report.problems))
        return {
            "ok": report.ok,
            "problems": list(report.problems),
            "stream_bytes": report.stream_bytes,
            "pages": report.pages,
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
