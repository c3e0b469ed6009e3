"""Repository, writer and reader behaviour (real local backend, small chunks)."""

from __future__ import annotations

import dataclasses
import pathlib
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storehelpers import (
    CHUNK,
    PASSPHRASE,
    make_repo,
    pack_keys,
    read_archive,
    small_options,
    write_archive,
)

from vmarchive.errors import (
    AlreadyExistsError,
    AmbiguousError,
    BackendError,
    ChunkMissingError,
    DamageError,
    LockedError,
    NotFoundError,
    RepositoryNotFoundError,
    UsageError,
    WrongKeyError,
)
from vmarchive.format.blob import BlobCodec, raw_frame
from vmarchive.store import Extent, Repository, WriterOptions
from vmarchive.store.faulty import Fault, FaultyBackend
from vmarchive.store.local import LocalBackend
from vmarchive.store.repository import pack_key

META = {"time": "2026-01-01T00:00:00Z", "domain": "vm1", "kind": "full"}


def rnd(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.parametrize(
    ("encrypted", "algo"),
    [(False, "xxh3-128-keyed"), (True, "xxh3-128-keyed"), (False, "blake2b-128-keyed")],
)
def test_roundtrip_many_shapes(tmp_path: pathlib.Path, encrypted: bool, algo: str) -> None:
    repo = make_repo(tmp_path / "r", encrypted=encrypted, id_algorithm=algo)
    streams = {
        "domain.xml": b"<domain/>",
        "empty": b"",
        "disk/vda": rnd(300_000) + bytes(5 * CHUNK) + rnd(1234, 1),
        "ram/pc.ram": (rnd(CHUNK, 2) + bytes(CHUNK)) * 20,
    }
    aid = write_archive(repo, streams)
    assert len(pack_keys(repo)) > 1  # 64 KiB packs: several
    again = Repository.open(str(tmp_path / "r"), PASSPHRASE if encrypted else None)
    assert read_archive(again, aid) == streams
    assert again.verify(full=True).ok


def test_zero_chunks_are_holes_and_never_stored(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    aid = write_archive(repo, {"disk/vda": bytes(50 * CHUNK + 7)})
    assert pack_keys(repo) == []
    r = repo.open_stream(aid, "disk/vda")
    assert list(r.extents()) == [Extent(0, 50 * CHUNK + 7, True)]
    assert r.read_range(100, 10) == bytes(10)
    assert repo.stats().logical_bytes == 50 * CHUNK + 7
    assert repo.stats().stored_bytes < 4096


def test_write_holes_is_write_chunk_of_zeros_for_each_slot(tmp_path: pathlib.Path) -> None:
    """Runs of holes (a guest's untouched RAM) give the table, the counts and the archive
    that writing each slot's zeros gives, the short last slot included; past the end, or
    on a stream of unknown size, they are refused."""
    size = 9 * CHUNK + 100
    data = rnd(CHUNK, 3)
    got = []
    for bulk in (True, False):
        repo = make_repo(tmp_path / f"r{bulk}")
        with repo.writer() as w:
            sw = w.stream("ram/pc.ram", "ram", size)
            sw.write_chunk(4, data)
            for first, count in ((0, 4), (5, 5)):
                if bulk:
                    sw.write_holes(first, count)
                else:
                    for i in range(first, first + count):
                        sw.write_chunk(i, bytes(min(CHUNK, size - i * CHUNK)))
            table = sw.table()
            st = sw.close()
            aid = w.commit(META)
            ids = [table[16 * i : 16 * i + 16] for i in range(10)]
            want = [w.zero_id] * 4 + [repo.codecs.chunk_id(data)] + [w.zero_id] * 5
        assert ids == want
        got.append(st)
        assert repo.open_stream(aid, "ram/pc.ram").read_all() == bytes(4 * CHUNK) + data + bytes(
            size - 5 * CHUNK
        )
    assert got[0] == got[1]
    assert got[0].holes == 9 and got[0].bytes_written == size
    with repo.writer() as w:
        sw = w.stream("x", "ram", 2 * CHUNK)
        with pytest.raises(UsageError, match="past the end"):
            sw.write_holes(1, 2)
        with pytest.raises(UsageError, match="known size"):
            w.stream("y", "meta", None).write_holes(0, 1)


def test_dedup_within_and_across_archives(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    block = rnd(CHUNK, 7)
    data = block * 100
    with repo.writer() as w:
        sw = w.stream("disk/vda", "disk", len(data))
        sw.write(0, data)
        st1 = sw.close()
        w.commit(META)
    assert (st1.chunks, st1.bytes_new, st1.holes) == (100, CHUNK, 0)
    packs = pack_keys(repo)
    other = Repository.open(str(tmp_path / "r"))
    with other.writer() as w:
        sw = w.stream("other-name", "disk", len(data))
        sw.write(0, data)
        st2 = sw.close()
        w.commit({**META, "domain": "vm2"})
    assert st2.bytes_new == 0
    assert pack_keys(repo) == packs
    s = other.stats()
    assert s.chunks == 1 and s.dedup_ratio == 200


def test_write_chunk_set_chunk_and_append(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    a, b = rnd(CHUNK, 1), rnd(CHUNK, 2)
    with repo.writer() as w:
        sw = w.stream("ram/pc.ram", "ram", 4 * CHUNK, attrs={"page_size": 4096})
        sw.write_chunk(3, b)
        sw.write_chunk(0, a)
        assert w.read_chunk(repo.codecs.chunk_id(a)) == a  # not yet in a published pack
        sw.close()
        tail = w.stream("migstream", "stream", None)
        pieces = [rnd(n, n) for n in (1, 4095, 5000, 10, 3 * CHUNK + 3)]
        for p in pieces:
            tail.append(p)
        assert tail.close().bytes_written == sum(map(len, pieces))
        aid = w.commit(META)
    arch = repo.load_archive(aid)
    assert arch.stream("ram/pc.ram").attrs == {"page_size": 4096}
    assert repo.open_stream(arch, "ram/pc.ram").read_all() == a + bytes(2 * CHUNK) + b
    assert repo.open_stream(arch, "migstream").read_all() == b"".join(pieces)
    # An incremental references chunks by id, writing no data.
    packs = pack_keys(repo)
    with repo.writer() as w:
        sw = w.stream("ram/pc.ram", "ram", 2 * CHUNK)
        sw.set_chunk(0, repo.codecs.chunk_id(b))
        with pytest.raises(ChunkMissingError):
            sw.set_chunk(1, b"\x01" * 16)
        sw.close()
        aid2 = w.commit({**META, "parent": aid})
    assert pack_keys(repo) == packs
    assert read_archive(repo, aid2) == {"ram/pc.ram": b + bytes(CHUNK)}


def test_write_if_present_records_only_what_needs_no_storing(tmp_path: pathlib.Path) -> None:
    """Zeros and chunks the repository or the writer already hold fill their slot at once;
    a new chunk fills nothing and comes back as its id, which write_chunk then takes."""
    repo = make_repo(tmp_path / "r")
    old, mine, new = rnd(CHUNK, 1), rnd(CHUNK, 2), rnd(CHUNK, 3)
    write_archive(repo, {"disk/vda": old})
    with repo.writer() as w:
        first = w.stream("ram:a", "ram", CHUNK)
        first.write_chunk(0, mine)  # stored by this writer, not published yet
        sw = w.stream("ram:b", "ram", 5 * CHUNK)
        assert sw.write_if_present(0, bytes(CHUNK)) is None
        assert sw.write_if_present(1, old) is None
        assert sw.write_if_present(2, mine) is None
        cid = sw.write_if_present(3, new)
        assert cid == repo.codecs.chunk_id(new)
        assert sw.slot_id(3) == bytes(16)  # nothing recorded for it
        packs_before = len(pack_keys(repo))
        sw.write_chunk(3, new, cid)
        with pytest.raises(UsageError):
            sw.write_if_present(4, new[:-1])  # not a whole slot
        st = sw.close()
        first.close()
        aid = w.commit(META)
    assert (st.chunks, st.holes, st.bytes_new) == (3, 2, CHUNK)
    assert len(pack_keys(repo)) > packs_before
    assert read_archive(repo, aid)["ram:b"] == bytes(CHUNK) + old + mine + new + bytes(CHUNK)
    assert repo.verify(full=True).ok


def test_flush_publishes_the_packs_and_leaves_index_and_manifest_to_the_commit(
    tmp_path: pathlib.Path,
) -> None:
    repo = make_repo(tmp_path / "r")
    data = [rnd(CHUNK, 20 + i) for i in range(4)]

    def keys(prefix: str) -> list[str]:
        return sorted(o.key for o in repo.backend.list(prefix))

    with repo.writer() as w:
        sw = w.stream("disk/vda", "disk", 4 * CHUNK)
        for i, c in enumerate(data):
            sw.write_chunk(i, c)
        assert pack_keys(repo) == []  # the control: a pack waits to be filled
        w.flush()
        packs = pack_keys(repo)
        assert packs and keys("index/") == [] and keys("archives/") == []
        sw.close()
        aid = w.commit(META)
        assert pack_keys(repo) == packs and keys("index/")  # no pack more, and the index
        with pytest.raises(UsageError):
            w.flush()  # committed
    assert read_archive(repo, aid) == {"disk/vda": b"".join(data)}
    assert repo.verify(full=True).ok


def test_a_chunk_is_indexed_before_the_writer_lets_it_go(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_if_present asks without the writer's mutex (once per chunk of a second
    capture): the chunks not published yet, then the index.  A chunk being published is
    in one of the two at every moment only if the index takes it before the writer lets
    it go -- looked at as each one is indexed."""
    repo = make_repo(tmp_path / "r")
    held_when_indexed: list[bool] = []
    with repo.writer() as w:
        add = repo._add_location

        def adding(cid: bytes, loc: Any) -> None:
            held_when_indexed.append(cid in w._unpublished)
            add(cid, loc)

        monkeypatch.setattr(repo, "_add_location", adding)
        sw = w.stream("ram:a", "ram", 8 * CHUNK)
        chunks = [rnd(CHUNK, 10 + i) for i in range(8)]
        for i, c in enumerate(chunks):
            sw.write_chunk(i, c)
        sw.close()
        w.commit(META)
        assert all(w._has_chunk(repo.codecs.chunk_id(c)) for c in chunks)
    assert len(held_when_indexed) == 8 and all(held_when_indexed)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kinds=st.lists(st.sampled_from("dzu"), min_size=1, max_size=24),
    picked=st.lists(st.booleans(), min_size=24, max_size=24),
)
def test_set_chunks_is_set_chunk_for_each_slot(
    tmp_path: pathlib.Path, kinds: list[str], picked: list[bool]
) -> None:
    """The bulk reference (incrementals' clean slots) gives the table, the count and the
    archive that set_chunk slot by slot gives: runs and gaps of slots, holes in the
    table, and chunks of this very writer not yet published ("u")."""
    repo = make_repo(pathlib.Path(tempfile.mkdtemp(dir=tmp_path)) / "r")
    n = len(kinds)
    with repo.writer() as w:
        src = w.stream("src", "disk", n * CHUNK)
        for i, k in enumerate(kinds):
            if k == "d":
                src.write_chunk(i, rnd(CHUNK, i % 5))
        src.close()
        w.commit(META)
    with repo, repo.writer() as w:
        src = w.stream("src", "disk", n * CHUNK)
        for i, k in enumerate(kinds):  # the same, plus this writer's own new chunks
            if k == "d":
                src.set_chunk(i, repo.codecs.chunk_id(rnd(CHUNK, i % 5)))
            elif k == "u":
                src.write_chunk(i, rnd(CHUNK, 100 + i))
        table = src.table()
        slots = [i for i in range(n) if picked[i]]
        # the picked slots in any order; the slots from the first to the last picked as a
        # range (how a capture adopts a whole table)
        span = range(slots[0], slots[-1] + 1) if slots else range(0)
        cases: list[tuple[str, list[int], Iterable[int]]] = [
            ("bulk", slots, reversed(slots)),
            ("ranged", list(span), span),
        ]
        for name, each, given in cases:
            one = w.stream(f"{name}-one", "disk", n * CHUNK)
            bulk = w.stream(name, "disk", n * CHUNK)
            held = 0
            for i in each:
                cid = table[16 * i : 16 * i + 16]
                if cid != w.zero_id:
                    one.set_chunk(i, cid)
                    held += 1
            assert bulk.set_chunks(table, given) == held
            assert bulk.table() == one.table()
            one.close()
            bulk.close()
        aid = w.commit(META)
    got = read_archive(repo, aid)
    assert got["bulk"] == got["bulk-one"] and got["ranged"] == got["ranged-one"]


def test_set_chunks_sets_nothing_when_a_chunk_is_missing(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    with repo.writer() as w:
        w.stream("a", "disk", 2 * CHUNK).write_chunk(0, rnd(CHUNK))
        w.commit(META)
    have = repo.codecs.chunk_id(rnd(CHUNK))
    with repo, repo.writer() as w:
        sw = w.stream("b", "disk", 3 * CHUNK)
        with pytest.raises(ChunkMissingError):
            sw.set_chunks(have + b"\x01" * 16 + have, [0, 1, 2])
        assert sw.table() == bytes(48)  # nothing set
        assert sw.set_chunks(have + bytes(16) + have, [0, 1, 2]) == 2  # the control
        with pytest.raises(UsageError):
            sw.set_chunks(have * 4, [3])  # past the end of the stream
        with pytest.raises(UsageError):
            sw.set_chunks(have, [1])  # past the table given


def test_writer_rejects_misuse(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    with repo.writer() as w:
        sw = w.stream("s", "disk", 3 * CHUNK)
        with pytest.raises(UsageError):
            sw.write(1, b"x")  # misaligned
        with pytest.raises(UsageError):
            sw.write_chunk(0, b"short")  # short chunk before the end
        with pytest.raises(UsageError):
            sw.write_chunk(3, rnd(CHUNK))  # past the end
        with pytest.raises(UsageError):
            w.stream("s", "disk", 1)
        with pytest.raises(UsageError):
            w.stream("t", "bogus", 1)
        with pytest.raises(UsageError):
            w.stream("../escape", "disk", 1)
        with pytest.raises(UsageError):
            w.commit({"time": "2026-01-01T00:00:00Z"})
        unknown = w.stream("u", "stream", None)
        unknown.write_chunk(0, b"abc")
        with pytest.raises(UsageError):
            unknown.write_chunk(1, rnd(CHUNK))  # data after the short last chunk
    with pytest.raises(UsageError):
        sw.write_chunk(0, rnd(CHUNK))  # writer closed


def test_no_commit_lists_nothing_and_gc_reclaims(tmp_path: pathlib.Path) -> None:
    from vmarchive.store import GcOptions

    repo = make_repo(tmp_path / "r")
    with repo.writer() as w:
        sw = w.stream("disk/vda", "disk", 200_000)
        sw.write(0, rnd(200_000))
    assert repo.list_archives() == []
    assert pack_keys(repo)  # flushed packs are garbage now
    assert repo.gc(GcOptions(grace=3600)).packs_deleted == 0  # too young
    result = repo.gc(GcOptions(grace=0))
    assert result.packs_deleted > 0
    assert pack_keys(repo) == []
    assert not list(repo.backend.list("locks/"))


def test_archive_names(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    ids = [
        write_archive(repo, {"f": rnd(10, i)}, time=f"2026-01-{i + 1:02d}T00:00:00Z")
        for i in range(20)
    ]
    assert [a.id for a in repo.list_archives()] == ids
    assert repo.load_archive(ids[3].upper()).id == ids[3]
    # 20 ids over 16 hex digits: some first digit is shared (pigeonhole).
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    with pytest.raises(AmbiguousError):
        repo.load_archive(shared)
    with pytest.raises(NotFoundError):
        repo.load_archive("0" * 64 if "0" * 64 not in ids else "1" * 64)
    with pytest.raises(UsageError):
        repo.load_archive("not-hex")


def test_open_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        Repository.open(str(tmp_path / "missing"))
    make_repo(tmp_path / "r")
    with pytest.raises(AlreadyExistsError):
        make_repo(tmp_path / "r")
    make_repo(tmp_path / "e", encrypted=True)
    with pytest.raises(WrongKeyError):
        Repository.open(str(tmp_path / "e"))
    with pytest.raises(WrongKeyError):
        Repository.open(str(tmp_path / "e"), "wrong")
    asked: list[bool] = []

    def ask() -> str:
        asked.append(True)
        return "x"

    Repository.open(str(tmp_path / "r"), ask)
    assert asked == []  # not asked for an unencrypted repository
    Repository.open(str(tmp_path / "e"), lambda: PASSPHRASE)


def test_key_material_opens_an_encrypted_repository_without_its_key_files(
    tmp_path: pathlib.Path,
) -> None:
    """What a helper process of a capture is given instead of the passphrase: no key file
    is read (they are gone here), and the helper's writes read back with the passphrase."""
    plain = make_repo(tmp_path / "p")
    assert plain.codecs.key is None
    first = make_repo(tmp_path / "e", encrypted=True)
    key = first.codecs.key
    assert key is not None
    be = first.backend
    keys = {o.key: be.get(o.key) for o in be.list("keys/")}
    assert keys, "an encrypted repository has key files"
    for name in keys:
        be.delete(name)
    with pytest.raises(WrongKeyError, match="no key file"):
        Repository.open(str(tmp_path / "e"), PASSPHRASE)
    helper = Repository.open(str(tmp_path / "e"), key=key)
    archive = write_archive(helper, {"s": b"helper " * 5000})
    for name, data in keys.items():
        be.put(name, data, create_only=True)
    assert read_archive(Repository.open(str(tmp_path / "e"), PASSPHRASE), archive) == {
        "s": b"helper " * 5000
    }


@settings(
    max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)
@given(
    layout=st.lists(st.sampled_from(["d", "z", "r"]), min_size=0, max_size=12),
    tail=st.integers(0, CHUNK - 1),
    ranges=st.lists(st.tuples(st.integers(0, 60_000), st.integers(0, 20_000)), max_size=8),
)
def test_read_range_matches_slicing(
    tmp_path_factory: pytest.TempPathFactory,
    layout: list[str],
    tail: int,
    ranges: list[tuple[int, int]],
) -> None:
    repo = make_repo(tmp_path_factory.mktemp("r") / "r")
    rand = random.Random(len(layout))
    block = rand.randbytes(CHUNK)
    parts = {"d": lambda: rand.randbytes(CHUNK), "z": lambda: bytes(CHUNK), "r": lambda: block}
    data = b"".join(parts[k]() for k in layout) + rand.randbytes(tail)
    aid = write_archive(repo, {"s": data})
    r = repo.open_stream(aid, "s")
    for off, n in ranges:
        assert r.read_range(off, n) == data[off : off + n]
    got = b"".join(
        d if d is not None else bytes(min(CHUNK, len(data) - o)) for o, d in r.iter_chunks()
    )
    assert got == data
    ext = list(r.extents())
    assert sum(e.length for e in ext) == len(data)
    for e in ext:
        assert (data[e.offset : e.offset + e.length] == bytes(e.length)) or not e.hole
    # a range's extents are the whole stream's, clipped to the range
    for off, n in ranges:
        end = min(off + n, len(data))
        clipped = [
            Extent(max(e.offset, off), min(e.offset + e.length, end) - max(e.offset, off), e.hole)
            for e in ext
            if off < end and e.offset < end and e.offset + e.length > off
        ]
        assert list(r.extents(off, n)) == clipped, (off, n)


def test_index_flushes_bound_memory_and_stay_readable(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    data = rnd(100 * CHUNK)
    with repo.writer(options=WriterOptions(index_flush_entries=10, workers=2, max_inflight=3)) as w:
        sw = w.stream("s", "disk", len(data))
        sw.write(0, data)
        sw.close()
        aid = w.commit(META)
        assert w.indices_written > 3
    fresh = Repository.open(str(tmp_path / "r"))
    assert read_archive(fresh, aid) == {"s": data}


def test_failed_pack_upload_fails_commit_and_leaves_valid_repo(tmp_path: pathlib.Path) -> None:
    make_repo(tmp_path / "r")
    faulty = FaultyBackend(LocalBackend(str(tmp_path / "r")), [Fault("put", "data/", skip=1)])
    repo = Repository.open(str(tmp_path / "r"), backend=faulty)
    with pytest.raises(BackendError), repo.writer() as w:
        sw = w.stream("s", "disk", 300_000)
        sw.write(0, rnd(300_000))
        sw.close()
        w.commit(META)
    assert repo.list_archives() == []
    assert repo.verify(full=True).ok
    assert not list(repo.backend.list("locks/"))


def test_manifest_is_published_last(tmp_path: pathlib.Path) -> None:
    make_repo(tmp_path / "r")
    faulty = FaultyBackend(LocalBackend(str(tmp_path / "r")))
    repo = Repository.open(str(tmp_path / "r"), backend=faulty)
    write_archive(repo, {"s": rnd(200_000)})
    puts = [k.split("/")[0] for op, k in faulty.calls if op == "put" and not k.startswith("locks/")]
    assert puts[-1] == "archives"
    assert puts.index("index") > max(i for i, p in enumerate(puts) if p == "data")


def test_reader_raises_on_damage_instead_of_returning_wrong_bytes(tmp_path: pathlib.Path) -> None:
    make_repo(tmp_path / "r")
    inner = LocalBackend(str(tmp_path / "r"))
    faulty = FaultyBackend(inner)
    repo = Repository.open(str(tmp_path / "r"), backend=faulty)
    data = rnd(10 * CHUNK)
    aid = write_archive(repo, {"s": data})
    for mode in ("corrupt", "truncate"):
        faulty.add(Fault("get_range", "data/", mode=mode))
        with pytest.raises(DamageError):
            Repository.open(str(tmp_path / "r"), backend=faulty).open_stream(aid, "s").read_all()
    # Deleting a pack: the chunk is missing.
    for k in pack_keys(repo):
        inner.delete(k)
    with pytest.raises(ChunkMissingError):
        Repository.open(str(tmp_path / "r")).open_stream(aid, "s").read_range(0, 1)


def test_writer_lock_excludes_gc(tmp_path: pathlib.Path) -> None:
    repo = make_repo(tmp_path / "r")
    with repo.writer() as w:
        with pytest.raises(LockedError):
            Repository.open(str(tmp_path / "r")).gc()
        w.stream("s", "meta", 3).write(0, b"abc")
        w.commit(META)
    Repository.open(str(tmp_path / "r")).gc()  # free again


def test_parallel_writers_in_threads(tmp_path: pathlib.Path) -> None:
    import threading

    make_repo(tmp_path / "r")
    shared = rnd(20 * CHUNK, 99)
    ids: list[str] = []

    def run(i: int) -> None:
        r = Repository.open(str(tmp_path / "r"))
        ids.append(write_archive(r, {"s": shared + rnd(5 * CHUNK, i)}, domain=f"vm{i}"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 4
    fresh = Repository.open(str(tmp_path / "r"))
    assert fresh.verify(full=True).ok
    for i, aid in enumerate(sorted(ids, key=lambda a: fresh.load_archive(a).domain)):
        assert read_archive(fresh, aid) == {"s": shared + rnd(5 * CHUNK, i)}


def test_writer_reads_back_its_chunks_at_every_stage(tmp_path: pathlib.Path) -> None:
    """In flight, in the pack being built, uploading or published: read_chunk finds it."""
    repo = make_repo(tmp_path / "r")
    rng = random.Random(5)
    chunks = [rnd(CHUNK, 1000 + i) for i in range(120)]
    with repo.writer(options=WriterOptions(workers=2, max_inflight=4)) as w:
        sw = w.stream("s", "ram", len(chunks) * CHUNK)
        for i, c in enumerate(chunks):
            sw.write_chunk(i, c)
            j = rng.randrange(i + 1)
            assert w.read_chunk(repo.codecs.chunk_id(chunks[j])) == chunks[j]
        sw.close()
        w.commit(META)


def test_writer_never_dedups_against_packs_a_gc_deleted_meanwhile(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmarchive.store import GcOptions

    def scenario(name: str) -> tuple[Repository, str]:
        path = tmp_path / name
        make_repo(path)
        daemon = Repository.open(str(path))  # a long-lived process: its index stays loaded
        old = write_archive(daemon, {"s": rnd(20 * CHUNK, 5)})
        other = Repository.open(str(path))
        other.forget([old])
        assert other.gc(GcOptions(grace=0)).packs_deleted > 0  # the chunks are gone
        return daemon, write_archive(daemon, {"s": rnd(20 * CHUNK, 5)})

    repo, aid = scenario("r1")
    assert read_archive(Repository.open(str(repo.backend.location)), aid)["s"] == rnd(20 * CHUNK, 5)
    # Negative control: a writer that trusts the index it loaded before gc ran publishes
    # an archive whose chunks do not exist.
    monkeypatch.setattr(Repository, "_fresh_index_for_writer", lambda self: self.index)
    repo, aid = scenario("r2")
    with pytest.raises(ChunkMissingError):
        read_archive(Repository.open(str(repo.backend.location)), aid)


@pytest.mark.parametrize("nstreams", [2, 5])
def test_streams_written_together_fill_packs_of_their_own(
    tmp_path: pathlib.Path, nstreams: int
) -> None:
    """A reader of one stream (a restore fills disks one by one) must not fetch packs full
    of another stream's chunks; many streams at once cost smaller packs, not memory."""
    repo = make_repo(tmp_path / "r")
    datas = {f"s{i}": rnd(40 * CHUNK, seed=i) for i in range(nstreams)}
    held = []
    with repo.writer(options=WriterOptions(workers=2, max_inflight=2)) as w:
        sws = {name: w.stream(name, "disk", len(d)) for name, d in datas.items()}
        for k in range(40):  # interleaved, chunk by chunk, as concurrent readers do
            for name, sw in sws.items():
                sw.write(k * CHUNK, datas[name][k * CHUNK : (k + 1) * CHUNK])
                held.append(sum(b.size for b in w._builders.values()))
        for sw in sws.values():
            sw.close()
        aid = w.commit(META)
    fresh = Repository.open(str(tmp_path / "r"))
    assert read_archive(fresh, aid) == datas
    a = fresh.load_archive(aid)
    owner: dict[str, str] = {}
    for s in a.streams:
        for i in range(s.slots):
            loc = fresh._chunk_location(s.chunk_id(i))
            assert loc is not None
            assert owner.setdefault(loc.pack_id, s.name) == s.name
    assert len(set(owner.values())) == nstreams
    assert max(held) <= 64 * 1024 * 3 // 2 + CHUNK + 64


@pytest.mark.parametrize("commit", [True, False])
def test_packs_of_read_back_streams_are_published_with_the_hint(
    tmp_path: pathlib.Path, commit: bool
) -> None:
    """Only the packs of streams written with ``read_back`` reach Backend.will_read_back
    (a capture's memory image, which its round trip reads at once; not its disks), and
    the same packs reach done_reading_back once the writer ends, committed or not."""
    make_repo(tmp_path / "r")
    hinted: list[str] = []
    done: list[str] = []

    class Recording(FaultyBackend):
        def will_read_back(self, key: str, data: bytes | memoryview) -> None:
            assert self.inner.get(key) == data  # published first
            hinted.append(key)

        def done_reading_back(self, keys: Iterable[str]) -> None:
            done.extend(keys)

    repo = Repository.open(
        str(tmp_path / "r"), backend=Recording(LocalBackend(str(tmp_path / "r")))
    )
    ram, disk = rnd(40 * CHUNK, seed=1), rnd(40 * CHUNK, seed=2)
    with repo.writer() as w:
        m = w.stream("ram:pc.ram", "ram", len(ram), read_back=True)
        d = w.stream("disk:vda", "disk", len(disk))
        for k in range(40):
            m.write(k * CHUNK, ram[k * CHUNK : (k + 1) * CHUNK])
            d.write(k * CHUNK, disk[k * CHUNK : (k + 1) * CHUNK])
        m.close()
        d.close()
        assert not done  # not before the writer ends: the round trip reads them
        if not commit:
            w._wait_uploads()  # what the abort below finds published
            w.abort()
            assert done and sorted(done) == sorted(hinted)
            return
        aid = w.commit(META)
    assert sorted(done) == sorted(hinted)
    a = repo.load_archive(aid)
    packs_of: dict[str, set[str]] = {}
    for s in a.streams:
        for cid in s.chunk_ids():
            loc = repo._chunk_location(cid)
            assert loc is not None
            packs_of.setdefault(s.name, set()).add(pack_key(loc.pack_id))
    assert hinted and set(hinted) == packs_of["ram:pc.ram"]
    assert not set(hinted) & packs_of["disk:vda"]


# Ids that share bytes with the one counted, at its edges: a count that matched 16 bytes
# anywhere but at a slot's start, or that compared only some of a slot's bytes, would be
# off for tables built from them.
_NEAR = [bytes(16), bytes(15) + b"\x01", b"\x01" + bytes(15), bytes(8) + b"\xff" * 8]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, len(_NEAR)), max_size=64),
    st.sampled_from([bytes(16), b"\x01" + bytes(15), bytes(range(16))]),
)
def test_holes_counted_in_a_table_are_the_slots_that_hold_the_id(
    picks: list[int], wanted: bytes
) -> None:
    from vmarchive.store.writer import count_slots_holding

    ids = [*_NEAR, wanted]
    table = bytearray(b"".join(ids[i] for i in picks))
    expect = sum(1 for i in picks if ids[i] == wanted)
    assert count_slots_holding(table, wanted) == expect
    if expect:  # the control: one byte changed in one holding slot is one slot fewer
        at = 16 * [ids[i] for i in picks].index(wanted) + len(picks) % 16
        table[at] ^= 0x80
        assert count_slots_holding(table, wanted) == expect - 1


def _abort_after_packs(repo: Repository, data: list[bytes]) -> None:
    """A writer that published (and waited for) packs of ``data``, then gave up."""
    w = repo.writer()
    sw = w.stream("first", "disk", len(data) * CHUNK)
    for i, c in enumerate(data):
        sw.write_chunk(i, c)
    assert w.packs_written > 0  # small packs: some were published and waited for
    w.abort()


@pytest.mark.parametrize("beside", [False, True])
def test_a_writer_after_an_aborted_one_never_names_unindexed_chunks(
    tmp_path: pathlib.Path, beside: bool
) -> None:
    """A capture retried in the same process (its stream stored opaquely) writes the same
    disk chunks again.  The aborted writer's published chunks must be forgotten (or, while
    another writer of the same object runs, indexed), else the retry deduplicates against
    them and commits an archive whose chunks no index object names: unreadable from any
    other process.  Before the fix all 3000 were missing from a fresh process's index."""
    repo = make_repo(tmp_path / "r")
    data = [rnd(CHUNK, 1000 + i) for i in range(3000)]
    other = repo.writer() if beside else None  # another writer of the same Repository
    _abort_after_packs(repo, data)
    with repo.writer() as w:
        sw = w.stream("again", "disk", len(data) * CHUNK)
        for i, c in enumerate(data):
            sw.write_chunk(i, c)
        new = sw.close().bytes_new
        aid = w.commit(META)
    if other is not None:
        other.abort()
        # indexed by the abort: deduplicated (all but the packs in flight when it stopped)
        assert new < len(data) * CHUNK // 10
    else:
        assert new == len(data) * CHUNK  # forgotten by the abort: stored again
    fresh = Repository.open(str(tmp_path / "r"))
    assert fresh._missing_chunks([fresh.codecs.chunk_id(c) for c in data]) == []
    assert read_archive(fresh, aid)["again"] == b"".join(data)


def test_random_chunks_are_stored_as_raw_block_frames(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's codec skips the compressor for incompressible chunks; text is compressed.

    zstd emits the same raw-block frame for random data, so the stored bytes alone cannot
    show the skip: the compressor's calls for blobs are counted.
    """
    blob_calls: list[int] = []
    real = BlobCodec.compress

    def spy(self: BlobCodec, data: bytes | memoryview, *, checksum: bool) -> bytes:
        if not checksum:  # blobs; structure bodies carry the frame checksum
            blob_calls.append(len(data))
        return real(self, data, checksum=checksum)

    monkeypatch.setattr(BlobCodec, "compress", spy)
    big = 64 * 1024  # the helpers' 4 KiB chunks are below the size the codec judges
    opts = dataclasses.replace(small_options(), disk_chunk_size=big, pack_size=1 << 20)
    repo = Repository.init(str(tmp_path / "r"), opts)
    noise = random.Random(5).randbytes(8 * big)
    text = (b"vmarchive compresses text like this line. " * 20000)[: 8 * big]
    aid = write_archive(repo, {"noise": noise, "text": text})
    fresh = Repository.open(str(tmp_path / "r"))
    assert read_archive(fresh, aid) == {"noise": noise, "text": text}
    kinds = {"raw": 0, "compressed": 0}
    for _cid, loc in fresh.index.items():
        pack = fresh.backend.get(pack_key(loc.pack_id))
        blob = pack[loc.offset : loc.offset + loc.length]
        is_raw = blob == raw_frame(blob[len(blob) - loc.raw_length :])
        kinds["raw" if is_raw else "compressed"] += 1
    assert kinds == {"raw": 8, "compressed": 8}
    assert len(blob_calls) == 8  # the text chunks only
    assert fresh.verify(full=True).ok


@pytest.mark.parametrize("encrypted", [False, True])
def test_incompressible_chunks_are_encoded_without_the_compression_pool(
    tmp_path: pathlib.Path, encrypted: bool
) -> None:
    """A chunk judged incompressible is framed (and sealed) on the storing thread: the
    hand-off to a compression thread cost more than the copy.  Compressible chunks still
    go to the pool.  Either kind reads back while in flight and after the commit, though
    the caller writes every chunk from one buffer it overwrites at once."""
    big = 64 * 1024
    opts = dataclasses.replace(
        small_options(encrypted=encrypted), disk_chunk_size=big, pack_size=1 << 20
    )
    repo = Repository.init(str(tmp_path / "r"), opts)
    noise = [random.Random(7 + i).randbytes(big) for i in range(6)]
    text = [(b"compressible line %d. " % i * 4000)[:big] for i in range(6)]
    pooled: list[int] = []
    with repo.writer() as w:
        real_submit = w._pool.submit

        def counting_submit(fn: Any, *args: Any, **kw: Any) -> Any:
            pooled.append(len(args[1]))
            return real_submit(fn, *args, **kw)

        w._pool.submit = counting_submit  # type: ignore[method-assign,assignment]
        sw = w.stream("disk", "disk", 12 * big)
        buf = bytearray(big)
        for i, c in enumerate(noise + text):
            buf[:] = c
            sw.write_chunk(i, memoryview(buf))
            buf[:] = b"\xa5" * big
            assert w.read_chunk(repo.codecs.chunk_id(c)) == c
        sw.close()
        aid = w.commit(META)
    assert len(pooled) == len(text)
    fresh = Repository.open(str(tmp_path / "r"), PASSPHRASE if encrypted else None)
    assert read_archive(fresh, aid) == {"disk": b"".join(noise + text)}
    assert fresh.verify(full=True).ok


@pytest.mark.parametrize("released", [True, False])
def test_packs_are_built_in_the_mappings_of_published_ones(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, released: bool
) -> None:
    """A writer builds each pack in a mapping that a published pack's builder released,
    where there is one (fresh pages cost ~12 ms per 16 MiB to touch here); the control:
    with every release refused (as while a view of the pack is held), each pack takes a
    new mapping.  Either way every chunk reads back, while in flight and after."""
    import mmap as real_mmap

    from vmarchive.format import pack as fpack

    made: list[int] = []

    real_new = fpack.new_mapping

    def counting(length: int) -> real_mmap.mmap:
        made.append(length)
        return real_new(length)

    monkeypatch.setattr(fpack, "new_mapping", counting)
    if not released:
        monkeypatch.setattr(fpack.PackBuilder, "release", lambda self: None)
    big = 64 * 1024
    opts = dataclasses.replace(small_options(), disk_chunk_size=big, pack_size=1 << 20)
    repo = Repository.init(str(tmp_path / "r"), opts)
    chunks = [random.Random(i).randbytes(big) for i in range(120)]  # ~8 packs
    with repo.writer() as w:
        sw = w.stream("d", "disk", len(chunks) * big)
        for i, c in enumerate(chunks):
            sw.write(i * big, c)
            if i % 16 == 15:
                assert w.read_chunk(sw.slot_id(i)) == c
        sw.close()
        aid = w.commit({"time": "2026-01-01T00:00:00Z", "domain": "vm", "kind": "full"})
        packs = w.packs_written
    assert packs >= 7
    if released:
        assert len(made) <= 4  # in flight at once: two uploads and the pack being built
    else:
        assert len(made) == packs
    assert not w._free_maps  # given back when the writer is done, not kept with it
    assert read_archive(Repository.open(str(tmp_path / "r")), aid) == {"d": b"".join(chunks)}


def test_a_writer_needs_no_more_address_space_than_its_packs(tmp_path: pathlib.Path) -> None:
    """Pack builders reserve a pack's worth of address space, sized by the repository's
    chunk sizes, not by the format's largest chunk (1 GiB): under a 1 GiB address-space
    limit (``ulimit -v``; a kernel that does not overcommit refuses alike) a writer stores
    and commits.  The control, in the same process: a builder asking for 2 GiB is
    refused there."""
    script = f"""
import resource, sys
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
from storehelpers import write_archive, read_archive
from vmarchive.format.pack import PackBuilder
from vmarchive.store import InitOptions, Repository
repo = Repository.init({str(tmp_path / "r")!r}, InitOptions())
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
try:
    PackBuilder(repo.codecs.blob, capacity=2 << 30)
except (OSError, MemoryError):
    print("refused")
data = bytes(range(256)) * 4096 * 8
aid = write_archive(repo, {{"disk": data}})
assert read_archive(repo, aid) == {{"disk": data}}
print("stored")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "stored"]


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_buffer_handed_over_is_kept_not_copied(tmp_path: pathlib.Path, encrypted: bool) -> None:
    """``write_chunk(..., handed_over=True)``: the writer keeps the caller's buffer for the
    chunk's frame or its compression instead of a copy (a disk reader's buffers are
    fresh per read), so what is stored is what the buffer holds when the writer gets to
    it.  Shown by writing to the buffers after the call -- what a caller handing them
    over must not do: a plain repository stores the changed raw chunk and the changed
    compressible one (reads then find them damaged).  The controls: without handed_over,
    and for the raw chunk of an encrypted repository (sealed at once), the bytes of the
    call are stored."""
    big = 64 * 1024
    opts = dataclasses.replace(
        small_options(encrypted=encrypted), disk_chunk_size=big, pack_size=1 << 20
    )
    for handed_over in (True, False):
        path = str(tmp_path / f"r{handed_over}")
        repo = Repository.init(path, opts)
        noise = bytearray(random.Random(3).randbytes(big))
        text = bytearray((b"a compressible line. " * 4000)[:big])
        with repo.writer(options=WriterOptions(workers=1, max_inflight=8)) as w:
            sw = w.stream("d", "disk", 2 * big)
            w._pool.submit(time.sleep, 0.2)  # the compression thread is busy for a while
            sw.write_chunk(0, memoryview(noise), handed_over=handed_over)
            sw.write_chunk(1, memoryview(text), handed_over=handed_over)
            ids = [sw.slot_id(0), sw.slot_id(1)]
            noise[:5] = text[:5] = b"LATER"
            sw.close()
            w.commit(META)
        fresh = Repository.open(path, PASSPHRASE if encrypted else None)
        damaged = []
        for cid in ids:
            try:
                fresh.read_chunk(cid)
            except DamageError:
                damaged.append(True)
            else:
                damaged.append(False)
        if not handed_over:
            assert damaged == [False, False]
        else:
            assert damaged == [not encrypted, True]


@pytest.mark.parametrize("flush", [40, 10_000], ids=["index-flushed-on-the-way", "one-index"])
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_chunks_published_by_one_writer_are_adopted_by_another(
    tmp_path: pathlib.Path, encrypted: bool, flush: int
) -> None:
    """publish_chunks / adopt_index: what a capture's disk reader process stores (its own
    Repository object and writer, as another process has them) is durable, named by index
    objects and by no manifest; the capture's writer adopts those and commits an archive
    that a fresh open reads back.  Many packs; index objects flushed on the way, or one."""
    path = tmp_path / "r"
    make_repo(path, encrypted=encrypted).close()
    opts = WriterOptions(index_flush_entries=flush)
    data = b"".join(rnd(CHUNK, i) for i in range(120)) + bytes(3 * CHUNK) + rnd(100, 999)
    secret = PASSPHRASE if encrypted else None
    child = Repository.open(str(path), secret)
    parent = Repository.open(str(path), secret)
    with parent.writer() as w:
        sink = w.stream("disk:vda", "disk", len(data))
        with child.writer(options=opts) as cw:
            csw = cw.stream("disk:vda", "disk", len(data))
            csw.write(0, data)
            names = cw.publish_chunks()
            table = csw.table()
            with pytest.raises(UsageError):
                cw.stream("more", "disk", 1)  # the writer has ended
        assert len(names) == 1 if flush > 121 else len(names) >= 2, names
        assert parent.list_archives() == [] and child.list_archives() == []
        # until adopted the chunks are unknown to the capture's writer
        with pytest.raises(ChunkMissingError):
            sink.set_chunks(table, range(len(table) // 16))
        assert w.adopt_index(names) == 121  # 120 chunks and the short last one
        assert w.adopt_index(names) == 0  # a second time adds nothing
        assert sink.set_chunks(table, range(len(table) // 16)) == 121  # and 3 holes
        assert sink.close().bytes_new == 0
        archive = w.commit(META)
    fresh = Repository.open(str(path), secret)
    assert read_archive(fresh, archive) == {"disk:vda": data}
    assert fresh.verify(full=True).ok
