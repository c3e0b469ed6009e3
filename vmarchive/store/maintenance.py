"""Repository maintenance (store layer): verify, stats, forget, prune, gc.

verify
    *fast*: every selected manifest decodes and matches its id, every chunk it references
    is indexed, its pack exists and the entry lies inside the pack.  *full*: additionally
    each referenced pack is read once, every referenced blob decoded and its id recomputed.
    An archive is *damaged* exactly when it references a chunk that cannot be read back
    correctly (or its manifest is bad); damage that affects no archive (a pack trailer, an
    index file) is a *problem* but names no archive.

gc (exclusive lock)
    mark: the chunk ids every manifest references; sweep: packs without live chunks are
    deleted, packs mostly garbage are repacked (their live blobs copied verbatim into new
    packs), and all index files are consolidated into one.  Ordering keeps every instant
    readable: new packs durable -> new index durable -> old index files deleted -> old
    packs deleted.  Packs and index files younger than the grace period are never touched,
    so fresh data of a writer whose lock was wrongly judged stale survives.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from vmarchive.errors import (
    DamageError,
    NotFoundError,
    UnsupportedVersionError,
    UsageError,
)
from vmarchive.format import constants as C
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import crashpoint
from vmarchive.store.backend import ObjectInfo, ObjectNotFoundError
from vmarchive.store.chunkindex import Location
from vmarchive.store.repository import pack_key, parse_time

if TYPE_CHECKING:
    from vmarchive.store.repository import ArchiveSummary, Repository

log = logging.getLogger(__name__)


def _pack_id_of(key: str) -> str:
    return key.rsplit("/", 1)[1]


def _packs(repo: Repository) -> dict[str, ObjectInfo]:
    return {_pack_id_of(o.key): o for o in repo.backend.list("data/")}


# ----------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    """The result of :func:`verify`; ``ok`` only when nothing at all is wrong."""

    ok: bool
    damaged: list[str]
    problems: list[str]
    archives_checked: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    full: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "damaged": self.damaged,
            "problems": self.problems,
            "archives_checked": self.archives_checked,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "full": self.full,
        }


def verify(
    repo: Repository,
    names: Iterable[str] | None = None,
    *,
    full: bool = False,
    progress: Progress = NULL_PROGRESS,
) -> VerifyReport:
    """Check archives (all, or those ``names`` resolve to).

    Raises :class:`NotFoundError` / :class:`AmbiguousError` for a bad name and
    :class:`BackendError` when the storage fails; damage is reported, not raised.
    """
    # A shared lock keeps gc from deleting what we are about to read (FORMAT.md 15).
    with repo.lock("shared"):
        return _verify(repo, names, full=full, progress=progress)


def _verify(
    repo: Repository, names: Iterable[str] | None, *, full: bool, progress: Progress
) -> VerifyReport:
    problems: list[str] = []
    damaged: set[str] = set()
    ids = [repo.resolve(n) for n in names] if names is not None else repo.archive_ids()
    ids = sorted(set(ids))
    packs = _packs(repo)
    repo.reload_index(set(packs))
    problems.extend(repo.index_problems)
    index = repo.index

    # Which archives reference which chunk: chunk id -> archive ids.
    users: dict[bytes, set[str]] = defaultdict(set)
    for aid in ids:
        try:
            archive = repo._load(aid)
        except NotFoundError:
            continue
        except DamageError as e:
            damaged.add(aid)
            problems.append(str(e))
            continue
        for s in archive.streams:
            if s.chunk_size <= 0 or s.slots != -(-s.size // s.chunk_size):
                damaged.add(aid)
                problems.append(f"archive {aid}: stream {s.name} table does not match its size")
        for cid in archive.chunk_ids():
            users[cid].add(aid)

    bad: set[bytes] = set()
    by_pack: dict[str, list[tuple[bytes, Location]]] = defaultdict(list)
    for cid in users:
        loc = index.get(cid)
        if loc is None:
            bad.add(cid)
            problems.append(f"chunk {cid.hex()} is not indexed in any existing pack")
            continue
        info = packs.get(loc.pack_id)
        if info is None:
            bad.add(cid)
            problems.append(f"chunk {cid.hex()}: pack {loc.pack_id} is missing")
            continue
        if loc.offset + loc.length > info.size:
            bad.add(cid)
            problems.append(f"chunk {cid.hex()}: entry lies outside pack {loc.pack_id}")
            continue
        by_pack[loc.pack_id].append((cid, loc))

    chunks_checked = 0
    bytes_checked = 0
    if full:
        task = progress.task("verify", total=sum(packs[p].size for p in by_pack))
        try:
            for pack_id in sorted(by_pack):
                try:
                    data = repo.backend.get(pack_key(pack_id))
                except ObjectNotFoundError:
                    bad.update(c for c, _ in by_pack[pack_id])
                    problems.append(f"pack {pack_id} vanished")
                    continue
                # A footer this release cannot read (damaged, or claiming a feature it does
                # not know) is a problem of that pack, not the end of the verify; the trailer
                # behind it is then not read either.
                try:
                    named = repo.codecs.pack_id(data)
                except (DamageError, UnsupportedVersionError) as e:
                    problems.append(f"pack {pack_id}: footer: {e}")
                else:
                    if named != pack_id:
                        problems.append(f"pack {pack_id}: contents do not match its id")
                    try:
                        repo.codecs.entries_from_tail(pack_id, data, len(data))
                    except (DamageError, UnsupportedVersionError) as e:
                        problems.append(f"pack {pack_id}: trailer: {e}")
                view = memoryview(data)
                for cid, loc in by_pack[pack_id]:
                    try:
                        repo.decode_chunk(cid, view[loc.offset : loc.offset + loc.length], loc)
                    except DamageError as e:
                        bad.add(cid)
                        problems.append(str(e))
                    chunks_checked += 1
                    bytes_checked += loc.raw_length
                task.advance(len(data))
        finally:
            task.close()
    for cid in bad:
        damaged.update(users[cid])
    report = VerifyReport(
        ok=not problems and not damaged,
        damaged=sorted(damaged),
        problems=problems,
        archives_checked=len(ids),
        chunks_checked=chunks_checked,
        bytes_checked=bytes_checked,
        full=full,
    )
    log.info("verify: %d archives, %d damaged, %d problems", len(ids), len(damaged), len(problems))
    return report


# ------------------------------------------------------------------------------ stats
@dataclass
class RepoStats:
    archives: int
    logical_bytes: int  # sum of stream sizes (holes included)
    data_bytes: int  # logical bytes minus holes
    unique_bytes: int  # raw bytes of distinct referenced chunks
    unique_stored_bytes: int  # their stored (compressed) size
    stored_bytes: int  # every object of the repository
    pack_bytes: int
    packs: int
    chunks: int  # distinct referenced chunks
    indexed_chunks: int
    #: bytes the chunk index takes in memory: what every capture and restore of this
    #: repository holds before its own data (32 bytes per slot of the hash table)
    index_memory_bytes: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.data_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.unique_stored_bytes if self.unique_stored_bytes else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "archives": self.archives,
            "logical_bytes": self.logical_bytes,
            "data_bytes": self.data_bytes,
            "unique_bytes": self.unique_bytes,
            "unique_stored_bytes": self.unique_stored_bytes,
            "stored_bytes": self.stored_bytes,
            "pack_bytes": self.pack_bytes,
            "packs": self.packs,
            "chunks": self.chunks,
            "indexed_chunks": self.indexed_chunks,
            "index_memory_bytes": self.index_memory_bytes,
            "dedup_ratio": round(self.dedup_ratio, 4),
            "compression_ratio": round(self.compression_ratio, 4),
        }


def stats(repo: Repository) -> RepoStats:
    """Sizes and ratios of the whole repository. Raises :class:`BackendError`."""
    index = repo.index
    logical = data = 0
    seen: set[bytes] = set()
    n = 0
    for archive in repo.iter_archives(on_damage=lambda aid, e: log.warning("%s: %s", aid, e)):
        n += 1
        for s in archive.streams:
            logical += s.size
            for i in range(s.slots):
                cid = s.chunk_id(i)
                if cid == repo.codecs.zero_id:
                    continue
                data += min(s.chunk_size, s.size - i * s.chunk_size)
                seen.add(cid)
    unique = unique_stored = 0
    for cid in seen:
        loc = index.get(cid)
        if loc is not None:
            unique += loc.raw_length
            unique_stored += loc.length
    stored = pack_bytes = packs = 0
    for o in repo.backend.list(""):
        stored += o.size
        if o.key.startswith("data/"):
            pack_bytes += o.size
            packs += 1
    return RepoStats(
        n,
        logical,
        data,
        unique,
        unique_stored,
        stored,
        pack_bytes,
        packs,
        len(seen),
        len(index),
        index.memory_bytes(),
    )


# ----------------------------------------------------------------------------- forget
def forget(repo: Repository, names: Iterable[str]) -> list[str]:
    """Remove archives (their data stays until gc); returns the ids removed.

    Resolves every name before removing anything.  Raises :class:`NotFoundError`,
    :class:`AmbiguousError`, :class:`LockedError`.
    """
    ids = sorted({repo.resolve(n) for n in names})
    # A shared lock (FORMAT.md section 18): forgetting only removes references, which a
    # concurrent writer never needs; gc, which deletes data, is what must be excluded.
    with repo.lock("shared"):
        for aid in ids:
            repo.backend.delete(f"archives/{aid}")
            log.info("forgot archive %s", aid)
    return ids


# ------------------------------------------------------------------------------ prune
@dataclass(frozen=True)
class PrunePolicy:
    """How many archives to keep per domain: the newest ``keep_last``, and the newest of
    each of the last N hours/days/ISO weeks/months (UTC) that have archives."""

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    #: archives with any of these tags are kept, whatever their age
    keep_tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not any(
            (
                self.keep_last,
                self.keep_hourly,
                self.keep_daily,
                self.keep_weekly,
                self.keep_monthly,
                self.keep_tags,
            )
        )


@dataclass
class PruneResult:
    keep: list[tuple[ArchiveSummary, list[str]]]  # (archive, reasons)
    forget: list[ArchiveSummary]
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "keep": [{**a.to_json(), "reasons": r} for a, r in self.keep],
            "forget": [a.to_json() for a in self.forget],
        }


_PERIODS: list[tuple[str, str]] = [
    ("hourly", "%Y-%m-%d %H"),
    ("daily", "%Y-%m-%d"),
    ("weekly", "%G-W%V"),
    ("monthly", "%Y-%m"),
]


def plan_prune(
    archives: list[ArchiveSummary], policy: PrunePolicy, domains: Sequence[str] = ()
) -> PruneResult:
    """Decide, per domain, which archives the policy keeps (pure; no I/O).

    A domain is its UUID as recorded at capture (its name for archives without one): a
    guest keeps one history across a rename, and two guests of the same name on different
    hosts of a shared repository keep one each.  ``domains`` (names or UUIDs): only their
    archives are considered, the others are neither kept nor forgotten.

    Raises :class:`UsageError` for an empty policy (it would forget everything) or a
    negative count.
    """
    counts = (
        policy.keep_last,
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
    )
    if any(c < 0 for c in counts):
        raise UsageError("keep counts must not be negative")
    if policy.empty():
        raise UsageError("prune needs at least one --keep-* option (it would forget every archive)")
    by_domain: dict[str, list[tuple[datetime, ArchiveSummary]]] = defaultdict(list)
    for a in archives:
        if domains and not any(a.of_domain(d) for d in domains):
            continue
        key = str(a.metadata.get("uuid") or "").lower() or f"name:{a.domain}"
        by_domain[key].append((parse_time(a.time), a))
    keep: list[tuple[ArchiveSummary, list[str]]] = []
    drop: list[ArchiveSummary] = []
    # by the name of each domain's newest archive, then its key: a stable report order
    for key in sorted(by_domain, key=lambda k: (max(by_domain[k], key=_newest)[1].domain, k)):
        group = sorted(by_domain[key], key=_newest, reverse=True)
        reasons: dict[str, list[str]] = defaultdict(list)
        for _, a in group:
            for tag in policy.keep_tags:
                if tag in a.tags:
                    reasons[a.id].append(f"tag {tag}")
        for i, (_, a) in enumerate(group[: policy.keep_last]):
            reasons[a.id].append(f"last #{i + 1}")
        for name, fmt in _PERIODS:
            n = getattr(policy, f"keep_{name}")
            seen: list[str] = []
            for t, a in group:
                if len(seen) >= n:
                    break
                bucket = t.astimezone(tz=t.tzinfo).strftime(fmt)
                if bucket not in seen:
                    seen.append(bucket)
                    reasons[a.id].append(f"{name} {bucket}")
        for _, a in group:
            if a.id in reasons:
                keep.append((a, reasons[a.id]))
            else:
                drop.append(a)
    return PruneResult(keep, drop, dry_run=True)


def _newest(t: tuple[datetime, ArchiveSummary]) -> tuple[datetime, str]:
    return t[0], t[1].id


def prune(
    repo: Repository, policy: PrunePolicy, *, dry_run: bool = False, domains: Sequence[str] = ()
) -> PruneResult:
    """Forget the archives ``policy`` does not keep (per domain; only ``domains``' when
    given, see :func:`plan_prune`); gc reclaims the space.

    Raises :class:`UsageError` (empty policy), :class:`LockedError`, :class:`BackendError`.
    """
    with repo.lock("exclusive"):
        archives = repo.list_archives()
        for d in domains:
            if not any(a.of_domain(d) for a in archives):
                log.warning("prune: no archive of domain %r", d)
        result = plan_prune(archives, policy, domains)
        result.dry_run = dry_run
        if not dry_run:
            for a in result.forget:
                repo.backend.delete(f"archives/{a.id}")
                log.info("pruned archive %s (%s %s)", a.id, a.domain, a.time)
    return result


# --------------------------------------------------------------------------------- gc
@dataclass(frozen=True)
class GcOptions:
    #: Packs and index files younger than this (seconds) are never deleted or rewritten.
    grace: float = C.GC_GRACE_PERIOD
    #: Repack a pack whose live bytes are below this fraction of its blob bytes.
    repack_below: float = 0.5
    dry_run: bool = False


@dataclass
class GcResult:
    live_chunks: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_kept_young: int = 0
    indices_deleted: int = 0
    indices_written: int = 0
    bytes_freed: int = 0
    missing_chunks: int = 0
    temporaries_deleted: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gc(
    repo: Repository, options: GcOptions | None = None, *, progress: Progress = NULL_PROGRESS
) -> GcResult:
    """Mark and sweep under an exclusive lock (see the module docstring).

    Raises :class:`LockedError`, :class:`DamageError` if a manifest cannot be read (gc
    cannot know what it references, so it deletes nothing), :class:`BackendError`.
    """
    options = options or GcOptions()
    result = GcResult(dry_run=options.dry_run)
    with repo.lock("exclusive") as lock:
        now = repo.locks.ctx.clock()
        packs = _packs(repo)
        repo.reload_index(set(packs))
        if repo.index_problems:
            raise DamageError(
                "gc refuses to run while index files are damaged (run `vmarchive rebuild-index`): "
                + "; ".join(repo.index_problems)
            )
        # Mark.
        live: set[bytes] = set()
        for archive in repo.iter_archives():
            live.update(archive.chunk_ids())
        result.live_chunks = len(live)
        index = repo.index
        for cid in live:
            if cid not in index:
                result.missing_chunks += 1
        if result.missing_chunks:
            log.warning("gc: %d referenced chunks are missing (run verify)", result.missing_chunks)

        index_objs = {o.key.split("/", 1)[1]: o for o in repo.backend.list("index/")}
        young_indices = {n for n, o in index_objs.items() if now - o.mtime < options.grace}
        old_indices = set(index_objs) - young_indices
        # Packs named by young index files, or young themselves, are untouchable.
        protected = {p for p, o in packs.items() if now - o.mtime < options.grace}
        for name in young_indices:
            try:
                for _cid, loc in repo.codecs.decode_index(repo.backend.get(f"index/{name}")):
                    protected.add(loc.pack_id)
            except ObjectNotFoundError:
                continue
        result.packs_kept_young = len(protected & set(packs))

        # Live bytes per pack, from the current index.
        entries_by_pack: dict[str, list[tuple[bytes, Location]]] = defaultdict(list)
        for cid, loc in index.items():
            entries_by_pack[loc.pack_id].append((cid, loc))
        to_delete: list[str] = []
        to_repack: list[str] = []
        for pack_id, info in packs.items():
            if pack_id in protected:
                continue
            entries = entries_by_pack.get(pack_id, [])
            live_bytes = sum(loc.length for cid, loc in entries if cid in live)
            # Measure against the pack's size, not its index entries: dead entries are
            # dropped from the consolidated index, their bytes stay in the pack.
            if live_bytes == 0:
                to_delete.append(pack_id)
            elif live_bytes < options.repack_below * info.size:
                to_repack.append(pack_id)
        if options.dry_run:
            result.packs_deleted = len(to_delete)
            result.packs_repacked = len(to_repack)
            result.bytes_freed = sum(packs[p].size for p in to_delete)
            return result

        # Repack: copy live blobs verbatim (no recompression) into new packs.
        moved: dict[bytes, Location] = {}
        builder = repo.codecs.new_pack()
        task = progress.task("gc repack", total=len(to_repack), unit="pack")

        def flush() -> None:
            nonlocal builder
            if builder.count == 0:
                return
            pack_id, data, entries = repo.codecs.finish_pack(builder)
            repo._publish_pack(pack_id, data)
            crashpoint.hit("gc-after-pack")
            moved.update(entries)
            result.packs_written += 1
            builder = repo.codecs.new_pack()

        try:
            for pack_id in to_repack:
                data = repo.backend.get(pack_key(pack_id))
                for cid, loc in sorted(entries_by_pack[pack_id], key=lambda e: e[1].offset):
                    if cid not in live or cid in moved:
                        continue
                    blob = data[loc.offset : loc.offset + loc.length]
                    # Never propagate damage into a new pack: verify before copying.
                    repo.decode_chunk(cid, blob, loc)
                    builder.add(cid, blob, loc.raw_length)
                    if builder.size >= repo.codecs.pack_target:
                        flush()
                task.advance(1)
            flush()
        finally:
            task.close()
        lock.check()

        # Consolidated index: live entries of old index files, moved ones re-pointed.
        # A repack can reproduce a pack byte for byte (same live blobs, no encryption
        # nonce), hence the same id: that pack is live again and must survive.
        doomed = (set(to_delete) | set(to_repack)) - {loc.pack_id for loc in moved.values()}
        new_entries: list[tuple[bytes, Location]] = []
        for cid, loc in index.items():
            if cid not in live and loc.pack_id not in protected:
                continue
            if cid in moved:
                new_entries.append((cid, moved[cid]))
            elif loc.pack_id not in doomed:
                new_entries.append((cid, loc))
        for cid, loc in moved.items():
            if cid not in index:
                new_entries.append((cid, loc))
        new_name: str | None = None
        dead_entries = len(new_entries) != len(index)
        if new_entries and (len(old_indices) > 1 or moved or doomed or dead_entries):
            crashpoint.hit("gc-before-index")
            new_name = repo._publish_index(new_entries)
            crashpoint.hit("gc-after-index")
            result.indices_written = 1
        for name in sorted(old_indices):
            if name != new_name and (new_name is not None or not new_entries):
                repo.backend.delete(f"index/{name}")
                result.indices_deleted += 1
                crashpoint.hit("gc-after-index-delete")
        for pack_id in sorted(doomed):
            result.bytes_freed += packs[pack_id].size
            repo.backend.delete(pack_key(pack_id))
            crashpoint.hit("gc-after-delete")
        result.packs_deleted = len(set(to_delete) & doomed)
        result.temporaries_deleted = repo.backend.clean_temporaries(options.grace)
        result.packs_repacked = len(to_repack)
        repo.reload_index()
    log.info("gc: %s", result)
    return result


# ------------------------------------------------------------------------ rebuild index
@dataclass
class RebuildResult:
    packs_read: int = 0
    chunks_added: int = 0
    damaged_packs: list[str] = field(default_factory=list)
    indices_deleted: int = 0
    indices_repaired: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rebuild_index(repo: Repository, *, dry_run: bool = False) -> RebuildResult:
    """Re-index every chunk the pack trailers list but no readable index does, then
    delete unreadable index files (after the new index is durable).

    Runs under the exclusive lock.  Raises :class:`LockedError`, :class:`BackendError`.
    """
    result = RebuildResult(dry_run=dry_run)
    with repo.lock("exclusive"):
        packs = _packs(repo)
        repo.reload_index(set(packs))
        damaged_indices = [p.split(":", 1)[0].removeprefix("index ") for p in repo.index_problems]
        index = repo.index
        new: list[tuple[bytes, Location]] = []
        for pack_id, info in sorted(packs.items()):
            key = pack_key(pack_id)
            try:
                first = min(info.size, repo.codecs.pack_tail_first_fetch())
                tail = repo.backend.get_range(key, info.size - first, first)
                need = repo.codecs.pack_tail_size(tail)
                if need > len(tail):
                    tail = repo.backend.get_range(key, info.size - need, need)
                entries = repo.codecs.entries_from_tail(pack_id, tail, info.size)
            except DamageError as e:
                result.damaged_packs.append(pack_id)
                log.warning("pack %s: trailer unreadable: %s", pack_id, e)
                continue
            except ObjectNotFoundError:
                continue
            result.packs_read += 1
            for cid, loc in entries:
                if cid not in index:
                    new.append((cid, loc))
                    index.add(cid, loc)
        result.chunks_added = len(new)
        if dry_run:
            return result
        new_name = repo._publish_index(new, replace=True) if new else None
        for name in damaged_indices:
            if name == new_name:
                result.indices_repaired += 1  # the rebuilt index has its name: replaced
                continue
            repo.backend.delete(f"index/{name}")
            result.indices_deleted += 1
        repo.reload_index()
    return result
