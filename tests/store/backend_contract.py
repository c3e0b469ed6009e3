"""The contract every storage backend must pass (local now, S3 later).

A backend test module subclasses :class:`BackendContract` and provides a ``backend``
fixture returning a fresh, empty backend.  Nothing here knows which backend it tests.
"""

from __future__ import annotations

import threading
import time

import pytest

from vmarchive.store.backend import Backend, ObjectNotFoundError


class BackendContract:
    """Behaviour the repository relies on; see ``vmarchive/store/backend.py``."""

    def test_put_get_roundtrip(self, backend: Backend) -> None:
        assert backend.put("config", b"hello") is True
        assert backend.get("config") == b"hello"

    def test_empty_object(self, backend: Backend) -> None:
        backend.put("a/empty", b"")
        assert backend.get("a/empty") == b""
        assert backend.stat("a/empty").size == 0

    def test_memoryview_and_large_object(self, backend: Backend) -> None:
        data = bytes(range(256)) * (3 * 4096 + 7)
        backend.put("data/ab/big", memoryview(data))
        assert backend.get("data/ab/big") == data
        assert backend.stat("data/ab/big").size == len(data)

    def test_put_for_read_back_publishes_as_put_does(self, backend: Backend) -> None:
        data = bytes(range(256)) * (8 * 4096 + 3)  # past the local backend's O_DIRECT size
        assert backend.put_for_read_back("data/cd/p", data, create_only=True) is True
        assert backend.put_for_read_back("data/cd/p", b"other", create_only=True) is False
        assert backend.get("data/cd/p") == data
        assert backend.get_range("data/cd/p", 5000, 7) == data[5000:5007]
        assert [i.key for i in backend.list("data/")] == ["data/cd/p"]

    def test_get_missing_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(ObjectNotFoundError):
            backend.get("nope")
        with pytest.raises(ObjectNotFoundError):
            backend.get_range("nope", 0, 1)
        with pytest.raises(ObjectNotFoundError):
            backend.stat("dir/nope")
        assert backend.exists("nope") is False

    def test_put_replaces_by_default(self, backend: Backend) -> None:
        backend.put("locks/x", b"one")
        assert backend.put("locks/x", b"two") is True
        assert backend.get("locks/x") == b"two"

    def test_create_only_never_replaces(self, backend: Backend) -> None:
        assert backend.put("data/00/p", b"first", create_only=True) is True
        assert backend.put("data/00/p", b"second", create_only=True) is False
        assert backend.get("data/00/p") == b"first"
        assert [i.key for i in backend.list("data/")] == ["data/00/p"]

    def test_create_only_race_has_one_winner(self, backend: Backend) -> None:
        results: list[tuple[int, bool]] = []
        barrier = threading.Barrier(8)

        def racer(i: int) -> None:
            barrier.wait()
            results.append((i, backend.put("archives/race", b"%d" % i, create_only=True)))

        threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, created in results if created]
        assert len(winners) == 1
        assert backend.get("archives/race") == b"%d" % winners[0]

    def test_get_range(self, backend: Backend) -> None:
        backend.put("obj", b"0123456789")
        assert backend.get_range("obj", 2, 3) == b"234"
        assert backend.get_range("obj", 8, 100) == b"89"
        assert backend.get_range("obj", 10, 5) == b""
        assert backend.get_range("obj", 0, 0) == b""
        with pytest.raises(ValueError):
            backend.get_range("obj", -1, 2)

    def test_list_by_prefix(self, backend: Backend) -> None:
        keys = ["data/00/aa", "data/01/bb", "index/cc", "archives/dd", "config", "datab"]
        for k in keys:
            backend.put(k, k.encode())
        assert sorted(i.key for i in backend.list("data/")) == ["data/00/aa", "data/01/bb"]
        assert sorted(i.key for i in backend.list("data")) == ["data/00/aa", "data/01/bb", "datab"]
        assert sorted(i.key for i in backend.list("data/01/")) == ["data/01/bb"]
        assert sorted(i.key for i in backend.list("")) == sorted(keys)
        assert list(backend.list("missing/")) == []
        sizes = {i.key: i.size for i in backend.list("")}
        assert sizes == {k: len(k) for k in keys}

    def test_list_reports_plausible_mtime(self, backend: Backend) -> None:
        before = time.time()
        backend.put("index/x", b"x")
        (info,) = backend.list("index/")
        # Backends may have coarse clocks; a minute of slack is plenty.
        assert before - 60 <= info.mtime <= time.time() + 60
        assert abs(backend.stat("index/x").mtime - info.mtime) < 1e-3 + 1

    def test_delete(self, backend: Backend) -> None:
        backend.put("archives/a", b"a")
        backend.put("archives/b", b"b")
        backend.delete("archives/a")
        assert [i.key for i in backend.list("archives/")] == ["archives/b"]
        with pytest.raises(ObjectNotFoundError):
            backend.get("archives/a")
        backend.delete("archives/a")  # missing: not an error
        assert backend.exists("archives/b")

    @pytest.mark.parametrize(
        "key", ["", "/abs", "a//b", "../x", "a/../b", ".hidden", "a/.t", "a b"]
    )
    def test_invalid_keys_are_refused(self, backend: Backend, key: str) -> None:
        with pytest.raises(ValueError):
            backend.put(key, b"x")
