"""Pack order for read-ahead (store layer): which pack a sequential reader needs next.

Index files are sorted by chunk id, so the order in which a writer filled its packs is
lost there; the slot tables of the archives being read still show it.  :class:`PackOrder`
walks the tables of the last few loaded archives lazily, a bounded number of slots per
question, and remembers for each pack the first other pack that follows it in a stream.
A backend with slow round trips uses the answer to fetch that pack while the current one
is decoded (:meth:`vmarchive.store.backend.Backend.read_ahead`).  Only a hint: a wrong or
missing answer costs a useless fetch or a stall, never wrong bytes.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

from vmarchive.store.chunkindex import Location
from vmarchive.store.codecs import StreamInfo

#: Archives whose streams are remembered (weakly: a table dropped by its reader is
#: never kept alive here; a 1 TiB disk has a table of 256 MiB).
KEEP_ARCHIVES = 4
#: Slots examined per question at most (a few ms of work), so a reader never stalls long.
SCAN_BUDGET = 16384


class _Cursor:
    __slots__ = ("pos", "prev", "stream")

    def __init__(self, stream: StreamInfo) -> None:
        self.stream = weakref.ref(stream)
        self.pos = 0
        self.prev: str | None = None


class PackOrder:
    """Successor of a pack in the streams of recently loaded archives."""

    def __init__(self, locate: Callable[[bytes], Location | None], zero_id: bytes) -> None:
        self._locate = locate
        self._zero = zero_id
        self._lock = threading.Lock()
        self._archives: OrderedDict[str, list[_Cursor]] = OrderedDict()
        self._next: dict[str, str] = {}

    def add_archive(self, archive_id: str, streams: Sequence[StreamInfo]) -> None:
        """Remember the streams of an archive about to be read (oldest forgotten first)."""
        with self._lock:
            if archive_id in self._archives:
                self._archives.move_to_end(archive_id)
                return
            self._archives[archive_id] = [_Cursor(s) for s in streams if s.table]
            while len(self._archives) > KEEP_ARCHIVES:
                self._archives.popitem(last=False)

    def next_pack(self, pack_id: str, budget: int = SCAN_BUDGET) -> str | None:
        """The pack read after ``pack_id``, if known or found within ``budget`` slots."""
        with self._lock:
            found = self._next.get(pack_id)
            if found is not None:
                return found
            for cursors in self._archives.values():
                for cur in cursors:
                    budget = self._scan(cur, pack_id, budget)
                    found = self._next.get(pack_id)
                    if found is not None or budget <= 0:
                        return found
            return None

    def _scan(self, cur: _Cursor, wanted: str, budget: int) -> int:
        stream = cur.stream()
        if stream is None:  # its reader is done with it
            return budget
        table, zero, nxt = stream.table, self._zero, self._next
        end = len(table)
        pos = cur.pos
        while pos < end and budget > 0:
            cid = table[pos : pos + 16]
            pos += 16
            budget -= 1
            if cid == zero:
                continue
            loc = self._locate(cid)
            if loc is None or loc.pack_id == cur.prev:
                continue
            if cur.prev is not None:
                nxt.setdefault(cur.prev, loc.pack_id)
                if cur.prev == wanted:
                    cur.prev = loc.pack_id
                    break
            cur.prev = loc.pack_id
        cur.pos = pos
        return budget
