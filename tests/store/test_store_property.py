"""Property: any sequence of writes, forgets and gcs keeps every remaining archive
byte-exact and the repository clean under a full verify."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storehelpers import CHUNK, PASSPHRASE, make_repo, read_archive, write_archive

from vmarchive.store import GcOptions, Repository

# A small pool of blocks so that archives share chunks (dedup) and have holes.
_rng = random.Random(1234)
POOL = [_rng.randbytes(CHUNK) for _ in range(6)] + [bytes(CHUNK)]

stream_data = st.builds(
    lambda idx, tail: b"".join(POOL[i] for i in idx) + POOL[0][:tail],
    st.lists(st.integers(0, len(POOL) - 1), max_size=24),
    st.integers(0, CHUNK - 1),
)
write_op = st.tuples(
    st.just("write"), st.dictionaries(st.sampled_from(["a", "b/c", "d"]), stream_data, max_size=3)
)
forget_op = st.tuples(st.just("forget"), st.integers(0, 1000))
gc_op = st.tuples(st.just("gc"), st.floats(0, 1))


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(st.one_of(write_op, forget_op, gc_op), min_size=1, max_size=12),
    encrypted=st.booleans(),
)
def test_writes_forgets_and_gcs_preserve_every_archive(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, object]], encrypted: bool
) -> None:
    path = tmp_path_factory.mktemp("prop") / "r"
    repo = make_repo(path, encrypted=encrypted)
    secret = PASSPHRASE if encrypted else None
    model: dict[str, dict[str, bytes]] = {}
    for i, (op, arg) in enumerate(ops):
        if op == "write":
            assert isinstance(arg, dict)
            aid = write_archive(repo, arg, time=f"2026-01-01T00:{i:02d}:00Z", domain=f"vm{i % 2}")
            model[aid] = arg
        elif op == "forget" and model:
            assert isinstance(arg, int)
            victim = sorted(model)[arg % len(model)]
            repo.forget([victim])
            del model[victim]
        elif op == "gc":
            assert isinstance(arg, float)
            repo.gc(GcOptions(grace=0, repack_below=arg))
        fresh = Repository.open(str(path), secret)
        assert {a.id for a in fresh.list_archives()} == set(model)
    fresh = Repository.open(str(path), secret)
    report = fresh.verify(full=True)
    assert report.ok, report.problems
    for aid, streams in model.items():
        assert read_archive(fresh, aid) == streams
