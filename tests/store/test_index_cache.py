"""The local cache of the chunk index: a repository opens without decoding the index
objects it has already seen, and is never wrong (stale, damaged, gc'd or encrypted)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
from storehelpers import PASSPHRASE, make_repo, read_archive, write_archive

from vmarchive.store import Repository, maintenance
from vmarchive.store.chunkindex import ChunkIndex, Location
from vmarchive.store.codecs import Codecs
from vmarchive.store.indexcache import IndexCache
from vmarchive.store.maintenance import GcOptions
from vmarchive.store.summarycache import CACHE_ENV


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    d = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(d))
    yield d


def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the index objects decoded from now on (each call: its entry count)."""
    seen: list[int] = []
    real = Codecs.decode_index_packed

    def counting(self: Codecs, data: bytes) -> tuple[list[str], memoryview]:
        packs, records = real(self, data)
        seen.append(len(records) // 32)
        return packs, records

    monkeypatch.setattr(Codecs, "decode_index_packed", counting)
    return seen


def index_of(repo: Repository) -> dict[bytes, Location]:
    return dict(repo.index.items())


def two_archives(path: pathlib.Path) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    repo = make_repo(path)
    data = {
        "a": {"s": os.urandom(40_000)},
        "b": {"s": os.urandom(30_000), "t": bytes(8192) + b"x" * 9000},
    }
    ids = [write_archive(repo, data["a"]), write_archive(repo, data["b"])]
    repo.close()
    return ids, {ids[0]: data["a"], ids[1]: data["b"]}


def test_snapshot_round_trip_and_its_checks() -> None:
    idx = ChunkIndex()
    packs = [os.urandom(32).hex() for _ in range(3)]
    ids = [os.urandom(16) for _ in range(500)]
    for i, c in enumerate(ids):
        idx.add(c, Location(packs[i % 3], 28 + i, 10 + i, 20))
    head, plist, table = (bytes(x) for x in idx.snapshot())
    back = ChunkIndex.from_snapshot(head, plist, bytearray(table))
    assert len(back) == 500 and dict(back.items()) == dict(idx.items())
    assert back.get(os.urandom(16)) is None
    back.check()
    first_used = next(i for i in range(0, len(table), 32) if table[i + 16 : i + 20] != bytes(4))
    bad = bytearray(table)
    bad[first_used + 16 : first_used + 20] = (9).to_bytes(4, "little")
    with pytest.raises(ValueError, match="pack number"):
        ChunkIndex.from_snapshot(head, plist, bad).check()
    miscounted = (501).to_bytes(8, "little") + head[8:]
    with pytest.raises(ValueError, match="count"):
        ChunkIndex.from_snapshot(miscounted, plist, bytearray(table)).check()
    with pytest.raises(ValueError, match="sizes"):
        ChunkIndex.from_snapshot(head, plist, bytearray(table[:-32]))


def test_a_table_that_fails_its_check_is_not_written(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load trusts a table whose checksum holds, so save writes only checked ones
    (control: the same index, its count right, is written and loads)."""
    idx = ChunkIndex()
    pack = os.urandom(32).hex()
    for i in range(40):
        idx.add(os.urandom(16), Location(pack, 16 + i, 10, 20))
    name = os.urandom(32).hex()
    cache = IndexCache(str(tmp_path / "index-x.bin"))
    idx._count += 1  # a bug of ours, say
    cache.save(idx, {name})
    assert not os.path.exists(cache.path) and "count" in caplog.text
    idx._count -= 1
    cache.save(idx, {name})
    got = cache.load({name})
    assert got is not None and dict(got[0].items()) == dict(idx.items())


def test_second_open_decodes_no_index_object(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, data = two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as first:  # builds the cache
        want = index_of(first)
    assert list(cache_dir.glob("index-*.bin"))
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == want
        assert {a: read_archive(again, a) for a in ids} == data
    assert seen == []


def test_negative_control_without_cache_every_index_object_is_decoded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as first:
        _ = first.index
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        _ = again.index
        files = len(again.index_files())
    assert len(seen) == files >= 2


def test_new_index_objects_are_added_on_top(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as r:
        _ = r.index  # the cache
    with monkeypatch.context() as m:  # a writer elsewhere (another host: not our cache)
        m.setenv(CACHE_ENV, "off")
        with Repository.open(str(tmp_path / "r")) as r:
            new_id = write_archive(r, {"n": os.urandom(20_000)})  # one more index object
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert read_archive(again, new_id)["n"]
        got = index_of(again)
    assert len(seen) == 1  # only the new one
    monkeypatch.setenv(CACHE_ENV, "off")
    with Repository.open(str(tmp_path / "r")) as plain:
        assert index_of(plain) == got


def test_a_commit_leaves_the_cache_current(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's own index object goes into the cache at commit: the next command
    does not decode what this one has just written (a first capture of a large disk
    wrote hundreds of thousands of entries).  The cache is still exactly the index
    objects' contents."""
    two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as r:
        new_id = write_archive(r, {"n": os.urandom(20_000)})
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert read_archive(again, new_id)["n"]
        got = index_of(again)
        files = again.index_files()
    assert seen == [] and len(files) == 3
    monkeypatch.setenv(CACHE_ENV, "off")
    with Repository.open(str(tmp_path / "r")) as plain:
        assert index_of(plain) == got and plain.index_files() == files


def test_negative_control_an_index_loaded_for_verify_is_not_cached_at_commit(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify and gc load the index without the entries naming missing packs: not the
    index objects' contents, so a commit after them leaves the cache alone (the next
    open decodes the new object, as it did before commits wrote the cache)."""
    two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as r:
        assert r.verify(full=False).ok
        write_archive(r, {"n": os.urandom(20_000)})
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        _ = again.index
    assert len(seen) == 1


def test_a_commit_beside_another_writer_does_not_cache_its_entries(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path
) -> None:
    """While another writer of the same Repository runs, its published packs' chunks are
    in the in-memory index but in no index object: a commit then must not write the
    cache, or every later open would take chunks for present that no index names (here:
    those of the other writer, which then gives up)."""
    repo = make_repo(tmp_path / "r")
    other = repo.writer()
    sw = other.stream("o", "disk", 400 * 4096)
    theirs = [os.urandom(4096) for _ in range(400)]
    for i, c in enumerate(theirs):
        sw.write_chunk(i, c)
    assert other.packs_written > 0  # some of them are in the in-memory index
    mine = write_archive(repo, {"m": os.urandom(20_000)})
    other.abort()
    repo.close()
    with Repository.open(str(tmp_path / "r")) as fresh:
        assert read_archive(fresh, mine)["m"]
        ids = [fresh.codecs.chunk_id(c) for c in theirs]
        assert fresh._missing_chunks(ids) == ids


def test_a_cache_that_cannot_be_written_never_fails_the_commit(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is published before the cache is written: whatever goes wrong then,
    the commit has happened and says so (the control: the error does reach save)."""
    calls: list[int] = []

    def broken(self: IndexCache, index: ChunkIndex, names: set[str]) -> None:
        calls.append(len(names))
        raise RuntimeError("cache writer broke")

    monkeypatch.setattr(IndexCache, "save", broken)
    repo = make_repo(tmp_path / "r")
    aid = write_archive(repo, {"n": b"y" * 9000})
    assert calls and read_archive(repo, aid)["n"] == b"y" * 9000


def test_a_vanished_index_object_rebuilds_from_the_repository(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc on another host (no cache of ours involved) rewrites the index objects naming
    the packs it deletes: the cache names one that is gone, so it is not used."""
    ids, data = two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as r:
        _ = r.index  # the cache, built before the gc
    monkeypatch.setenv(CACHE_ENV, "off")
    with Repository.open(str(tmp_path / "r")) as other_host:
        maintenance.forget(other_host, [ids[0]])
        result = other_host.gc(GcOptions(grace=0))
        assert result.indices_deleted, result  # the case under test
        want = index_of(other_host)
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        got = index_of(again)
        files = len(again.index_files())
        assert read_archive(again, ids[1]) == data[ids[1]]
    assert len(seen) == files  # rebuilt, not served from the stale cache
    assert got == want
    seen.clear()
    with Repository.open(str(tmp_path / "r")) as later:  # and cached again
        assert index_of(later) == want
    assert seen == []


def test_a_damaged_cache_is_rebuilt(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, data = two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as first:
        want = index_of(first)
    (path,) = cache_dir.glob("index-*.bin")
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0x01  # inside the table: only the checksum can tell
    path.write_bytes(bytes(raw))
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == want
        assert {a: read_archive(again, a) for a in ids} == data
    assert seen  # decoded again
    path.write_bytes(b"VMARIDXC")  # truncated: rebuilt as well
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == want


def encrypted_archives(path: pathlib.Path) -> tuple[list[str], dict[str, dict[str, bytes]]]:
    """:func:`two_archives` in an encrypted repository."""
    repo = make_repo(path, encrypted=True)
    data = {"a": {"s": os.urandom(40_000)}, "b": {"s": os.urandom(30_000)}}
    ids = [write_archive(repo, data["a"]), write_archive(repo, data["b"])]
    repo.close()
    return ids, {ids[0]: data["a"], ids[1]: data["b"]}


def names_in_the_clear(repo: Repository, blob: bytes) -> int:
    """How many of the repository's pack ids and chunk ids appear in ``blob`` as bytes."""
    idx = repo.index
    secrets = [bytes.fromhex(p) for p in idx._packs] + [cid for cid, _ in idx.items()]
    return sum(1 for x in secrets if x in blob)


def test_an_encrypted_repository_gets_a_sealed_cache(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encrypted repository opens from its cache too (no index object decoded), and
    the cache's files name no pack and no chunk in the clear.  Controls: a plain
    repository's cache names them all; without the cache every object is decoded."""
    ids, data = encrypted_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r"), PASSPHRASE) as first:
        want = index_of(first)
        new_id = write_archive(first, {"n": os.urandom(20_000)})  # a journal record too
        want = index_of(first)
    table, journal = cache_files(cache_dir)
    assert table.read_bytes().startswith(b"VMARIDXE")
    assert journal.read_bytes().startswith(b"VMARIDJE") and journal.stat().st_size > 100
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r"), PASSPHRASE) as again:
        assert index_of(again) == want
        assert {a: read_archive(again, a) for a in ids} == data
        assert read_archive(again, new_id)["n"]
        assert names_in_the_clear(again, table.read_bytes() + journal.read_bytes()) == 0
    assert seen == []
    monkeypatch.setenv(CACHE_ENV, "off")
    with Repository.open(str(tmp_path / "r"), PASSPHRASE) as uncached:
        assert index_of(uncached) == want
    assert len(seen) == 3
    monkeypatch.setenv(CACHE_ENV, str(cache_dir / "plain"))
    two_archives(tmp_path / "p")
    with Repository.open(str(tmp_path / "p")) as plain:
        _ = plain.index
        write_archive(plain, {"n": os.urandom(20_000)})
        (ptable,) = (cache_dir / "plain").glob("index-*.bin")
        blob = ptable.read_bytes() + ptable.with_suffix(".journal").read_bytes()
        assert names_in_the_clear(plain, blob) == len(plain.index._packs) + len(plain.index)


def sealed_cache(path: pathlib.Path, key: bytes) -> tuple[IndexCache, ChunkIndex, str]:
    """A sealed cache file of an index of 3,000 chunks in 7 packs, saved."""
    idx = ChunkIndex()
    packs = [os.urandom(32).hex() for _ in range(7)]
    for i in range(3000):
        idx.add(os.urandom(16), Location(packs[i % 7], 16 + i, 100 + i, 200 + i))
    name = os.urandom(32).hex()
    cache = IndexCache(str(path), seal_key=key)
    cache.save(idx, {name})
    return cache, idx, name


def test_a_sealed_table_opens_only_whole_in_place_and_with_its_key(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table sealed in segments (small here: 40 of them) loads exactly; a byte
    changed, a segment dropped or two swapped, another key, a plain reader: no cache."""
    from vmarchive.store import indexcache

    monkeypatch.setattr(indexcache, "SEAL_SEGMENT", 4096)
    key = os.urandom(32)
    path = tmp_path / "index-x.bin"
    cache, idx, name = sealed_cache(path, key)
    got = cache.load({name})
    assert got is not None and dict(got[0].items()) == dict(idx.items()) and got[1] == {name}
    whole = path.read_bytes()
    seg = 4096 + 28
    first = len(whole) - (len(idx._buf) // 4096) * seg  # where the table's segments start
    assert first > 0 and (len(whole) - first) % seg == 0
    flipped = bytearray(whole)
    flipped[first + seg + 100] ^= 1
    dropped = whole[:first] + whole[first + seg :]
    swapped = whole[:first] + whole[first + seg : first + 2 * seg] + whole[first : first + seg]
    swapped += whole[first + 2 * seg :]
    for bad in (bytes(flipped), dropped, swapped, whole[:-1]):
        path.write_bytes(bad)
        assert cache.load({name}) is None
    path.write_bytes(whole)
    assert IndexCache(str(path), seal_key=os.urandom(32)).load({name}) is None
    assert IndexCache(str(path)).load({name}) is None
    assert cache.load({name}) is not None  # the control: the same file, untouched
    IndexCache(str(path)).save(idx, {name})  # a plain table where a sealed one is read
    assert cache.load({name}) is None


def test_a_sealed_journal_ends_at_a_record_that_does_not_open(tmp_path: pathlib.Path) -> None:
    """Records appended to a sealed journal add their objects; one damaged (or sealed
    with another key) ends the journal there, as a checksum failure does."""
    key = os.urandom(32)
    cache, idx, name = sealed_cache(tmp_path / "index-x.bin", key)
    objects = []
    for _ in range(3):
        new = [(os.urandom(16), Location(os.urandom(32).hex(), 16, 10, 20)) for _ in range(50)]
        records, plist = ChunkIndex.pack_entries(new)
        objects.append((os.urandom(32).hex(), plist, records, new))
    for obj_name, plist, records, _new in objects:
        assert cache.append([(obj_name, plist, records)])
    listed = {name} | {o[0] for o in objects}
    got = cache.load(listed)
    assert got is not None and got[1] == listed
    assert dict(got[0].items()) == dict(idx.items()) | {c: loc for o in objects for c, loc in o[3]}
    journal = pathlib.Path(cache.journal_path)
    whole = journal.read_bytes()
    record = (len(whole) - 12) // 3
    damaged = bytearray(whole)
    damaged[12 + record + 40] ^= 1  # inside the second record
    journal.write_bytes(bytes(damaged))
    got = cache.load(listed)
    assert got is not None and got[1] == {name, objects[0][0]}
    journal.write_bytes(whole)
    other = IndexCache(cache.path, seal_key=os.urandom(32))
    assert other.load(listed) is None  # its table does not open either
    foreign = whole[:12] + IndexCache(cache.path, seal_key=os.urandom(32))._frame(b"x" * 80)
    journal.write_bytes(foreign + whole[12:])
    got = cache.load(listed)
    assert got is not None and got[1] == {name}  # ends at the first, foreign record


def test_gc_and_verify_never_use_the_cache(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    two_archives(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as first:
        _ = first.index
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as r:
        assert maintenance.verify(r, full=True).ok  # it reloads with the listed packs
        files = len(r.index_files())
    assert len(seen) == files  # every object decoded, though the cache was there


# -- the journal: a commit appends its index objects instead of rewriting the table ------


def two_archives_cached(path: pathlib.Path) -> None:
    """:func:`two_archives`, then an open that leaves the cache's table and journal."""
    two_archives(path)
    with Repository.open(str(path)) as r:
        _ = r.index


def cache_files(cache_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    (table,) = cache_dir.glob("index-*.bin")
    return table, table.with_suffix(".journal")


def test_a_commit_appends_to_the_journal_and_leaves_the_table(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table is the whole repository's; a commit adds its own index object to the
    journal and the next open decodes nothing.  Control: without the journal, the same
    open decodes exactly that object."""
    two_archives_cached(tmp_path / "r")
    table, journal = cache_files(cache_dir)
    before = table.read_bytes()
    with Repository.open(str(tmp_path / "r")) as r:
        new_ids = [write_archive(r, {"n": os.urandom(20_000)}) for _ in range(2)]
    assert table.read_bytes() == before
    assert journal.stat().st_size > 0
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert all(read_archive(again, a)["n"] for a in new_ids)
        got, files = index_of(again), again.index_files()
    assert seen == [] and len(files) == 4
    monkeypatch.setenv(CACHE_ENV, "off")
    with Repository.open(str(tmp_path / "r")) as plain:
        assert index_of(plain) == got and plain.index_files() == files
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    journal.unlink()
    seen.clear()
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == got
    # what the journal had: the two new objects, and the second of two_archives' (its
    # first commit wrote the table, its second appended)
    assert len(seen) == 3


def test_a_grown_journal_is_folded_into_the_table(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmarchive.store import indexcache

    two_archives_cached(tmp_path / "r")
    table, journal = cache_files(cache_dir)
    before = table.read_bytes()
    monkeypatch.setattr(indexcache, "FOLD_MIN_BYTES", 0)
    monkeypatch.setattr(indexcache, "FOLD_SHARE", 1 << 40)  # any journal is too large
    with Repository.open(str(tmp_path / "r")) as r:
        new_id = write_archive(r, {"n": os.urandom(20_000)})
    assert table.read_bytes() != before and journal.stat().st_size == 0
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert read_archive(again, new_id)["n"]
        assert len(again.index_files()) == 3
    assert seen == []


def full_table_cached(path: pathlib.Path) -> None:
    """A repository whose cached table is exactly 3/4 full (768 entries in 1024 slots, made
    directly: the index never reads packs), so the next entry added rehashes it."""
    repo = make_repo(path)
    pack = os.urandom(32).hex()
    repo._publish_index(
        [(os.urandom(16), Location(pack, 16 + 100 * i, 100, 100)) for i in range(768)]
    )
    repo.close()
    with Repository.open(str(path)) as r:
        assert r.index.memory_bytes() == 1024 * 32 and len(r.index) == 768


@pytest.mark.parametrize("control", [False, True])
def test_an_index_that_outgrew_its_table_is_folded_at_the_commit(
    tmp_path: pathlib.Path,
    cache_dir: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    control: bool,
) -> None:
    """A commit that rehashed the index into a larger table writes that table: otherwise
    every later load rehashes the cached table again (0.7 s a million slots) until the
    journal is folded.  Control: with the rehash unnoticed, the table stays as it was and
    the next load rehashes it again."""
    full_table_cached(tmp_path / "r")
    table, journal = cache_files(cache_dir)
    before = table.read_bytes()
    if control:
        real = ChunkIndex._grow

        def unnoticed(self: ChunkIndex) -> None:
            real(self)
            self.grown = False

        monkeypatch.setattr(ChunkIndex, "_grow", unnoticed)
    with Repository.open(str(tmp_path / "r")) as r:
        assert not r.index.grown
        new_id = write_archive(r, {"n": os.urandom(20_000)})
        assert r.index.memory_bytes() == 2048 * 32
        entries = len(r.index)
    assert entries > 768
    monkeypatch.undo()
    monkeypatch.setenv(CACHE_ENV, str(cache_dir))
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert read_archive(again, new_id)["n"]
        assert len(again.index) == entries and again.index.memory_bytes() == 2048 * 32
        grown_at_load = again.index.grown
    assert seen == []
    if control:
        assert table.read_bytes() == before and journal.stat().st_size > 0
        assert grown_at_load
    else:
        assert table.read_bytes() != before and journal.stat().st_size == 0
        assert not grown_at_load


def test_a_journal_cut_short_or_damaged_ends_where_it_breaks(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died appending leaves a partial record: the records before it
    still count, the objects after are decoded.  A checksum failure ends it the same."""
    two_archives_cached(tmp_path / "r")
    with Repository.open(str(tmp_path / "r")) as r:
        new_ids = [write_archive(r, {"n": os.urandom(20_000)}) for _ in range(2)]
        want = index_of(r)
    _table, journal = cache_files(cache_dir)
    whole = journal.read_bytes()
    seen = decoded(monkeypatch)
    journal.write_bytes(whole[:-5])  # the second record cut short
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == want
        assert all(read_archive(again, a)["n"] for a in new_ids)
    assert len(seen) == 1
    seen.clear()
    damaged = bytearray(whole)
    damaged[12 + 20 + 40] ^= 0x01  # inside the first record's body (header, record head)
    journal.write_bytes(bytes(damaged))
    with Repository.open(str(tmp_path / "r")) as again:
        assert index_of(again) == want
    assert len(seen) == 3  # the journal's three records (two_archives' second object first)


def test_journal_records_name_objects_that_must_still_be_listed(tmp_path: pathlib.Path) -> None:
    """A record's object gone (gc elsewhere) makes the cache unusable, as the table's."""
    cache = IndexCache(str(tmp_path / "index-x.bin"))
    packs = [os.urandom(32).hex() for _ in range(3)]
    a, b = os.urandom(32).hex(), os.urandom(32).hex()
    base = ChunkIndex()
    old = [(os.urandom(16), Location(packs[0], 16, 100, 200)) for _ in range(50)]
    for cid, loc in old:
        base.add(cid, loc)
    assert not cache.append([(b, [], b"")])  # no table yet: nothing to build on
    cache.save(base, {a})
    new = [(os.urandom(16), Location(packs[i % 3], 16 + i, 10, 20)) for i in range(300)]
    records, plist = ChunkIndex.pack_entries(new)
    assert cache.append([(b, plist, records)])
    got = cache.load({a, b})
    assert got is not None
    assert got[1] == {a, b} and dict(got[0].items()) == dict(old + new)
    assert cache.load({a}) is None  # b vanished
    assert cache.load({b}) is None  # a vanished (the control: the table's check)


def test_concurrent_appends_keep_whole_records(tmp_path: pathlib.Path) -> None:
    """Appends from several writers at once (threads here, processes on a host) each land
    whole: every record is read back."""
    import threading

    cache = IndexCache(str(tmp_path / "index-x.bin"))
    cache.save(ChunkIndex(), set())
    pack = os.urandom(32).hex()
    made: dict[str, list[tuple[bytes, Location]]] = {}
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            name = os.urandom(32).hex()
            entries = [(os.urandom(16), Location(pack, 16 + i, 10, 20)) for i in range(200)]
            with lock:
                made[name] = entries
            records, plist = ChunkIndex.pack_entries(entries)
            assert cache.append([(name, plist, records)])

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.load(set(made))
    assert got is not None and got[1] == set(made)
    assert dict(got[0].items()) == {c: loc for es in made.values() for c, loc in es}


def test_a_new_journal_gets_one_header_whoever_appends_first(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appenders that find the journal empty at once: under the lock only the first
    writes the header (without it a second header would end the journal early: the
    control, a slow size check widening the window)."""
    import threading
    import time

    from vmarchive.store import indexcache

    real = indexcache._size

    def slow(fd: int) -> int:
        n = real(fd)
        time.sleep(0.05)
        return n

    monkeypatch.setattr(indexcache, "_size", slow)
    cache = IndexCache(str(tmp_path / "index-x.bin"))
    cache.save(ChunkIndex(), set())
    pack = os.urandom(32).hex()
    names = [os.urandom(32).hex() for _ in range(4)]
    go = threading.Barrier(len(names))

    def work(name: str) -> None:
        go.wait()
        records, plist = ChunkIndex.pack_entries([(os.urandom(16), Location(pack, 16, 10, 20))])
        assert cache.append([(name, plist, records)])

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = cache.load(set(names))
    assert got is not None and got[1] == set(names) and len(got[0]) == 4


def test_a_journal_that_cannot_be_written_never_fails_the_commit(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index object that could not be journaled: the commit still happens, and saves
    the whole index instead (control: the failing append was reached)."""
    two_archives_cached(tmp_path / "r")
    table, _journal = cache_files(cache_dir)
    before = table.read_bytes()
    calls: list[int] = []

    def broken(self: IndexCache, objects: object) -> bool:
        calls.append(1)
        raise RuntimeError("journal broke")

    with monkeypatch.context() as m:
        m.setattr(IndexCache, "append", broken)
        with Repository.open(str(tmp_path / "r")) as r:
            aid = write_archive(r, {"n": b"z" * 9000})
    assert calls and table.read_bytes() != before
    seen = decoded(monkeypatch)
    with Repository.open(str(tmp_path / "r")) as again:
        assert read_archive(again, aid)["n"] == b"z" * 9000
    assert seen == []


def test_packed_entries_round_trip_and_their_checks() -> None:
    packs = [os.urandom(32).hex() for _ in range(4)]
    entries = [(os.urandom(16), Location(packs[i % 4], 16 + i, 10 + i, 20 + i)) for i in range(99)]
    records, plist = ChunkIndex.pack_entries(entries)
    assert len(records) == 99 * 32 and sorted(plist) == sorted(packs)
    idx = ChunkIndex()
    idx.add(entries[0][0], Location(packs[1], 999, 1, 1))  # present: kept, as add() does
    assert idx.add_packed(records, plist) == 98
    want = dict(entries) | {entries[0][0]: Location(packs[1], 999, 1, 1)}
    assert dict(idx.items()) == want
    bad = bytearray(records)
    bad[32 * 50 + 16 : 32 * 50 + 20] = (4).to_bytes(4, "little")  # numbered from 0: 4 of 4
    fresh = ChunkIndex()
    with pytest.raises(ValueError, match="pack number"):
        fresh.add_packed(bytes(bad), plist)
    assert len(fresh) == 0  # nothing added
    zero = bytearray(records)
    zero[32 * 7 : 32 * 7 + 16] = bytes(16)
    with pytest.raises(ValueError, match="empty id"):
        fresh.add_packed(bytes(zero), plist)
    with pytest.raises(ValueError, match="whole records"):
        fresh.add_packed(records[:-1], plist)
