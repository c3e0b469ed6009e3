"""The compact chunk index behaves like a dict of id -> location."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmarchive.store.chunkindex import ChunkIndex, Location


def cid(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 5), st.integers(0, 2**32 - 1))))
def test_matches_a_dict(ops: list[tuple[int, int, int]]) -> None:
    idx = ChunkIndex(capacity=16)
    model: dict[bytes, Location] = {}
    for i, pack, off in ops:
        loc = Location(f"{pack:064x}", off, i + 1, i * 2)
        added = idx.add(cid(i), loc)
        assert added == (cid(i) not in model)
        model.setdefault(cid(i), loc)
    assert len(idx) == len(model)
    for k, v in model.items():
        assert idx.get(k) == v
        assert k in idx
    assert dict(idx.items()) == model
    assert idx.get(cid(10_000)) is None
    assert cid(10_000) not in idx


def test_grows_and_stays_compact() -> None:
    idx = ChunkIndex()
    for i in range(50_000):
        idx.add(cid(i), Location(f"p{i % 7}", i, 10, 20))
    assert len(idx) == 50_000
    assert idx.get(cid(49_999)) == Location(f"p{49_999 % 7}", 49_999, 10, 20)
    # 32-byte slots at <= 0.75 load: well under 100 bytes per entry.
    assert idx.memory_bytes() / len(idx) < 100
    assert sorted(idx.pack_ids()) == sorted(f"p{i}" for i in range(7))


def test_rejects_bad_ids_and_locations() -> None:
    idx = ChunkIndex()
    with pytest.raises(ValueError):
        idx.add(b"short", Location("p", 0, 1, 1))
    with pytest.raises(ValueError):
        idx.add(cid(1), Location("p", 2**32, 1, 1))
