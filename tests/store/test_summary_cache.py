"""The local cache of archive summaries: list without loading manifests, never wrong."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import msgspec
import pytest
from storehelpers import PASSPHRASE, make_repo, write_archive

from vmarchive.store import Repository
from vmarchive.store.summarycache import CACHE_ENV


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    d = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(d))
    yield d


def loads(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the manifests the repository loads from now on."""
    seen: list[str] = []
    real = repo._load

    def counting(aid: str) -> object:
        seen.append(aid)
        return real(aid)

    monkeypatch.setattr(repo, "_load", counting)
    return seen


def three(path: pathlib.Path) -> tuple[Repository, list[str]]:
    repo = make_repo(path)
    ids = [
        write_archive(repo, {"s": bytes([i]) * 1000}, time=f"2026-01-0{i + 1}T00:00:00Z")
        for i in range(3)
    ]
    return repo, ids


def test_second_listing_loads_no_manifest(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, ids = three(tmp_path / "r")
    first = repo.list_archives()
    assert [a.id for a in first] == ids
    with Repository.open(str(tmp_path / "r")) as again:
        seen = loads(again, monkeypatch)
        second = again.list_archives()
    assert seen == []
    assert [a.to_json() for a in second] == [a.to_json() for a in first]


def test_negative_control_without_cache_every_manifest_is_loaded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "off")
    repo, ids = three(tmp_path / "r")
    repo.list_archives()
    seen = loads(repo, monkeypatch)
    repo.list_archives()
    assert sorted(seen) == sorted(ids)


def test_forgotten_archives_leave_the_cache(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path
) -> None:
    repo, ids = three(tmp_path / "r")
    repo.list_archives()
    assert len(list(cache_dir.rglob("*.json"))) == 3
    repo.forget([ids[0]])
    assert [a.id for a in repo.list_archives()] == ids[1:]
    assert sorted(p.stem for p in cache_dir.rglob("*.json")) == sorted(ids[1:])


def test_damaged_entry_is_remade(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, ids = three(tmp_path / "r")
    want = [a.to_json() for a in repo.list_archives()]
    (entry,) = [p for p in cache_dir.rglob("*.json") if p.stem == ids[1]]
    entry.write_text('{"v": 1, "id": "not this one"')  # cut short
    seen = loads(repo, monkeypatch)
    assert [a.to_json() for a in repo.list_archives()] == want
    assert seen == [ids[1]]
    seen.clear()
    repo.list_archives()
    assert seen == [], "the remade entry is served again"


def test_manifest_rewritten_in_place_is_not_served_from_cache(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path
) -> None:
    repo, ids = three(tmp_path / "r")
    repo.list_archives()
    path = tmp_path / "r" / "archives" / ids[2]
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [a.id for a in repo.list_archives()] == ids[:2], "a damaged manifest was listed"


def test_an_encrypted_repository_keeps_sealed_summaries(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its entries spare the manifests as a plain repository's do, but say nothing in the
    clear (its domain name and tag; control: a plain repository's entries say both); an
    entry that does not open (damaged, or put under another archive's name) is remade."""
    repo = make_repo(tmp_path / "r", encrypted=True)
    ids = [
        write_archive(
            repo, {"s": bytes([i]) * 1000}, domain="secret-domain", extra={"tags": ["t-secret"]}
        )
        for i in range(2)
    ]
    first = repo.list_archives()
    repo.close()
    entries = sorted(cache_dir.rglob("*.json"))
    assert len(entries) == 2
    blob = b"".join(e.read_bytes() for e in entries)
    assert b"secret-domain" not in blob and b"t-secret" not in blob
    with Repository.open(str(tmp_path / "r"), PASSPHRASE) as again:
        seen = loads(again, monkeypatch)
        assert [a.to_json() for a in again.list_archives()] == [a.to_json() for a in first]
        assert seen == []
        one, other = (cache_dir.rglob(f"{a}.json") for a in ids)
        path_one, path_other = next(one), next(other)
        path_one.write_bytes(path_other.read_bytes())  # another archive's entry
        damaged = bytearray(path_other.read_bytes())
        damaged[20] ^= 1
        path_other.write_bytes(bytes(damaged))
        assert [a.to_json() for a in again.list_archives()] == [a.to_json() for a in first]
        assert sorted(seen) == sorted(ids)
    plain = make_repo(tmp_path / "p")
    write_archive(plain, {"s": b"x" * 1000}, domain="secret-domain", extra={"tags": ["t-secret"]})
    plain.list_archives()
    blob = b"".join(e.read_bytes() for e in cache_dir.rglob("*.json"))
    assert b"secret-domain" in blob and b"t-secret" in blob


def by_guest(path: pathlib.Path) -> tuple[Repository, dict[str, list[str]]]:
    """Six archives of three guests (uuids u0, u1, u2, in turn)."""
    repo = make_repo(path)
    ids: dict[str, list[str]] = {}
    for i in range(6):
        uuid = f"u{i % 3}"
        aid = write_archive(
            repo,
            {"s": bytes([i]) * 1000},
            time=f"2026-01-0{i + 1}T00:00:00Z",
            extra={"uuid": uuid},
        )
        ids.setdefault(uuid, []).append(aid)
    return repo, ids


def decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The cache entries decoded from now on."""
    seen: list[bytes] = []
    real = msgspec.json.decode

    def counting(raw: bytes) -> object:
        seen.append(raw)
        return real(raw)

    monkeypatch.setattr(msgspec.json, "decode", counting)  # as summarycache calls it
    return seen


def test_listing_one_guest_decodes_only_its_entries(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``list_archives(uuid=...)`` is the full listing filtered by uuid, whether the
    summaries come from manifests or from the cache; from the cache, the other guests'
    entries are not even decoded.  Control: the full listing decodes every entry."""
    repo, ids = by_guest(tmp_path / "r")
    seen = loads(repo, monkeypatch)
    assert [a.id for a in repo.list_archives(uuid="u1")] == ids["u1"]
    assert sorted(seen) == sorted(a for v in ids.values() for a in v)  # all made, cached
    seen.clear()
    decoded = decodes(monkeypatch)
    for uuid in ("u0", "u1", "u2", "nobody"):
        decoded.clear()
        got = repo.list_archives(uuid=uuid)
        assert [a.id for a in got] == ids.get(uuid, [])
        assert [a.metadata["uuid"] for a in got] == [uuid] * len(got)
        assert len(decoded) == len(got)
    assert seen == []
    decoded.clear()
    everything = repo.list_archives()
    assert len(decoded) == 6 and len(everything) == 6
    assert [a.id for a in everything if a.metadata["uuid"] == "u2"] == ids["u2"]


def test_an_entry_not_written_as_expected_is_decoded_not_skipped(
    tmp_path: pathlib.Path, cache_dir: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry is skipped undecoded only when it starts as the cache writes this
    archive's entry at this stamp.  Written otherwise (here: indented), or stale (a
    manifest of another size), it is decoded -- and the listing stays right; a stale entry
    lacking the uuid does not hide a manifest that now has it."""
    repo, ids = by_guest(tmp_path / "r")
    repo.list_archives()
    (entry,) = [p for p in cache_dir.rglob("*.json") if p.stem == ids["u0"][0]]
    entry.write_text(json.dumps(json.loads(entry.read_text()), indent=1))
    decoded = decodes(monkeypatch)
    assert [a.id for a in repo.list_archives(uuid="u1")] == ids["u1"]
    assert len(decoded) == 3  # u1's two, and the indented entry of u0's
    (entry,) = [p for p in cache_dir.rglob("*.json") if p.stem == ids["u1"][0]]
    stale = json.loads(entry.read_text())
    stale["stamp"] = "1:0.0"
    stale["summary"]["metadata"]["uuid"] = "u0"
    entry.write_text(json.dumps(stale))
    seen = loads(repo, monkeypatch)
    assert [a.id for a in repo.list_archives(uuid="u1")] == ids["u1"]
    assert seen == [ids["u1"][0]]  # the stale entry: its manifest loaded again
