"""forget, prune (policy and effect), gc (sweep, repack, consolidation, grace), stats."""

from __future__ import annotations

import pathlib
import random

import pytest
from storehelpers import CHUNK, make_repo, pack_keys, read_archive, write_archive

from vmarchive.errors import NotFoundError, UsageError
from vmarchive.store import ArchiveSummary, GcOptions, PrunePolicy, Repository
from vmarchive.store.maintenance import plan_prune


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def summ(
    i: int, time: str, domain: str = "vm", uuid: str | None = None, tags: tuple[str, ...] = ()
) -> ArchiveSummary:
    meta = {"uuid": uuid} if uuid else {}
    return ArchiveSummary(
        id=f"{i:064x}", time=time, domain=domain, kind="full", tags=list(tags), metadata=meta
    )


def kept(policy: PrunePolicy, archives: list[ArchiveSummary]) -> set[int]:
    return {int(a.id, 16) for a, _ in plan_prune(archives, policy).keep}


def test_prune_keep_last_is_per_domain() -> None:
    arch = [summ(i, f"2026-01-01T{i:02d}:00:00Z", "a" if i % 2 else "b") for i in range(10)]
    assert kept(PrunePolicy(keep_last=2), arch) == {9, 7, 8, 6}


def test_prune_periods_keep_the_newest_of_each_bucket() -> None:
    # Three archives a day for ten days, at 01:00, 09:00 and 17:00 UTC.
    arch = []
    for day in range(1, 11):
        for j, hour in enumerate((1, 9, 17)):
            arch.append(summ(day * 10 + j, f"2026-03-{day:02d}T{hour:02d}:00:00Z"))
    assert kept(PrunePolicy(keep_daily=3), arch) == {102, 92, 82}
    assert kept(PrunePolicy(keep_hourly=4), arch) == {102, 101, 100, 92}
    # 2026-03-01 is a Sunday: ISO weeks 09 (1st), 10 (2nd-8th), 11 (9th, 10th).
    assert kept(PrunePolicy(keep_weekly=2), arch) == {102, 82}
    assert kept(PrunePolicy(keep_monthly=5), arch) == {102}
    assert kept(PrunePolicy(keep_last=1, keep_daily=2), arch) == {102, 92}
    # Time zones: 2026-03-02T00:30+02:00 is March 1st in UTC.
    tz = [summ(1, "2026-03-01T10:00:00Z"), summ(2, "2026-03-02T00:30:00+02:00")]
    assert kept(PrunePolicy(keep_daily=1), tz) == {2}


U1 = "11111111-1111-4111-8111-111111111111"
U2 = "22222222-2222-4222-8222-222222222222"


def test_prune_tells_domains_apart_by_uuid_not_name() -> None:
    # web01 on two hosts of a shared repository: two guests, one name
    arch = [summ(i, f"2026-01-01T{i:02d}:00:00Z", "web01", U1 if i % 2 else U2) for i in range(8)]
    assert kept(PrunePolicy(keep_last=1), arch) == {7, 6}
    # a rename keeps one history (the UUID's), in any case
    renamed = [
        summ(1, "2026-01-01T01:00:00Z", "old-name", U1),
        summ(2, "2026-01-01T02:00:00Z", "new-name", U1.upper()),
    ]
    assert kept(PrunePolicy(keep_last=1), renamed) == {2}
    # archives without a UUID (older ones) are grouped by name, apart from the UUID's
    legacy = [summ(1, "2026-01-01T01:00:00Z", "web01"), summ(2, "2026-01-01T02:00:00Z", "web01")]
    assert kept(PrunePolicy(keep_last=1), legacy + arch) == {2, 7, 6}


def test_prune_keeps_tagged_archives_and_a_tag_alone_is_a_policy() -> None:
    arch = [
        summ(i, f"2026-01-01T{i:02d}:00:00Z", tags=("pre-upgrade",) if i == 2 else ())
        for i in range(6)
    ]
    res = plan_prune(arch, PrunePolicy(keep_last=1, keep_tags=("pre-upgrade", "other")))
    assert {int(a.id, 16): r for a, r in res.keep} == {5: ["last #1"], 2: ["tag pre-upgrade"]}
    assert kept(PrunePolicy(keep_tags=("pre-upgrade",)), arch) == {2}
    assert kept(PrunePolicy(keep_tags=("nothing-has-it",)), arch) == set()


def test_prune_of_some_domains_leaves_the_others_alone() -> None:
    arch = [
        summ(i, f"2026-01-01T{i:02d}:00:00Z", f"vm{i % 3}", f"{i % 3}" * 8 + U1[8:])
        for i in range(9)
    ]
    res = plan_prune(arch, PrunePolicy(keep_last=1), domains=("vm1", "2" * 8 + U1[8:]))
    assert {int(a.id, 16) for a, _ in res.keep} == {7, 8}
    assert {int(a.id, 16) for a in res.forget} == {1, 4, 2, 5}  # nothing of vm0


def test_prune_refuses_an_empty_or_negative_policy() -> None:
    with pytest.raises(UsageError):
        plan_prune([summ(1, "2026-01-01T00:00:00Z")], PrunePolicy())
    with pytest.raises(UsageError):
        plan_prune([], PrunePolicy(keep_last=-1))


def test_prune_dry_run_then_real(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    ids = [
        write_archive(repo, {"s": rnd(100, i)}, time=f"2026-01-{i + 1:02d}T00:00:00Z")
        for i in range(5)
    ]
    dry = repo.prune(PrunePolicy(keep_last=2), dry_run=True)
    assert {a.id for a in dry.forget} == set(ids[:3])
    assert len(repo.list_archives()) == 5
    real = repo.prune(PrunePolicy(keep_last=2))
    assert {a.id for a in real.forget} == set(ids[:3])
    assert [a.id for a in repo.list_archives()] == ids[3:]


def test_forget_resolves_all_names_first(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    a = write_archive(repo, {"s": b"a"})
    b = write_archive(repo, {"s": b"b"}, domain="other")
    with pytest.raises(NotFoundError):
        repo.forget([a, "ffff" if not b.startswith("ffff") else "eeee"])
    assert len(repo.list_archives()) == 2  # nothing removed
    assert repo.forget([a[:8]]) == [a]
    assert [x.id for x in repo.list_archives()] == [b]


def test_gc_sweeps_repacks_and_consolidates(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    keep_data = rnd(6 * CHUNK, 1)
    # One stream of a dropped archive ends in chunks a kept one needs, so its last pack
    # is mixed (each stream fills packs of its own).
    drop = rnd(60 * CHUNK, 2)
    mixed = write_archive(repo, {"t": drop + keep_data})
    keeper = write_archive(repo, {"k": keep_data + rnd(60 * CHUNK, 3)}, time="2026-01-02T00:00:00Z")
    junk = write_archive(repo, {"j": rnd(60 * CHUNK, 4)}, time="2026-01-03T00:00:00Z")
    for _ in range(3):
        write_archive(repo, {"dup": keep_data}, time="2026-01-04T00:00:00Z")  # more index files
    before = repo.stats()
    repo.forget([mixed, junk])
    assert repo.gc(GcOptions(grace=1e9)).packs_deleted == 0  # everything is young
    result = repo.gc(GcOptions(grace=0))
    assert result.packs_deleted > 0
    assert result.bytes_freed > 0
    after = Repository.open(str(tmp_path / "r"))
    assert len(list(after.backend.list("index/"))) == 1
    assert read_archive(after, keeper)["k"] == keep_data + rnd(60 * CHUNK, 3)
    assert after.verify(full=True).ok
    st = after.stats()
    assert st.pack_bytes < before.pack_bytes / 2
    assert st.indexed_chunks == st.chunks  # no dead entries left
    # A second gc has nothing left to do.
    again = after.gc(GcOptions(grace=0))
    assert (again.packs_deleted, again.packs_repacked, again.indices_written) == (0, 0, 0)


def test_gc_repacks_a_mostly_garbage_pack(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    live = rnd(CHUNK, 10)
    first = write_archive(repo, {"a": live + rnd(10 * CHUNK, 11)})
    only_live = write_archive(repo, {"a": live}, time="2026-01-02T00:00:00Z")
    (old_pack,) = pack_keys(repo)
    repo.forget([first])
    result = repo.gc(GcOptions(grace=0))
    assert result.packs_repacked == 1 and result.packs_written == 1
    (new_pack,) = pack_keys(repo)
    assert new_pack != old_pack
    assert read_archive(Repository.open(str(tmp_path / "r")), only_live) == {"a": live}


def test_stats(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    text = b"hello world!" * 2048  # compressible, 6 whole chunks
    write_archive(repo, {"s": text + bytes(4 * CHUNK)})
    write_archive(repo, {"s": text})
    st = repo.stats()
    assert st.archives == 2
    assert st.logical_bytes == 2 * len(text) + 4 * CHUNK
    assert st.data_bytes == 2 * len(text)
    assert st.dedup_ratio > 1.9
    assert st.compression_ratio > 10
    assert st.stored_bytes >= st.pack_bytes > 0
    j = st.to_json()
    assert j["logical_bytes"] == st.logical_bytes and "stored_bytes" in j


def test_gc_repack_reproducing_an_identical_pack_keeps_it(tmp_path: pathlib.Path) -> None:
    """Regression (found by the property test): repacking a fully live pack in an
    unencrypted repository yields the same bytes, hence the same pack id; gc must not
    then delete it as the 'old' pack."""
    repo = make_repo(tmp_path / "r")
    data = rnd(5 * CHUNK, 5)
    aid = write_archive(repo, {"s": data})
    packs = pack_keys(repo)
    result = repo.gc(GcOptions(grace=0, repack_below=1.0))
    assert result.packs_repacked == len(packs)
    assert pack_keys(repo) == packs
    fresh = Repository.open(str(tmp_path / "r"))
    assert read_archive(fresh, aid) == {"s": data}
    assert fresh.verify(full=True).ok


def test_gc_removes_old_temporaries_only(tmp_path: pathlib.Path) -> None:
    import os
    import time

    repo = make_repo(tmp_path / "r")
    write_archive(repo, {"s": rnd(CHUNK, 1)})
    d = tmp_path / "r" / "data"
    old, fresh = d / ".tmp-old", d / ".tmp-fresh"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    assert repo.gc(GcOptions(grace=3600)).temporaries_deleted == 1
    assert not old.exists() and fresh.exists()


def test_dangling_index_entry_never_shadows_the_real_one(tmp_path: pathlib.Path) -> None:
    """An index entry naming a pack that is gone (damage, manual deletion) must not hide
    the chunk's good location from gc (which would then delete the only copy) or readers."""
    from collections.abc import Iterator

    from vmarchive.store.backend import ObjectInfo
    from vmarchive.store.chunkindex import Location
    from vmarchive.store.faulty import FaultyBackend
    from vmarchive.store.local import LocalBackend

    path = tmp_path / "r"
    repo = make_repo(path)
    data = rnd(8 * CHUNK, 9)
    aid = write_archive(repo, {"s": data})
    entries = [
        (cid, Location("ab" * 32, loc.offset, loc.length, loc.raw_length))
        for cid, loc in repo.index.items()
    ]
    dangling = repo._publish_index(entries)

    class DanglingFirst(FaultyBackend):
        def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
            items = list(super().list(prefix))
            return iter(sorted(items, key=lambda o: not o.key.endswith(dangling)))

    be = DanglingFirst(LocalBackend(str(path)))
    # A reader falls back past the dangling entry.
    assert read_archive(Repository.open(str(path), backend=be), aid) == {"s": data}
    shadowed = Repository.open(str(path), backend=be)
    assert shadowed.verify(full=True).ok  # dangling entries skipped: nothing is damaged
    shadowed.gc(GcOptions(grace=0))
    fresh = Repository.open(str(path), backend=be)
    assert read_archive(fresh, aid) == {"s": data}
    assert fresh.verify(full=True).ok
