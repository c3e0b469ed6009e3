"""Bit flips and lost objects: verify names exactly the damaged archives, readers raise."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import random
import shutil

import pytest
from storehelpers import CHUNK, make_repo, pack_keys, read_archive, write_archive

from vmarchive.errors import DamageError
from vmarchive.format import constants as C
from vmarchive.format.config import decode_config, encode_config
from vmarchive.format.pack import pack_tail_size
from vmarchive.store import Repository


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def pristine(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, dict[str, dict[str, bytes]]]:
    """Four archives: two share data, one stands alone, one is all holes."""
    path = tmp_path_factory.mktemp("pristine") / "r"
    repo = make_repo(path)
    common = rnd(30 * CHUNK, 100)
    contents = {
        "a": {"disk": rnd(20 * CHUNK, 1) + common},
        "b": {"disk": common + rnd(20 * CHUNK, 2), "meta": b"<domain/>"},
        "c": {"disk": rnd(25 * CHUNK, 3)},
        "d": {"disk": bytes(10 * CHUNK)},
    }
    archives = {}
    for i, (name, streams) in enumerate(contents.items()):
        aid = write_archive(repo, streams, domain=name, time=f"2026-01-01T0{i}:00:00Z")
        archives[aid] = streams
    return path, archives


def users_of(repo: Repository, cid: bytes) -> set[str]:
    return {a.id for a in repo.iter_archives() if cid in set(a.chunk_ids())}


def flip(path: pathlib.Path, key: str, offset: int) -> None:
    p = path.joinpath(*key.split("/"))
    b = bytearray(p.read_bytes())
    b[offset] ^= 0x40
    p.write_bytes(bytes(b))


def test_clean_repository_verifies(
    pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]],
) -> None:
    path, _archives = pristine
    repo = Repository.open(str(path))
    for full in (False, True):
        report = repo.verify(full=full)
        assert report.ok and report.damaged == [] and report.archives_checked == 4
    assert repo.verify(full=True).chunks_checked == 20 + 30 + 20 + 25 + 1  # + the meta chunk


@pytest.mark.parametrize("seed", range(12))
def test_flip_in_a_blob_names_exactly_its_archives(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]], seed: int
) -> None:
    src, archives = pristine
    path = tmp_path / "r"
    shutil.copytree(src, path)
    repo = Repository.open(str(path))
    rng = random.Random(seed)
    cid, loc = rng.choice(sorted(repo.index.items()))
    flip(path, f"data/{loc.pack_id[:2]}/{loc.pack_id}", loc.offset + rng.randrange(loc.length))
    expected = users_of(repo, cid)
    assert expected
    assert Repository.open(str(path)).verify(full=False).ok  # fast verify reads no data
    report = Repository.open(str(path)).verify(full=True)
    assert not report.ok
    assert set(report.damaged) == expected
    fresh = Repository.open(str(path))
    for aid, streams in archives.items():
        if aid in expected:
            with pytest.raises(DamageError):
                read_archive(fresh, aid)
        else:
            assert read_archive(fresh, aid) == streams


def _copy_with_pack_flip(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]], back: int
) -> tuple[pathlib.Path, str]:
    """A copy of the pristine repository with a bit of its first pack flipped ``back``
    bytes before the pack's end; returns the copy and that pack's key."""
    path = tmp_path / "r"
    shutil.copytree(pristine[0], path)
    key = pack_keys(Repository.open(str(path)))[0]
    flip(path, key, path.joinpath(*key.split("/")).stat().st_size - back)
    return path, key


def test_flip_in_a_pack_trailer_is_a_problem_but_damages_no_archive(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    archives = pristine[1]
    path, _key = _copy_with_pack_flip(tmp_path, pristine, 40)  # inside the trailer body
    report = Repository.open(str(path)).verify(full=True)
    assert not report.ok and report.damaged == []
    assert any("do not match its id" in p for p in report.problems)
    for aid, streams in archives.items():
        assert read_archive(Repository.open(str(path)), aid) == streams


def test_lost_pack_found_by_fast_verify(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    src, _ = pristine
    path = tmp_path / "r"
    shutil.copytree(src, path)
    repo = Repository.open(str(path))
    key = pack_keys(repo)[-1]
    pack_id = key.rsplit("/", 1)[1]
    expected: set[str] = set()
    for cid, loc in repo.index.items():
        if loc.pack_id == pack_id:
            expected |= users_of(repo, cid)
    repo.backend.delete(key)
    report = Repository.open(str(path)).verify(full=False)
    assert set(report.damaged) == expected and expected


def test_damaged_manifest_and_verify_by_name(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    src, archives = pristine
    path = tmp_path / "r"
    shutil.copytree(src, path)
    victim = sorted(archives)[1]
    flip(path, f"archives/{victim}", 30)
    repo = Repository.open(str(path))
    report = repo.verify(full=True)
    assert report.damaged == [victim]
    others = [a for a in archives if a != victim]
    assert repo.verify([o[:10] for o in others], full=True).ok
    assert {a.id for a in repo.list_archives()} == set(others)  # listed without the damaged one
    with pytest.raises(DamageError):
        repo.load_archive(victim)


def test_damaged_index_is_reported_and_rebuilt(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    src, archives = pristine
    path = tmp_path / "r"
    shutil.copytree(src, path)
    repo = Repository.open(str(path))
    idx = sorted(o.key for o in repo.backend.list("index/"))[0]
    flip(path, idx, 20)
    report = Repository.open(str(path)).verify()
    assert not report.ok
    assert any(idx.split("/")[1] in p for p in report.problems)
    # gc refuses to delete anything while an index is unreadable.
    with pytest.raises(DamageError, match="rebuild-index"):
        Repository.open(str(path)).gc()
    # The pack trailers are enough to rebuild what the index lost.
    result = Repository.open(str(path)).rebuild_index()
    assert result.chunks_added > 0 and not result.damaged_packs
    assert result.indices_deleted + result.indices_repaired == 1
    fresh = Repository.open(str(path))
    assert fresh.verify(full=True).ok
    for aid, streams in archives.items():
        assert read_archive(fresh, aid) == streams
    fresh.gc()


def test_rebuild_index_from_packs_alone(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    src, archives = pristine
    path = tmp_path / "r"
    shutil.copytree(src, path)
    shutil.rmtree(path / "index")
    assert set(Repository.open(str(path)).verify().damaged) == {
        a for a, s in archives.items() if any(s.values()) and a != _all_holes(archives)
    }
    assert Repository.open(str(path)).rebuild_index(dry_run=True).chunks_added == 96
    assert Repository.open(str(path)).rebuild_index().chunks_added == 96
    assert Repository.open(str(path)).rebuild_index().chunks_added == 0  # idempotent
    fresh = Repository.open(str(path))
    assert fresh.verify(full=True).ok
    for aid, streams in archives.items():
        assert read_archive(fresh, aid) == streams


def _all_holes(archives: dict[str, dict[str, bytes]]) -> str:
    return next(a for a, s in archives.items() if all(not any(v) for v in s.values()))


def test_unknown_feature_in_a_pack_footer_is_a_problem_not_the_end_of_verify(
    tmp_path: pathlib.Path, pristine: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    # a required-feature bit of the footer's header (bit 6)
    path, key = _copy_with_pack_flip(tmp_path, pristine, 28 - 8)
    report = Repository.open(str(path)).verify(full=True)
    assert not report.ok and report.archives_checked == 4
    assert any(f"pack {key.rsplit('/', 1)[1]}: footer:" in p for p in report.problems)


def _without_tail_ids(path: pathlib.Path) -> None:
    """Make ``path`` a repository as created before FEATURE_PACK_TAIL_ID existed."""
    cfg_file = path / "config"
    cfg = decode_config(cfg_file.read_bytes())
    assert cfg.pack_tail_id  # what init writes now
    old = dataclasses.replace(
        cfg, required_features=cfg.required_features & ~C.FEATURE_PACK_TAIL_ID
    )
    cfg_file.write_bytes(encode_config(old))


@pytest.mark.parametrize("tail_ids", [True, False])
def test_packs_are_named_as_the_config_says_and_damage_is_found_either_way(
    tmp_path: pathlib.Path, tail_ids: bool
) -> None:
    path = tmp_path / "r"
    make_repo(path)
    if not tail_ids:
        _without_tail_ids(path)
    repo = Repository.open(str(path))
    streams = {"disk": rnd(12 * CHUNK, 7)}
    aid = write_archive(repo, streams)
    keys = pack_keys(repo)
    assert keys
    for key in keys:
        data = path.joinpath(*key.split("/")).read_bytes()
        tail = data[-pack_tail_size(data[-C.PACK_FOOTER_SIZE :]) :]
        name = key.rsplit("/", 1)[1]
        assert name == hashlib.sha256(tail if tail_ids else data).hexdigest()
    assert Repository.open(str(path)).verify(full=True).ok
    _cid, loc = sorted(Repository.open(str(path)).index.items())[0]
    flip(path, f"data/{loc.pack_id[:2]}/{loc.pack_id}", loc.offset + loc.length // 2)
    report = Repository.open(str(path)).verify(full=True)
    assert report.damaged == [aid]
    # Only a pack named by all its bytes no longer matches its name after a blob flip.
    assert any("do not match its id" in p for p in report.problems) == (not tail_ids)
    with pytest.raises(DamageError):
        read_archive(Repository.open(str(path)), aid)
