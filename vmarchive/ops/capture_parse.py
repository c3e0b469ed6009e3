"""Memory consumers of a capture: parsed page images, or the opaque stream (ops layer).

:func:`make_consumer` returns what :class:`vmarchive.ops.capture_memory.PipeReader` feeds.
The parsed consumer bridges the STREAM parser (:mod:`vmarchive.format.migstream`) to
store streams: one ``ram`` stream per RAMBlock (:class:`RamImage`), one ``devstate``
stream with the verbatim non-RAM bytes and the parser's layout in its attrs.  When the
parser refuses the stream the capture is retried opaquely (kind ``stream``), and the
archive says why.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from typing import Any, Protocol

from vmarchive.ops.capture_memory import OpaqueMemory

log = logging.getLogger(__name__)

OPAQUE_STREAM = "migration"


class MemoryConsumer(Protocol):
    def feed(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...

    def summary(self) -> dict[str, Any]: ...

    def close_streams(self) -> int: ...


class OpaqueConsumer:
    """The raw migration stream as one ``stream`` (fixed chunks)."""

    def __init__(self, w: Any, reason: str | None) -> None:
        self.sw = w.stream(OPAQUE_STREAM, "stream", None, attrs={"refused": reason})
        self._inner = OpaqueMemory(self.sw)
        self.reason = reason
        self.size = 0

    def feed(self, data: memoryview) -> None:
        self.size += len(data)
        self._inner.feed(data)

    def finish(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {"format": "opaque", "refused": self.reason, "stream_bytes": self.size}

    def close_streams(self) -> int:
        return int(self.sw.close().bytes_new)


def parser_available() -> bool:
    return importlib.util.find_spec("vmarchive.format.migstream") is not None


def make_consumer(
    w: Any, parse: bool, refused: str | None = None, *, snapshot: bool = False
) -> MemoryConsumer:
    """The consumer for one capture attempt.  ``snapshot``: the pages come once each (a
    background snapshot): the parsed consumer checks its slots as it stores them (only the
    new chunks where :func:`vouch` names a parent whose round trip covers the others)."""
    if parse and parser_available():
        from vmarchive.ops.capture_parsed import ParsedConsumer

        return ParsedConsumer(w, live_check=snapshot)
    if parse and refused is None:
        refused = "the migration stream parser is not available in this build"
    return OpaqueConsumer(w, refused)


def vouch(consumer: MemoryConsumer, parent: Any | None) -> None:
    """Before the stream starts: ``parent`` (a loaded archive, or None) is the archive whose
    round trip this capture's may take RAM slots from.  A parsed consumer then checks only
    the chunks new to the repository as it stores them."""
    take = getattr(consumer, "take_parent", None)
    if take is not None:
        take(parent)


def abandon(consumer: MemoryConsumer) -> None:
    """The attempt failed and its stream has ended: no thread of the consumer's outlives
    it (a parsed consumer's live checks)."""
    give_up = getattr(consumer, "abandon", None)
    if give_up is not None:
        give_up()


def roundtrip_check(
    w: Any, consumer: MemoryConsumer, parent: Any | None = None
) -> dict[str, Any] | None:
    """Regenerate the stream from what was stored, re-parse it; the result for the manifest.

    ``parent``: the parent archive (loaded), whose round trip may vouch for the RAM slots
    that hold its chunks at the same place (see :mod:`vmarchive.ops.capture_parsed`).
    """
    check = getattr(consumer, "roundtrip", None)
    if check is None:
        return None
    try:
        if parent is not None:
            from vmarchive.ops.capture_parsed import ParentMemory

            result: dict[str, Any] = check(w, ParentMemory.of(parent))
        else:
            result = check(w)
    except Exception as e:  # the archive is still good; record why the check could not run
        log.warning("round-trip check of the memory stream failed to run: %s", e)
        return {"ok": False, "problems": [f"check did not run: {e}"]}
    return result


class RoundTrip:
    """:func:`roundtrip_check` in a thread, started as soon as the memory is stored.

    It reads back and re-parses what the memory consumer stored, which needs nothing from
    the disks: run beside the disk reads, it costs no wall time when they take longer.
    :meth:`result` waits for it; :meth:`join` (cleanup) only waits.
    """

    def __init__(self, w: Any, consumer: MemoryConsumer, parent: Any | None = None) -> None:
        self._w = w
        self._consumer = consumer
        self._parent = parent
        self._result: dict[str, Any] | None = None
        consumer.close_streams()  # flush the partial last chunks it reads back (idempotent)
        self._thread = threading.Thread(target=self._run, name="memory-roundtrip", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.perf_counter()
        self._result = roundtrip_check(self._w, self._consumer, self._parent)
        log.debug("memory round trip took %.2f s", time.perf_counter() - t)

    def join(self) -> None:
        self._thread.join()

    def result(self) -> dict[str, Any] | None:
        self._thread.join()
        return self._result
