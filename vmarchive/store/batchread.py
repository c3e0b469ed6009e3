"""Fast paths for readers of whole archives (store layer): reading many chunks at once, and
checking an archive's chunks are all present without reloading the index.

:func:`read_chunks`: one range read per run of blobs that lie back to back in a pack.

A stream's chunks were packed in stream order, so a restore reading a stream in order finds
most of them adjacent in one pack.  Reading such a run with one ``get_range`` instead of one
per chunk saves a system call (or an HTTP request) per chunk.  Every chunk is still decoded
and verified on its own, exactly as :meth:`Repository.read_chunk` does; anything unusual (a
chunk not indexed, a pack gone) falls back to ``read_chunk`` for its error handling and
index-reload retry, so the errors raised are the same.

:func:`all_present`: what ``verify(full=False)`` concludes for one archive when nothing is
wrong, from the index already loaded and one ``stat`` per pack; when anything looks wrong
it says so and the caller runs the real verify for the report (an index entry naming a
missing pack may shadow a good duplicate, which only a reload finds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from vmarchive.store.backend import ObjectNotFoundError
from vmarchive.store.chunkindex import Location

if TYPE_CHECKING:
    from vmarchive.store.repository import Archive, Repository

_T = TypeVar("_T", bytes, bytes | memoryview)

#: Longest run read with one range read.
MAX_RUN_BYTES = 8 << 20


def read_chunks(repo: Repository, chunk_ids: Sequence[bytes]) -> list[bytes]:
    """The verified plaintexts of ``chunk_ids`` (no zero ids), in order.

    Raises like :meth:`Repository.read_chunk`: :class:`ChunkMissingError`,
    :class:`DamageError`, :class:`BackendError`, :class:`UsageError` for the zero id.
    """
    return _read(repo, chunk_ids, repo.decode_chunk)


def read_chunk_views(repo: Repository, chunk_ids: Sequence[bytes]) -> list[bytes | memoryview]:
    """:func:`read_chunks`, but the chunks stored as one raw block come back as read-only
    views of the range read that fetched them (no copy; each keeps its range alive).  For
    readers that pass the data on at once, as the stream regenerator does."""
    return _read(repo, chunk_ids, repo.decode_chunk_view)


def _read(
    repo: Repository,
    chunk_ids: Sequence[bytes],
    decode: Callable[[bytes, bytes | memoryview, Location], _T],
) -> list[bytes | _T]:
    from vmarchive.store.repository import pack_key

    out: list[bytes | _T] = []
    i, n = 0, len(chunk_ids)
    while i < n:
        first = repo._chunk_location(chunk_ids[i])
        if first is None:
            out.append(repo.read_chunk(chunk_ids[i]))  # raises ChunkMissingError
            i += 1
            continue
        locs: list[Location] = [first]
        end = first.offset + first.length
        j = i + 1
        while j < n:
            loc = repo._chunk_location(chunk_ids[j])
            if (
                loc is None
                or loc.pack_id != first.pack_id
                or loc.offset != end
                or end + loc.length - first.offset > MAX_RUN_BYTES
            ):
                break
            locs.append(loc)
            end += loc.length
            j += 1
        run = chunk_ids[i:j]
        if len(run) == 1:
            out.append(repo.read_chunk(run[0]))
            i = j
            continue
        try:
            blob = repo.backend.get_range(pack_key(first.pack_id), first.offset, end - first.offset)
        except ObjectNotFoundError:
            out.extend(repo.read_chunk(c) for c in run)  # retry / ChunkMissingError
            i = j
            continue
        view = memoryview(blob)
        for cid, loc in zip(run, locs, strict=True):
            at = loc.offset - first.offset
            out.append(decode(cid, view[at : at + loc.length], loc))
        i = j
    return out


def all_present(repo: Repository, archive: Archive) -> bool:
    """True when every chunk of ``archive`` is indexed, its pack exists and holds the
    entry's range, and every stream's table matches its size.  False means "run
    :meth:`Repository.verify` to find out" (it may still find everything fine).

    Raises :class:`BackendError`.
    """
    from vmarchive.store.repository import pack_key

    ends: dict[str, int] = {}
    for s in archive.streams:
        if s.chunk_size <= 0 or s.slots != -(-s.size // s.chunk_size):
            return False
        for cid in s.chunk_ids():
            loc = repo._chunk_location(cid)
            if loc is None:
                return False
            end = loc.offset + loc.length
            if end > ends.get(loc.pack_id, 0):
                ends[loc.pack_id] = end
    for pack_id, end in ends.items():
        try:
            size = repo.backend.stat(pack_key(pack_id)).size
        except ObjectNotFoundError:
            return False
        if end > size:
            return False
    return True
