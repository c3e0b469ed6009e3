"""The restore's store fast paths (vmarchive.store.batchread) against a local repository:
batched reads return what read_chunk returns and fail like it (also as views of raw
chunks); the presence check agrees with verify on a whole repository and doubts on a
missing or truncated pack."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmarchive.errors import ChunkMissingError, DamageError
from vmarchive.store import Repository
from vmarchive.store.batchread import all_present, read_chunk_views, read_chunks
from vmarchive.store.codecs import InitOptions
from vmarchive.store.repository import pack_key

CHUNK = 64 << 10


@pytest.fixture
def repo_with_archive(tmp_path: Path) -> tuple[str, str, list[bytes]]:
    path = str(tmp_path / "repo")
    Repository.init(path, InitOptions()).close()
    data = b"".join(os.urandom(CHUNK // 2) * 2 for _ in range(40))  # compressible, distinct
    with Repository.open(path) as repo, repo.writer() as w:
        sw = w.stream("ram:pc.ram", "ram", len(data), chunk_size=CHUNK)
        sw.write(0, data)
        sw.close()
        aid = w.commit({"time": "2026-11-26T00:00:00+00:00", "domain": "d", "kind": "test"})
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return path, str(aid), chunks


def test_read_chunks_equals_read_chunk(repo_with_archive: tuple[str, str, list[bytes]]) -> None:
    path, aid, chunks = repo_with_archive
    with Repository.open(path) as repo:
        ids = list(repo.load_archive(aid).stream("ram:pc.ram").chunk_ids())
        # in order, out of order, repeated: runs split where blobs are not adjacent
        for order in (ids, ids[::-1], ids[:3] + ids[:3] + ids[10:]):
            assert read_chunks(repo, order) == [repo.read_chunk(c) for c in order]
        assert read_chunks(repo, ids) == chunks
        assert all_present(repo, repo.load_archive(aid))


def _pack_of(repo: Repository, root: str, cid: bytes) -> tuple[Path, int, int]:
    loc = repo.index.get(cid)
    assert loc is not None
    return Path(root) / pack_key(loc.pack_id), loc.offset, loc.length


def test_damage_inside_a_run_is_found(repo_with_archive: tuple[str, str, list[bytes]]) -> None:
    path, aid, _chunks = repo_with_archive
    with Repository.open(path) as repo:
        ids = list(repo.load_archive(aid).stream("ram:pc.ram").chunk_ids())
        p, off, length = _pack_of(repo, path, ids[7])
        b = bytearray(p.read_bytes())
        b[off + length // 2] ^= 0x40
        p.write_bytes(bytes(b))
        with pytest.raises(DamageError):
            read_chunks(repo, ids)
        # negative control: the runs before the damaged chunk read fine
        assert len(read_chunks(repo, ids[:7])) == 7
        # the presence check does not read data: it cannot see this (verify --full can)
        assert all_present(repo, repo.load_archive(aid))


def test_missing_or_truncated_pack(repo_with_archive: tuple[str, str, list[bytes]]) -> None:
    path, aid, _chunks = repo_with_archive
    with Repository.open(path) as repo:
        archive = repo.load_archive(aid)
        ids = list(archive.stream("ram:pc.ram").chunk_ids())
        p, _off, _length = _pack_of(repo, path, ids[-1])
        whole = p.read_bytes()
        p.write_bytes(whole[: len(whole) // 2])
        assert not all_present(repo, archive)
        with pytest.raises(DamageError):
            read_chunks(repo, ids)
        p.unlink()
        assert not all_present(repo, archive)
        with pytest.raises(ChunkMissingError):
            read_chunks(repo, ids)
        assert not repo.verify([aid]).ok  # and the real verify says why
        p.write_bytes(whole)  # negative control: restored, all present again
        repo.reload_index()
        assert all_present(repo, archive)


@pytest.fixture
def repo_with_random_archive(tmp_path: Path) -> tuple[str, str, list[bytes]]:
    """Random chunks (stored as raw frames, skip_incompressible) and compressible ones."""
    path = str(tmp_path / "repo")
    Repository.init(path, InitOptions()).close()
    chunks = [os.urandom(CHUNK) if i % 3 else os.urandom(64) * (CHUNK // 64) for i in range(30)]
    with Repository.open(path) as repo, repo.writer() as w:
        sw = w.stream("ram:pc.ram", "ram", CHUNK * len(chunks), chunk_size=CHUNK)
        sw.write(0, b"".join(chunks))
        sw.close()
        aid = w.commit({"time": "2026-11-27T00:00:00+00:00", "domain": "d", "kind": "test"})
    return path, str(aid), chunks


def test_read_chunk_views_are_the_chunks_and_are_verified(
    repo_with_random_archive: tuple[str, str, list[bytes]],
) -> None:
    path, aid, chunks = repo_with_random_archive
    with Repository.open(path) as repo:
        ids = list(repo.load_archive(aid).stream("ram:pc.ram").chunk_ids())
        got = read_chunk_views(repo, ids)
        assert got == chunks == read_chunks(repo, ids)
        kinds = [isinstance(g, memoryview) and g.readonly for g in got]
        assert kinds == [bool(i % 3) for i in range(len(chunks))]  # raw ones are views
        # a flipped byte in a raw chunk: the view is still hashed against its id
        p, off, length = _pack_of(repo, path, ids[4])
        b = bytearray(p.read_bytes())
        b[off + length - 1] ^= 0x01
        p.write_bytes(bytes(b))
        with pytest.raises(DamageError):
            read_chunk_views(repo, ids)
        assert read_chunk_views(repo, ids[:4]) == chunks[:4]  # control: the ones before
