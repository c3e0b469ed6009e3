"""The repository (store layer): config, keys, chunk index, archives, readers and writers.

Object layout (see ``formats/FORMAT.md``)::

    config                      repository config
    keys/<id>                   passphrase-wrapped key files (encrypted repositories)
    data/<2 hex>/<pack id>      packs (content-named: SHA-256 of the pack tail, or bytes)
    index/<index id>            index files: chunk id -> (pack, offset, length, raw length)
    archives/<archive id>       manifests (archive id: SHA-256 of the manifest bytes)
    locks/<lock id>             locks

A :class:`Repository` is cheap to open: the chunk index is loaded on first need (reads,
writes, verify, gc), and listing archives reads only ``archives/``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from vmarchive.errors import (
    AlreadyExistsError,
    AmbiguousError,
    ChunkMissingError,
    DamageError,
    NotFoundError,
    RepositoryNotFoundError,
    UsageError,
    VmarchiveError,
    WrongKeyError,
)
from vmarchive.format.constants import INDEX_ENTRY_SIZE
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store.backend import Backend, ObjectInfo, ObjectNotFoundError, open_backend
from vmarchive.store.chunkindex import ChunkIndex, Location
from vmarchive.store.codecs import Codecs, InitOptions, StreamInfo
from vmarchive.store.indexcache import IndexCache
from vmarchive.store.locking import Lock, LockContext, LockKind, LockManager
from vmarchive.store.readahead import PackOrder
from vmarchive.store.reader import StreamReader
from vmarchive.store.summarycache import SummaryCache
from vmarchive.store.writer import ArchiveWriter, WriterOptions

if TYPE_CHECKING:
    from vmarchive.format.crypto import KeyMaterial
    from vmarchive.store.maintenance import (
        GcOptions,
        GcResult,
        PrunePolicy,
        PruneResult,
        RebuildResult,
        RepoStats,
        VerifyReport,
    )

log = logging.getLogger(__name__)

#: what follows the ``@`` of ``DOMAIN@latest~N`` (:meth:`Repository.resolve_latest`)
_LATEST = re.compile(r"latest(?:~([0-9]+))?")

#: A passphrase, or a callable asked for one only if the repository is encrypted.
Passphrase = str | Callable[[], str] | None


def pack_key(pack_id: str) -> str:
    return f"data/{pack_id[:2]}/{pack_id}"


#: the pack number of an index entry (``INDEX_ENTRY_STRUCT``), skipping the chunk id
_PACK_NUMBER = struct.Struct("<16xI")
#: Entries of the index objects the local cache lacks that a load journals rather than
#: saving the whole index (beyond: saved whole, without holding them all at once).
_JOURNAL_EXTRAS_MAX = 1 << 18


def _without_packs(
    records: memoryview, packs: Sequence[str], existing: set[str]
) -> tuple[memoryview, int]:
    """The 32-byte index entries of ``records`` whose pack (numbered from 0 in ``packs``)
    is in ``existing``, and how many were left out."""
    keep = {n for n, p in enumerate(packs) if p in existing}
    out = bytearray()
    gone = 0
    for pos in range(0, len(records), INDEX_ENTRY_SIZE):
        if _PACK_NUMBER.unpack_from(records, pos)[0] in keep:
            out += records[pos : pos + INDEX_ENTRY_SIZE]
        else:
            gone += 1
    return memoryview(bytes(out)), gone


class ArchiveSummary(msgspec.Struct, frozen=True):
    """One line of ``list``: enough to choose an archive without loading its tables."""

    id: str
    time: str
    domain: str
    kind: str
    tags: list[str] = msgspec.field(default_factory=list)
    size: int = 0
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)

    def of_domain(self, domain: str) -> bool:
        """Whether this is an archive of ``domain``: its name, or its UUID in any case, as
        recorded at capture (an archive outlives a rename)."""
        uuid = str(self.metadata.get("uuid", ""))
        return self.domain == domain or (bool(uuid) and uuid.lower() == domain.lower())

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "domain": self.domain,
            "kind": self.kind,
            "tags": self.tags,
            "size": self.size,
            "metadata": self.metadata,
        }


class Archive(msgspec.Struct, frozen=True):
    """A loaded manifest: metadata and streams (with their slot tables)."""

    id: str
    metadata: dict[str, Any]
    streams: list[StreamInfo]

    @property
    def time(self) -> str:
        return str(self.metadata.get("time", ""))

    @property
    def domain(self) -> str:
        return str(self.metadata.get("domain", ""))

    def stream(self, name: str) -> StreamInfo:
        """Raises :class:`NotFoundError` if the archive has no stream ``name``."""
        for s in self.streams:
            if s.name == name:
                return s
        raise NotFoundError(f"archive {self.id[:12]} has no stream {name!r}", stream=name)

    def summary(self) -> ArchiveSummary:
        tags = self.metadata.get("tags") or []
        return ArchiveSummary(
            id=self.id,
            time=self.time,
            domain=self.domain,
            kind=str(self.metadata.get("kind", "")),
            tags=[str(t) for t in tags] if isinstance(tags, list) else [],
            size=sum(s.size for s in self.streams),
            metadata=self.metadata,
        )

    def chunk_ids(self) -> Iterator[bytes]:
        """Every non-hole chunk id the archive references (with repeats)."""
        for s in self.streams:
            yield from s.chunk_ids()


def _summary_from_json(archive_id: str, d: dict[str, Any]) -> ArchiveSummary:
    """An :meth:`ArchiveSummary.to_json` read back.  Raises KeyError/TypeError/ValueError."""
    if d["id"] != archive_id or not isinstance(d["metadata"], dict):
        raise ValueError("entry of another archive, or without metadata")
    return ArchiveSummary(
        id=archive_id,
        time=str(d["time"]),
        domain=str(d["domain"]),
        kind=str(d["kind"]),
        tags=[str(t) for t in d["tags"]],
        size=int(d["size"]),
        metadata=d["metadata"],
    )


def parse_time(value: str) -> datetime:
    """Parse an ISO 8601 archive time. Raises :class:`UsageError`."""
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, AttributeError) as e:
        raise UsageError(f"archive time {value!r} is not ISO 8601") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)  # a time without offset is taken as UTC
    return t


class Repository:
    """An open repository.  Create with :meth:`init` or :meth:`open`."""

    def __init__(
        self, backend: Backend, codecs: Codecs, lock_context: LockContext | None = None
    ) -> None:
        self.backend = backend
        self.codecs = codecs
        self.locks = LockManager(backend, lock_context)
        self._index: ChunkIndex | None = None
        self._index_files: set[str] = set()
        #: loaded without the entries that name missing packs (gc, verify): not the
        #: index objects' exact contents, so never written to the local cache
        self._index_pruned = False
        #: an index object published here could not be journaled: save the whole index
        #: at the next commit that may (see _cache_index_after_commit)
        self._journal_missed = False
        self._writers = 0  # live ArchiveWriters of this object
        self.index_problems: list[str] = []
        self._index_mutex = threading.Lock()
        self._chunks_mutex = threading.Lock()
        self._pack_order = PackOrder(self._chunk_location, codecs.zero_id)
        backend.set_read_order(self._following_pack)
        encrypted, cache_key = Codecs.config_encrypted(codecs.config), codecs.local_cache_key()
        self._summaries = SummaryCache.for_repository(codecs.encoded_config, encrypted, cache_key)
        self._index_cache = IndexCache.for_repository(codecs.encoded_config, encrypted, cache_key)

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        location: str,
        options: InitOptions | None = None,
        *,
        backend: Backend | None = None,
        lock_context: LockContext | None = None,
    ) -> Repository:
        """Create a new repository at ``location``.

        Raises :class:`AlreadyExistsError` if one (or anything) is there,
        :class:`UsageError` for bad options, :class:`BackendError`.
        """
        options = options or InitOptions()
        be = backend or open_backend(location)
        if be.exists("config") or any(True for _ in be.list("")):
            raise AlreadyExistsError(
                f"{be.location} is not empty; refusing to create a repository there"
            )
        codecs, objects = Codecs.create(options)
        # Key files first, config last: a repository exists only once its config does.
        for key, data in objects:
            be.put(key, data, create_only=True)
        if not be.put("config", codecs.encoded_config, create_only=True):
            raise AlreadyExistsError(f"a repository was created concurrently at {be.location}")
        log.info("created repository %s", be.location)
        return cls(be, codecs, lock_context)

    @classmethod
    def open(
        cls,
        location: str,
        passphrase: Passphrase = None,
        *,
        key: KeyMaterial | None = None,
        backend: Backend | None = None,
        lock_context: LockContext | None = None,
    ) -> Repository:
        """Open an existing repository.

        ``key``: for an encrypted repository, the key material another process already
        unlocked from it (``codecs.key``), used instead of a passphrase: a helper process
        then does not run the key derivation (scrypt, ~0.4 s of CPU) again.  It is not
        checked here (only a passphrase opens a key file): whatever is written under a
        wrong one fails authentication where it is read, as the capture does when it
        adopts a helper's index objects.

        Raises :class:`RepositoryNotFoundError`, :class:`UnsupportedVersionError`,
        :class:`WrongKeyError` (also when encrypted and neither a passphrase nor a key is
        given), :class:`BackendError`.
        """
        be = backend or open_backend(location)
        try:
            raw = be.get("config")
        except ObjectNotFoundError as e:
            raise RepositoryNotFoundError(f"no vmarchive repository at {be.location}") from e
        config = Codecs.read_config(raw)
        if not Codecs.config_encrypted(config):
            return cls(be, Codecs.open(config, raw, None), lock_context)
        if key is not None:
            return cls(be, Codecs.open(config, raw, key), lock_context)
        secret = passphrase() if callable(passphrase) else passphrase
        if secret is None:
            raise WrongKeyError(f"repository {be.location} is encrypted: a passphrase is needed")
        keyfiles = [be.get(o.key) for o in be.list("keys/")]
        if not keyfiles:
            raise WrongKeyError(f"repository {be.location} is encrypted but has no key file")
        key = Codecs.unlock(keyfiles, secret)
        return cls(be, Codecs.open(config, raw, key), lock_context)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locks -------------------------------------------------------------------------
    def lock(self, kind: LockKind, *, wait: float | None = None) -> Lock:
        """Take a repository lock; a shared one waits for an exclusive holder (gc, prune)
        for up to ``wait`` seconds (``None``: the lock context's wait, by default one lease
        or ``VMARCHIVE_LOCK_WAIT``).  Raises :class:`LockedError`, :class:`BackendError`."""
        return self.locks.acquire(kind, wait=wait)

    # -- chunk index ------------------------------------------------------------------
    @property
    def index(self) -> ChunkIndex:
        """The chunk index, loaded from ``index/`` on first use."""
        with self._index_mutex:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def reload_index(self, existing_packs: set[str] | None = None) -> None:
        """Reload the chunk index from ``index/``.

        With ``existing_packs`` (gc and verify list the packs anyway), entries naming a
        pack that is gone are skipped, so a dangling duplicate can never shadow a good
        location of the same chunk.
        """
        with self._index_mutex:
            self._index = self._load_index(existing_packs)

    def _load_index(self, existing_packs: set[str] | None = None) -> ChunkIndex:
        idx = ChunkIndex()
        dangling = 0
        self._index_files = set()
        self._index_pruned = existing_packs is not None
        self.index_problems = []
        objects = [(o.key.split("/", 1)[1], o) for o in self.backend.list("index/")]
        listed = {name for name, _ in objects}
        # The local cache (not for gc and verify, which must see dangling entries).
        cache = None if existing_packs is not None else self._index_cache
        cached = cache.load(listed) if cache is not None else None
        if cached is not None:
            idx, self._index_files = cached[0], set(cached[1])
        covered = set(self._index_files)
        # The objects the cache lacks, to journal (a few: those other hosts published
        # since; many, or no usable cache, and the whole index is saved instead).
        extras: list[tuple[str, list[str], memoryview]] | None = [] if cached is not None else None
        extra_entries = 0
        for name, obj in objects:
            if name in covered:
                continue
            try:
                packs, records = self.codecs.decode_index_packed(self.backend.get(obj.key))
            except ObjectNotFoundError:
                continue  # removed by a concurrent gc
            except DamageError as e:
                log.warning("index %s is damaged: %s", name, e)
                self.index_problems.append(f"index {name}: {e}")
                continue
            self._index_files.add(name)
            if extras is not None:
                extras.append((name, packs, records))
                extra_entries += len(records) // INDEX_ENTRY_SIZE
                if extra_entries > _JOURNAL_EXTRAS_MAX:
                    extras = None
            if existing_packs is not None and not existing_packs.issuperset(packs):
                records, gone = _without_packs(records, packs, existing_packs)
                dangling += gone
            idx.add_packed(records, packs, checked=True)
        if dangling:
            log.warning("chunk index: %d entries name packs that do not exist", dangling)
        log.debug(
            "chunk index: %d chunks from %d files (%d from the local cache)",
            len(idx),
            len(self._index_files),
            len(covered),
        )
        if (
            cache is not None
            and self._index_files != covered
            and (extras is None or not cache.append(extras))
        ):
            cache.save(idx, self._index_files)
        return idx

    def index_files(self) -> set[str]:
        _ = self.index
        return set(self._index_files)

    def _chunk_location(self, chunk_id: bytes) -> Location | None:
        index = self.index
        with self._chunks_mutex:  # several writers of one Repository may run at once
            return index.get(chunk_id)

    def _holds_chunk(self, chunk_id: bytes) -> bool:
        """Whether the index names ``chunk_id`` (no :class:`Location` made for it)."""
        index = self.index
        with self._chunks_mutex:
            return chunk_id in index

    def _missing_chunks(self, chunk_ids: Iterable[bytes]) -> list[bytes]:
        """Those of ``chunk_ids`` the index does not hold (one lock for all of them)."""
        index = self.index
        with self._chunks_mutex:
            return [c for c in chunk_ids if c not in index]

    def _add_location(self, chunk_id: bytes, loc: Location) -> None:
        index = self.index
        with self._chunks_mutex:
            index.add(chunk_id, loc)

    def _adopt_index(self, names: Iterable[str]) -> int:
        """Add the entries of the index objects ``names`` to the in-memory index: those
        another writer published for streams a writer of this object takes over
        (:meth:`ArchiveWriter.publish_chunks`).  Ids already present keep their location.
        Returns how many entries were new.

        Raises :class:`ObjectNotFoundError` (a concurrent gc, which our shared lock keeps
        out), :class:`DamageError`, :class:`BackendError`.
        """
        added = 0
        index = self.index  # loaded first: loading sets the names it covers
        for name in names:
            if name in self._index_files:
                continue
            packs, records = self.codecs.decode_index_packed(self.backend.get(f"index/{name}"))
            with self._chunks_mutex:
                added += index.add_packed(records, packs, checked=True)
                self._index_files.add(name)
        return added

    # -- object publishing (write ordering lives in the writer and gc) ---------------------
    def _publish_pack(
        self, pack_id: str, data: bytes | memoryview, *, read_back: bool = False
    ) -> None:
        """``read_back``: this process reads the pack back soon (a backend hint)."""
        key = pack_key(pack_id)
        if read_back:
            self.backend.put_for_read_back(key, data, create_only=True)
        else:
            self.backend.put(key, data, create_only=True)

    def _done_reading_back(self, pack_ids: Sequence[str]) -> None:
        """The packs ``pack_ids``, published with ``read_back``, were read back (a hint)."""
        with contextlib.suppress(Exception):  # a hint must not fail a commit or an abort
            self.backend.done_reading_back([pack_key(p) for p in pack_ids])

    def _publish_index(
        self, entries: Sequence[tuple[bytes, Location]], *, replace: bool = False
    ) -> str:
        """Put an index object. ``replace``: overwrite a (damaged) object of the same name —
        names are content hashes, so the right bytes are what the name promises."""
        data = self.codecs.encode_index(entries)
        name = self.codecs.object_id(data)
        self.backend.put(f"index/{name}", data, create_only=not replace)
        self._index_files.add(name)
        cache = self._index_cache
        if cache is not None and not self._index_pruned:
            # Journaled at once (not kept until the commit): a first capture of a large
            # disk publishes hundreds of thousands of entries.  What another writer of
            # this object has in the in-memory index but not published is not in it.
            try:
                records, packs = ChunkIndex.pack_entries(entries)
                if not cache.append([(name, packs, records)]):
                    self._journal_missed = True
            except Exception:  # an optimisation: never the failure of a publish
                log.debug("index object not journaled", exc_info=True)
                self._journal_missed = True
        return name

    def _publish_manifest(
        self,
        metadata: dict[str, Any],
        streams: Sequence[tuple[str, str, int, int, Mapping[str, Any], bytes]],
    ) -> str:
        data = self.codecs.encode_manifest(metadata, streams)
        archive_id = self.codecs.object_id(data)
        self.backend.put(f"archives/{archive_id}", data, create_only=True)
        log.info("published archive %s", archive_id)
        return archive_id

    # -- writing ------------------------------------------------------------------------
    def writer(
        self, progress: Progress = NULL_PROGRESS, options: WriterOptions | None = None
    ) -> ArchiveWriter:
        """A new archive writer holding a shared lock until commit or exit.

        Waits while gc/prune holds the repository (see :meth:`lock`); raises
        :class:`LockedError` if it still does when the wait ends.
        """
        lock = self.lock("shared")
        try:
            self._fresh_index_for_writer()
            return ArchiveWriter(self, lock, progress, options)
        except BaseException:
            lock.release()
            raise

    def _cache_index_after_commit(self) -> None:
        """Keep the local index cache current after a writer published its index, so
        the next command loads it instead of decoding the objects just written.

        Decoding costs ~14 us a chunk here (100,000 chunks: 1.39 s, from the cache
        0.017 s): the capture after a first capture of a 200 GiB disk (800,000 chunks)
        spent ~11 s on the index the first one had just written.  Its index objects are
        in the cache's journal already (see :meth:`_publish_index`); the whole index is
        written here only when the journal has grown past its share of the table, there
        is no table yet, an object could not be journaled, or the index outgrew the
        table it was loaded from -- the in-memory index then holds exactly the entries of
        the index objects it names, its own included.  Not while another writer runs (its
        entries are in memory, its index object is not published yet), nor for an index
        loaded for gc or verify.

        Outgrown: the index was rehashed into a table twice as large (past 3/4 full with
        the journal's records or this writer's entries), 0.7 s a million slots in Python.
        Left to the journal, every later load would rehash the cached table again, until
        the journal passed its share.  This host's capture loaded a 7,600-chunk index in
        16-21 ms so, 0.7-1.1 ms once folded; ``scripts/bench_index.py --chunks 786432``
        (a table exactly 3/4 full): 0.66 s a load before, 0.055 s after."""
        cache = self._index_cache
        if cache is None:
            return
        with self._index_mutex:
            if self._index is None or self._writers != 1 or self._index_pruned:
                return
            if not self._journal_missed and not cache.needs_fold(self._index):
                return  # the journal has this commit's index objects
            try:
                with self._chunks_mutex:
                    cache.save(self._index, self._index_files)
                self._journal_missed = False
            except Exception:  # an optimisation: never the failure of a published commit
                log.debug("index cache not written after the commit", exc_info=True)

    def _drop_index(self) -> bool:
        """Forget the in-memory index (reloaded from ``index/`` on next use): an aborted
        writer added entries no index object names.  Refused (False) while another
        writer runs, whose own not-yet-published entries would go with it."""
        with self._index_mutex:
            if self._writers > 1:
                return False
            self._index = None
            self._index_files = set()
            self._index_pruned = False
            return True

    def _writer_started(self) -> None:
        with self._index_mutex:
            self._writers += 1

    def _writer_done(self) -> None:
        with self._index_mutex:
            self._writers -= 1

    def _fresh_index_for_writer(self) -> None:
        """Load the index under the writer's shared lock, or check that one loaded earlier
        still holds: a gc that ran since (between our locks) may have deleted garbage packs
        it names, and deduplicating against those would publish a broken archive.  gc
        rewrites every index naming a pack it deletes, so a vanished index file shows it.
        While another writer of this object runs, its lock has kept gc out since that
        writer's own check, and reloading would drop its not-yet-indexed entries."""
        with self._index_mutex:
            if self._index is None:
                self._index = self._load_index()
                return
            if self._writers:
                return
            listed = {o.key.split("/", 1)[1] for o in self.backend.list("index/")}
            if self._index_files - listed:
                log.info("index files vanished since the index was loaded (gc?); reloading")
                self._index = self._load_index()

    # -- reading ------------------------------------------------------------------------
    def read_chunk(self, chunk_id: bytes) -> bytes:
        """The verified plaintext of one chunk.

        Raises :class:`ChunkMissingError` (not indexed, or its pack is gone),
        :class:`DamageError` (decoding or id verification failed), :class:`BackendError`.
        """
        if chunk_id == self.codecs.zero_id:
            raise UsageError("the zero id is a hole, not a chunk")
        for attempt in (1, 2):
            loc = self._chunk_location(chunk_id)
            if loc is None:
                raise ChunkMissingError(
                    f"chunk {chunk_id.hex()} is not in the repository", chunk_id=chunk_id.hex()
                )
            try:
                blob = self.backend.get_range(pack_key(loc.pack_id), loc.offset, loc.length)
            except ObjectNotFoundError as e:
                if attempt == 1:
                    # A dangling entry may shadow a good duplicate: reload the index
                    # without entries naming missing packs, and look again.
                    packs = {o.key.rsplit("/", 1)[1] for o in self.backend.list("data/")}
                    self.reload_index(packs)
                    continue
                raise ChunkMissingError(
                    f"chunk {chunk_id.hex()}: pack {loc.pack_id} is missing",
                    chunk_id=chunk_id.hex(),
                    pack=loc.pack_id,
                ) from e
            return self.decode_chunk(chunk_id, blob, loc)
        raise AssertionError("unreachable")

    def _following_pack(self, key: str) -> str | None:
        """The pack a sequential reader of pack ``key`` reads next, if the slot tables
        of recently loaded archives say (read-ahead hint for the backend)."""
        pack_id = key.rsplit("/", 1)[-1]
        try:
            nxt = self._pack_order.next_pack(pack_id)
        except VmarchiveError as e:  # e.g. the index cannot be loaded: no hint
            log.debug("no read-ahead hint for %s: %s", key, e)
            return None
        return None if nxt is None else pack_key(nxt)

    def decode_chunk(self, chunk_id: bytes, blob: bytes | memoryview, loc: Location) -> bytes:
        """Decode and verify a blob read from a pack. Raises :class:`DamageError`."""
        self._check_length(chunk_id, blob, loc)
        data = self.codecs.decode_blob(chunk_id, blob, loc.raw_length)
        self.codecs.verify_chunk(chunk_id, data)
        return data

    def decode_chunk_view(
        self, chunk_id: bytes, blob: bytes | memoryview, loc: Location
    ) -> bytes | memoryview:
        """:meth:`decode_chunk`, but a chunk stored as one raw block comes back as a
        read-only view of ``blob``: no copy, and it keeps ``blob`` alive."""
        self._check_length(chunk_id, blob, loc)
        data = self.codecs.decode_blob_view(chunk_id, blob, loc.raw_length)
        self.codecs.verify_chunk(chunk_id, data)
        return data

    @staticmethod
    def _check_length(chunk_id: bytes, blob: bytes | memoryview, loc: Location) -> None:
        if len(blob) != loc.length:
            raise DamageError(
                f"chunk {chunk_id.hex()}: pack {loc.pack_id} is truncated",
                chunk_id=chunk_id.hex(),
                pack=loc.pack_id,
            )

    # -- archives -------------------------------------------------------------------------
    def archive_ids(self) -> list[str]:
        return sorted(self._archive_objects())

    def _archive_objects(self) -> dict[str, ObjectInfo]:
        return {o.key.split("/", 1)[1]: o for o in self.backend.list("archives/")}

    def resolve(self, name_or_prefix: str) -> str:
        """The full id of the one archive ``name_or_prefix`` names: an id, a unique id
        prefix, or ``DOMAIN@latest`` / ``DOMAIN@latest~N`` (:meth:`resolve_latest`).

        Raises :class:`NotFoundError`, :class:`AmbiguousError`, :class:`UsageError`.
        """
        if "@" in name_or_prefix:
            return self.resolve_latest(name_or_prefix)
        name = name_or_prefix.strip().lower()
        if not name or any(c not in "0123456789abcdef" for c in name):
            raise UsageError(f"{name_or_prefix!r} is not an archive id or id prefix")
        matches = [a for a in self.archive_ids() if a.startswith(name)]
        if not matches:
            raise NotFoundError(f"no archive {name_or_prefix!r}", archive=name_or_prefix)
        if len(matches) > 1:
            raise AmbiguousError(
                f"archive prefix {name_or_prefix!r} matches {len(matches)} archives",
                archive=name_or_prefix,
                matches=matches,
            )
        return matches[0]

    def resolve_latest(self, name: str) -> str:
        """``DOMAIN@latest``: the newest archive of DOMAIN (its name or UUID as captured);
        ``DOMAIN@latest~N``: the N-th before that one; ``@latest``: of any domain.  Newest
        means last in :meth:`list_archives` order (capture time, then id).

        Raises :class:`UsageError` (no such form), :class:`NotFoundError`,
        :class:`AmbiguousError` (guests of different UUIDs under one name).
        """
        domain, _, selector = name.rpartition("@")
        m = _LATEST.fullmatch(selector.strip().lower())
        if m is None:
            raise UsageError(f"{name!r}: after '@' comes latest or latest~N (N: 0, 1, ...)")
        back = int(m.group(1) or 0)
        mine = [s for s in self.list_archives() if not domain or s.of_domain(domain)]
        guests = sorted({str(s.metadata.get("uuid") or "").lower() for s in mine} - {""})
        if domain and len(guests) > 1:
            # one name, several guests (hosts sharing the repository, or a name reused)
            raise AmbiguousError(
                f"{name!r}: {len(guests)} guests are named {domain!r} "
                f"({', '.join(guests)}): name one by its UUID",
                archive=name,
                matches=guests,
            )
        whose = f"domain {domain!r}" if domain else "the repository"
        if back >= len(mine):
            have = (
                f"has {len(mine)} archive{'' if len(mine) == 1 else 's'}"
                if mine
                else "has no archive"
            )
            raise NotFoundError(f"no archive {name!r}: {whose} {have}", archive=name)
        return mine[-1 - back].id

    def load_archive(self, name_or_prefix: str) -> Archive:
        """Load the archive an id or unique id prefix names.

        Raises :class:`NotFoundError`, :class:`AmbiguousError`, :class:`DamageError`.
        """
        archive_id = self.resolve(name_or_prefix)
        archive = self._load(archive_id)
        # Loaded to be read, most likely: let read-ahead learn its pack order.
        self._pack_order.add_archive(archive_id, archive.streams)
        return archive

    def _load(self, archive_id: str) -> Archive:
        try:
            data = self.backend.get(f"archives/{archive_id}")
        except ObjectNotFoundError as e:
            raise NotFoundError(f"no archive {archive_id}", archive=archive_id) from e
        if self.codecs.object_id(data) != archive_id:
            raise DamageError(
                f"archive {archive_id}: manifest bytes do not match its id", archive=archive_id
            )
        try:
            metadata, streams = self.codecs.decode_manifest(data)
        except DamageError as e:
            raise type(e)(f"archive {archive_id}: {e.message}", archive=archive_id) from e
        return Archive(archive_id, metadata, streams)

    def iter_archives(
        self, *, on_damage: Callable[[str, DamageError], None] | None = None
    ) -> Iterator[Archive]:
        """Every archive that loads; damaged manifests are passed to ``on_damage`` (or raised)."""
        for aid in self.archive_ids():
            try:
                yield self._load(aid)
            except NotFoundError:
                continue  # forgotten while we listed
            except DamageError as e:
                if on_damage is None:
                    raise
                on_damage(aid, e)

    def list_archives(self, *, uuid: str | None = None) -> list[ArchiveSummary]:
        """Every archive, oldest first; damaged manifests are skipped with a warning.
        ``uuid``: only the archives whose metadata has this ``uuid`` (a capture's parent).

        Summaries come from the local summary cache where it has them (see
        :mod:`vmarchive.store.summarycache`); only the manifests it lacks are loaded.  With
        ``uuid``, a cached summary that does not hold it is not even decoded.

        Raises :class:`BackendError`.
        """
        objects = self._archive_objects()
        ids = sorted(objects)
        cache = self._summaries
        needle = None if uuid is None or cache is None else cache.needle(uuid)
        out: list[ArchiveSummary] = []
        for aid in ids:
            # The listing's size and mtime go with the entry: a manifest rewritten in
            # place (damaged, or a copied repository tampered with) is loaded again.
            stamp = f"{objects[aid].size}:{objects[aid].mtime!r}"
            cached = cache.get(aid, stamp, needle) if cache is not None else None
            if cached is False:
                continue  # cached, and not of that uuid
            summary: ArchiveSummary | None = None
            if isinstance(cached, dict):
                try:
                    summary = _summary_from_json(aid, cached)
                except (KeyError, TypeError, ValueError) as e:
                    log.debug("cached summary of %s unusable (%s); loading it", aid, e)
            if summary is None:
                try:
                    summary = self._load(aid).summary()
                except NotFoundError:
                    continue  # forgotten while we listed
                except DamageError as e:
                    log.warning("archive %s is damaged: %s", aid, e)
                    continue
                if cache is not None:
                    cache.put(aid, stamp, summary.to_json())
            if uuid is None or summary.metadata.get("uuid") == uuid:
                out.append(summary)
        if cache is not None:
            cache.keep_only(ids)

        def when(s: ArchiveSummary) -> float:
            try:
                return parse_time(s.time).timestamp()
            except UsageError:
                return 0.0

        out.sort(key=lambda s: (when(s), s.id))
        return out

    def open_stream(self, archive: Archive | str, stream_name: str) -> StreamReader:
        """A reader of one stream. Raises :class:`NotFoundError`, :class:`AmbiguousError`."""
        a = archive if isinstance(archive, Archive) else self.load_archive(archive)
        return StreamReader(self, a.stream(stream_name))

    # -- maintenance (implemented in maintenance.py; methods here keep the API in one place)
    def verify(
        self,
        names: Iterable[str] | None = None,
        full: bool = False,
        progress: Progress = NULL_PROGRESS,
    ) -> VerifyReport:
        """See :func:`vmarchive.store.maintenance.verify`."""
        from vmarchive.store import maintenance

        return maintenance.verify(self, names, full=full, progress=progress)

    def forget(self, names: Iterable[str]) -> list[str]:
        """See :func:`vmarchive.store.maintenance.forget`."""
        from vmarchive.store import maintenance

        return maintenance.forget(self, names)

    def prune(
        self, policy: PrunePolicy, dry_run: bool = False, domains: Sequence[str] = ()
    ) -> PruneResult:
        """See :func:`vmarchive.store.maintenance.prune`."""
        from vmarchive.store import maintenance

        return maintenance.prune(self, policy, dry_run=dry_run, domains=domains)

    def gc(self, options: GcOptions | None = None, progress: Progress = NULL_PROGRESS) -> GcResult:
        """See :func:`vmarchive.store.maintenance.gc`."""
        from vmarchive.store import maintenance

        return maintenance.gc(self, options, progress=progress)

    def rebuild_index(self, dry_run: bool = False) -> RebuildResult:
        """See :func:`vmarchive.store.maintenance.rebuild_index`."""
        from vmarchive.store import maintenance

        return maintenance.rebuild_index(self, dry_run=dry_run)

    def stats(self) -> RepoStats:
        """See :func:`vmarchive.store.maintenance.stats`."""
        from vmarchive.store import maintenance

        return maintenance.stats(self)
