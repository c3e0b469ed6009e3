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
import queue
import threading
from collections.abc import Iterator
from typing import Any

from vmarchive.format import migstream as ms
from vmarchive.ops.capture_memory import RamImage, _slot_id

log = logging.getLogger(__name__)

DEVSTATE_STREAM = "devstate"
_EOF = b""


class _QueueInput:
    """``read(n)`` over byte strings pushed into a bounded queue (``b""`` = end)."""

    def __init__(self, maxsize: int = 8) -> None:
        self.q: queue.Queue[bytes] = queue.Queue(maxsize=maxsize)
        self._buf = b""
        self._eof = False

    def read(self, n: int = -1, /) -> bytes:
        if not self._buf and not self._eof:
            self._buf = self.q.get()
            if not self._buf:
                self._eof = True
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
            return out
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


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
            )
            self.streams[b.index] = sw
            self.images[b.index] = RamImage(
                sw, self.w.read_chunk, zero_id=getattr(self.w, "zero_id", bytes(16))
            )

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        self.images[block.index].page(offset, data, block.page_size)

    def _devstream(self) -> Any:
        if self.dev is None:
            self.dev = self.w.stream(DEVSTATE_STREAM, "devstate", None, attrs={})
        return self.dev

    def device_section(self, record: ms.SectionRecord, data: memoryview) -> None:
        self._devstream().append(data)

    def vmdesc(self, data: bytes) -> None:
        pass


class ParsedConsumer:
    """Parses the stream as it arrives and stores it as page images + devstate."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.sink = _Sink(w)
        self.input = _QueueInput()
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
            # Keep consuming so the feeder never blocks on a full queue; not when the
            # error was the end itself (a truncated stream): nothing more will come.
            while not self.input._eof and self.input.q.get():
                pass

    def feed(self, data: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self.size += len(data)
        self.input.q.put(bytes(data))

    def finish(self) -> None:
        self.input.q.put(_EOF)
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
        sw = self.sink.streams[block.index]
        cs = int(sw.chunk_size)
        zero = getattr(self.w, "zero_id", bytes(16))
        for i in range(-(-block.used_length // cs)):
            off = i * cs
            n = min(cs, block.used_length - off)
            cid = _slot_id(sw, i)
            yield off, n, (None if cid == zero else self.w.read_chunk(cid))

    def roundtrip(self, w: Any) -> dict[str, Any]:
        """Regenerate the stream from the stored streams, parse it again, compare
        (:func:`vmarchive.format.migstream.check_round_trip`).

        Never raises for a mismatch: the result goes into the manifest.
        """
        assert self.layout is not None
        report = ms.check_round_trip(self.layout, self._read_devstate(), self._stored_extents)
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
