"""The local cache of index files and manifests on S3: ``list`` and the dedup index of a
second session cost LISTs and no GET per object; the cache follows deletions by other
clients and never serves a damaged or replaced copy."""

from __future__ import annotations

import os
import pathlib

import pytest
from s3helpers import Ceph
from storehelpers import read_archive, small_options, write_archive

from vmarchive.store import Repository
from vmarchive.store.s3 import S3Backend
from vmarchive.store.summarycache import CACHE_ENV

pytestmark = pytest.mark.s3


def _gets(b: S3Backend) -> list[str]:
    seen: list[str] = []
    b._client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: seen.append(request.url)
    )
    return seen


def _session(ceph: Ceph, location: str, cache: pathlib.Path | None) -> tuple[Repository, list[str]]:
    b = ceph.backend(location, cache_dir=str(cache) if cache else None)
    gets = _gets(b)
    return Repository.open(location, backend=b), gets


@pytest.mark.parametrize("cached", [True, False])
def test_second_session_reads_nothing_but_listings(
    ceph: Ceph, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    location = ceph.fresh_location()
    cache = tmp_path / "cache" if cached else None
    if not cached:  # nor the chunk index cache, which a commit now keeps current
        monkeypatch.setenv(CACHE_ENV, "off")
    Repository.init(location, small_options(), backend=ceph.backend(location))
    repo, _ = _session(ceph, location, cache)
    ids = [write_archive(repo, {"d": os.urandom(20 * 4096)}, domain=f"vm{i}") for i in range(3)]

    repo, gets = _session(ceph, location, cache)
    assert {a.id for a in repo.list_archives()} == set(ids)
    _ = repo.index
    meta_gets = [u for u in gets if "/archives/" in u or "/index/" in u]
    if cached:  # written through by the writer session: nothing to fetch
        assert meta_gets == []
    else:  # negative control: every manifest and every index file
        assert len(meta_gets) >= len(ids) + 1
    assert read_archive(repo, ids[0])["d"]


def test_cache_follows_other_clients_and_survives_damage(
    ceph: Ceph, tmp_path: pathlib.Path
) -> None:
    location = ceph.fresh_location()
    cache = tmp_path / "cache"
    Repository.init(location, small_options(), backend=ceph.backend(location))
    repo, _ = _session(ceph, location, cache)
    a = write_archive(repo, {"d": os.urandom(8 * 4096)}, domain="a")
    b = write_archive(repo, {"d": os.urandom(8 * 4096)}, domain="b")
    assert {x.id for x in repo.list_archives()} == {a, b}
    copies = sorted(p for p in cache.rglob("*") if p.is_file() and "archives" in p.parts)
    assert len(copies) == 2

    # Another host (no cache) forgets one archive: our next listing drops the copy.
    Repository.open(location, backend=ceph.backend(location)).forget([a])
    assert {x.id for x in repo.list_archives()} == {b}
    assert not any(a in p.name for p in cache.rglob("*"))

    # A damaged local copy is detected and fetched again.
    (copy,) = [p for p in cache.rglob("*") if p.is_file() and b in p.name]
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 1
    copy.write_bytes(bytes(raw))
    fresh, gets = _session(ceph, location, cache)
    assert {x.id for x in fresh.list_archives()} == {b}  # from the summary cache
    assert fresh.load_archive(b).id == b
    assert any(b in u for u in gets)
    assert fresh.verify(full=True).ok
