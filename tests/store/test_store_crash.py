"""Crash safety with real processes: a writer SIGKILLed at every step of its write
ordering (and at random instants) leaves a repository that verifies, lists no partial
archive, keeps earlier archives byte-exact and lets gc and new writers proceed."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from crash_writer import content
from storehelpers import make_repo, read_archive, write_archive

from vmarchive.store import GcOptions, Repository

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# 64 KiB packs, ~90 new chunks per run: about 6 packs and 6 index files per archive.
POINTS = [
    ("before-pack", 1),
    ("before-pack", 4),
    ("after-pack", 1),
    ("after-pack", 5),
    ("before-index", 1),
    ("after-index", 1),
    ("before-index", 3),
    ("before-manifest", 1),
    ("after-manifest", 1),
]


def run_writer(
    repo: pathlib.Path, seed: int, crash: str | None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    env.pop("VMARCHIVE_CRASH_AT", None)
    if crash:
        env["VMARCHIVE_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, str(HERE / "crash_writer.py"), str(repo), str(seed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, str]:
    path = tmp_path_factory.mktemp("base") / "r"
    repo = make_repo(path)
    earlier = write_archive(repo, content(1))
    return path, earlier


def check_after_crash(path: pathlib.Path, earlier: str, committed: bool) -> None:
    repo = Repository.open(str(path))
    listed = [a.id for a in repo.list_archives()]
    assert (len(listed) == 2) == committed and earlier in listed
    report = repo.verify(full=True)
    assert report.ok, report.problems
    assert read_archive(repo, earlier) == content(1)
    if committed:
        (new,) = set(listed) - {earlier}
        assert read_archive(repo, new) == content(2)
    # The dead writer's lock is stale (its pid is gone): gc runs and removes the orphans.
    repo.gc(GcOptions(grace=0))
    after = Repository.open(str(path))
    assert after.verify(full=True).ok
    assert read_archive(after, earlier) == content(1)
    assert not list(after.backend.list("locks/"))
    # And a new writer succeeds.
    run = run_writer(path, 3, None)
    assert run.returncode == 0, run.stderr
    assert Repository.open(str(path)).verify(full=True).ok


@pytest.mark.parametrize(("point", "nth"), POINTS)
def test_sigkill_at_each_step(
    tmp_path: pathlib.Path, base: tuple[pathlib.Path, str], point: str, nth: int
) -> None:
    src, earlier = base
    path = tmp_path / "r"
    shutil.copytree(src, path)
    run = run_writer(path, 2, f"{point}:{nth}")
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stderr)
    check_after_crash(path, earlier, committed=point == "after-manifest")


def test_negative_control_no_crash(tmp_path: pathlib.Path, base: tuple[pathlib.Path, str]) -> None:
    src, earlier = base
    path = tmp_path / "r"
    shutil.copytree(src, path)
    run = run_writer(path, 2, None)
    assert run.returncode == 0, run.stderr
    check_after_crash(path, earlier, committed=True)


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_at_random_instants(
    tmp_path: pathlib.Path, base: tuple[pathlib.Path, str], seed: int
) -> None:
    src, earlier = base
    path = tmp_path / "r"
    shutil.copytree(src, path)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    env.pop("VMARCHIVE_CRASH_AT", None)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), str(path), "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Kill once it has started storing (a lock exists), after a random extra delay.
        deadline = time.monotonic() + 60
        while not list((path / "locks").glob("*")) if (path / "locks").exists() else True:
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        time.sleep(random.Random(seed).uniform(0, 0.05))
        proc.kill()
    finally:
        proc.communicate(timeout=60)
    committed = len(Repository.open(str(path)).list_archives()) == 2
    check_after_crash(path, earlier, committed=committed)


# ------------------------------------------------------------------------------ gc crashes
@pytest.fixture(scope="module")
def garbage_repo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[pathlib.Path, dict[str, dict[str, bytes]]]:
    """Archives whose chunks interleave in packs; forgetting half leaves mixed packs."""
    path = tmp_path_factory.mktemp("garbage") / "r"
    repo = make_repo(path)
    rng = random.Random(7)
    keep: dict[str, dict[str, bytes]] = {}
    streams = {n: rng.randbytes(40 * 4096) for n in ("a", "b")}
    # One stream interleaving a's and b's chunks puts both in the same packs (each stream
    # fills packs of its own); the kept archive then needs only a's chunks of them.
    mixed = b"".join(streams[n][i * 4096 : (i + 1) * 4096] for i in range(40) for n in "ab")
    dropped = write_archive(repo, {"ab": mixed})
    kept = write_archive(repo, {"a": streams["a"]}, time="2026-01-02T00:00:00Z")
    keep[kept] = {"a": streams["a"]}
    junk = write_archive(repo, {"j": rng.randbytes(30 * 4096)}, time="2026-01-03T00:00:00Z")
    other = {"o": rng.randbytes(10 * 4096) + bytes(4096)}
    keep[write_archive(repo, other, time="2026-01-04T00:00:00Z")] = other
    repo.forget([dropped, junk])
    return path, keep


GC_POINTS = [
    "gc-after-pack",
    "gc-before-index",
    "gc-after-index",
    "gc-after-index-delete",
    "gc-after-delete",
]


def run_gc(repo: pathlib.Path, crash: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    env.pop("VMARCHIVE_CRASH_AT", None)
    if crash:
        env["VMARCHIVE_CRASH_AT"] = crash
    return subprocess.run(
        [sys.executable, str(HERE / "crash_gc.py"), str(repo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("point", GC_POINTS)
def test_gc_sigkilled_at_each_step(
    tmp_path: pathlib.Path,
    garbage_repo: tuple[pathlib.Path, dict[str, dict[str, bytes]]],
    point: str,
) -> None:
    src, keep = garbage_repo
    path = tmp_path / "r"
    shutil.copytree(src, path)
    run = run_gc(path, f"{point}:1")
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stdout, run.stderr)
    for attempt in ("after the crash", "after a second gc"):
        repo = Repository.open(str(path))
        assert {a.id for a in repo.list_archives()} == set(keep), attempt
        report = repo.verify(full=True)
        assert report.ok, (attempt, report.problems)
        for aid, streams in keep.items():
            assert read_archive(repo, aid) == streams, attempt
        if attempt == "after the crash":
            again = run_gc(path, None)
            assert again.returncode == 0, again.stderr


def test_gc_without_crash_reclaims(
    tmp_path: pathlib.Path, garbage_repo: tuple[pathlib.Path, dict[str, dict[str, bytes]]]
) -> None:
    src, keep = garbage_repo
    path = tmp_path / "r"
    shutil.copytree(src, path)
    before = Repository.open(str(path)).stats().pack_bytes
    run = run_gc(path, None)
    assert run.returncode == 0, run.stderr
    assert "packs_repacked=0" not in run.stdout  # the fixture does produce mixed packs
    repo = Repository.open(str(path))
    assert repo.stats().pack_bytes < before
    for aid, streams in keep.items():
        assert read_archive(repo, aid) == streams


def test_concurrent_writer_processes(
    tmp_path: pathlib.Path, base: tuple[pathlib.Path, str]
) -> None:
    src, earlier = base
    path = tmp_path / "r"
    shutil.copytree(src, path)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    env.pop("VMARCHIVE_CRASH_AT", None)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "crash_writer.py"), str(path), str(seed)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (4, 5, 6)
    ]
    ids = {}
    for seed, p in zip((4, 5, 6), procs, strict=True):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        ids[out.strip()] = seed
    repo = Repository.open(str(path))
    assert {a.id for a in repo.list_archives()} == set(ids) | {earlier}
    assert repo.verify(full=True).ok
    for aid, seed in ids.items():
        assert read_archive(repo, aid) == content(seed)
