"""The S3 backend's pure parts, without a store: locations, the pack cache, the local
object cache."""

from __future__ import annotations

import hashlib
import os
import pathlib
import threading
import time
import weakref
from collections.abc import Callable

import pytest

from vmarchive.errors import RepositoryError
from vmarchive.store import s3
from vmarchive.store.chunkindex import Location
from vmarchive.store.codecs import StreamInfo
from vmarchive.store.readahead import PackOrder
from vmarchive.store.s3 import _ObjectCache, _PackCache, _WrittenPacks, parse_location


def test_parse_location() -> None:
    assert parse_location("s3://bucket") == ("bucket", "")
    assert parse_location("s3://my.bucket-1/a/b/") == ("my.bucket-1", "a/b/")
    for bad in ("s3://", "s3://Bucket/x", "s3://b/x", "s3://bucket/a//b", "s3://bucket/.x"):
        with pytest.raises(RepositoryError):
            parse_location(bad)


def test_pack_cache_fetches_on_the_third_read_and_evicts_lru() -> None:
    packs = {f"data/00/p{i}": bytes([i]) * 100 for i in range(4)}
    fetched: list[str] = []

    def fetch(key: str) -> bytes:
        fetched.append(key)
        return packs[key]

    cache = _PackCache(capacity=250)  # two packs fit
    for key in ("data/00/p0", "data/00/p1", "data/00/p2"):
        assert cache.read(key, 0, 10, fetch) is None
        assert cache.read(key, 10, 10, fetch) is None
        assert cache.read(key, 95, 10, fetch) == packs[key][95:]
    assert fetched == ["data/00/p0", "data/00/p1", "data/00/p2"]
    assert cache.read("data/00/p2", 0, 1, fetch) == b"\x02"  # cached
    assert cache.read("data/00/p0", 0, 1, fetch) == b"\x00"  # evicted: fetched again
    assert fetched[-1] == "data/00/p0" and len(fetched) == 4
    cache.forget("data/00/p0")
    assert cache.read("data/00/p0", 0, 1, fetch) == b"\x00"
    assert len(fetched) == 5


def test_pack_cache_one_fetch_for_concurrent_readers_and_errors_propagate() -> None:
    gate = threading.Event()
    calls: list[str] = []

    def slow(key: str) -> bytes:
        calls.append(key)
        gate.wait(5)
        if key.endswith("bad"):
            raise OSError("boom")
        return b"x" * 64

    cache = _PackCache(capacity=1 << 20)
    for key in ("data/00/ok", "data/00/bad"):
        cache.read(key, 0, 1, slow)
        cache.read(key, 0, 1, slow)
    results: list[object] = []

    def reader(key: str) -> None:
        try:
            results.append(cache.read(key, 0, 4, slow))
        except OSError as e:
            results.append(e)

    threads = [threading.Thread(target=reader, args=(k,)) for k in ["data/00/ok"] * 4]
    threads += [threading.Thread(target=reader, args=("data/00/bad",))]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls.count("data/00/ok") == 1
    assert results.count(b"xxxx") == 4 and sum(isinstance(r, OSError) for r in results) == 1


def test_object_cache_serves_only_what_the_listing_and_the_name_vouch_for(
    tmp_path: pathlib.Path,
) -> None:
    data = b"manifest bytes"
    key = f"archives/{hashlib.sha256(data).hexdigest()}"
    cache = _ObjectCache(str(tmp_path))
    assert cache.wants(key) and not cache.wants("archives/short") and not cache.wants("config")
    cache.store(key, '"etag1"', data)
    assert cache.lookup(key) == data
    cache.saw(key, '"etag2"')  # replaced in the store: the old copy is not served
    assert cache.lookup(key) is None
    cache.store(key, '"etag2"', b"other bytes")  # bytes that do not match the name: not kept
    assert cache.lookup(key) is None
    cache.store(key, '"etag2"', data)
    assert cache.lookup(key) == data
    cache.prune("archives/", set())  # gone from the listing: the copy goes
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    cache.store(key, '"etag3"', data)
    cache.prune("data/", set())  # an unrelated listing removes nothing
    assert cache.lookup(key) == data
    cache.drop(key)
    assert cache.lookup(key) is None


def test_prefetch_serves_the_next_pack_without_plain_reads_and_survives_failure() -> None:
    packs = {f"data/00/p{i}": bytes([i]) * 100 for i in range(3)}
    fetched: list[str] = []
    jobs: list[Callable[[], None]] = []

    def fetch(key: str) -> bytes:
        fetched.append(key)
        if key == "data/00/p2":
            raise OSError("gateway hiccup")
        return packs[key]

    cache = _PackCache(capacity=1 << 20)
    assert not cache.streaming("data/00/p0")
    for _ in range(3):  # the third read fetches p0 whole: a sequential reader
        cache.read("data/00/p0", 0, 1, fetch)
    assert cache.streaming("data/00/p0")
    assert cache.prefetch("data/00/p1", fetch, jobs.append)
    assert not cache.prefetch("data/00/p1", fetch, jobs.append)  # already under way
    assert cache.streaming("data/00/p1")
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(cache.read("data/00/p1", 5, 2, fetch)))
    reader.start()  # waits for the prefetch instead of a plain read (it returns no None)
    jobs.pop()()
    reader.join()
    assert got == [b"\x01\x01"] and fetched == ["data/00/p0", "data/00/p1"]
    # A failed prefetch hands its waiters back to plain ranged GETs (None), no error.
    assert cache.prefetch("data/00/p2", fetch, jobs.append)
    jobs.pop()()
    assert cache.read("data/00/p2", 0, 1, fetch) is None
    assert not cache.streaming("data/00/p2")


def test_pack_order_learns_successors_from_slot_tables_within_a_budget() -> None:
    zero = bytes(16)

    def cid(n: int) -> bytes:
        return n.to_bytes(16, "big")

    # Stream: chunks 1-3 in pack A, a hole, 4-5 in B, 6 in A again (dedup), 7 in C.
    where = {1: "A", 2: "A", 3: "A", 4: "B", 5: "B", 6: "A", 7: "C"}
    table = b"".join([cid(1), cid(2), cid(3), zero, cid(4), cid(5), cid(6), cid(7)])
    located: list[bytes] = []

    def locate(c: bytes) -> Location | None:
        located.append(c)
        n = int.from_bytes(c, "big")
        return Location(where[n], 0, 1, 1) if n in where else None

    order = PackOrder(locate, zero)
    assert order.next_pack("A") is None  # nothing loaded yet: no guess
    stream = StreamInfo("s", "disk", 8, 1, {}, table)
    order.add_archive("a1", [stream])
    assert order.next_pack("A", budget=3) is None  # budget spent before the answer
    assert order.next_pack("A") == "B"
    assert order.next_pack("B") == "A" and order.next_pack("A") == "B"  # first one kept
    assert order.next_pack("C") is None
    assert len(located) == 7  # every slot looked up once, holes never
    # Streams are held weakly: once the reader drops its archive, nothing is scanned.
    other = StreamInfo("t", "disk", 2, 1, {}, cid(8) + cid(9))
    where.update({8: "D", 9: "E"})
    order.add_archive("a2", [other])
    ref = weakref.ref(other)
    del other
    assert ref() is None
    assert order.next_pack("D") is None and len(located) == 7
    kept = StreamInfo("t", "disk", 2, 1, {}, cid(8) + cid(9))
    order.add_archive("a3", [kept])  # control: the same table, still referenced
    assert order.next_pack("D") == "E"


def test_written_pack_copies_evict_oldest_expire_and_leave_no_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _WrittenPacks(str(tmp_path / "s3"), capacity=250)
    packs = {f"data/00/p{i}": bytes([i]) * 100 for i in range(3)}
    for key, body in packs.items():
        w.keep(key, body)
    # 300 bytes over a 250-byte budget: the oldest left.
    assert w.read("data/00/p0", 0, 10) is None
    assert w.read("data/00/p1", 95, 10) == bytes([1]) * 5  # short at the end
    assert w.read("data/00/p2", 100, 10) == b""  # past the end, like a ranged GET
    assert w.held() == 200
    assert list((tmp_path / "s3").iterdir()) == []  # copies have no names
    w.keep("data/00/big", b"x" * 251)  # larger than the budget: not kept
    assert w.read("data/00/big", 0, 1) is None
    w.forget("data/00/p1")
    assert w.read("data/00/p1", 0, 1) is None
    # Served for a limited time only.
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + s3._WRITTEN_COPY_TTL + 1)
    assert w.read("data/00/p2", 0, 1) is None
    assert w.held() == 0
    monkeypatch.undo()
    w.keep("data/00/p3", b"abc")
    assert w.read("data/00/p3", 1, 5) == b"bc"
    w.close()
    assert w.read("data/00/p3", 0, 1) is None
    w.keep("data/00/p4", b"abc")  # a closed store of copies keeps nothing
    assert w.read("data/00/p4", 0, 1) is None


def test_written_pack_copies_leave_the_file_system_room(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.statvfs
    free_blocks = {"n": 0}

    class Fs:
        def __init__(self, st: object) -> None:
            self.f_frsize = 4096
            self.f_blocks = 1 << 20  # 4 GiB: 5 % + the reserve = 461 MiB must stay free
            self.f_bavail = free_blocks["n"]

    monkeypatch.setattr(os, "statvfs", lambda p: Fs(real(p)))
    w = _WrittenPacks(str(tmp_path), capacity=1 << 30)
    free_blocks["n"] = (460 << 20) // 4096
    w.keep("data/00/a", b"abc")
    assert w.read("data/00/a", 0, 3) is None  # would leave less than the reserve
    free_blocks["n"] = (470 << 20) // 4096  # control: with room it is kept
    w.keep("data/00/a", b"abc")
    assert w.read("data/00/a", 0, 3) == b"abc"
    w.close()
