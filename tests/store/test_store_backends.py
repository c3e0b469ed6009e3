"""Runs the backend contract against every backend we ship."""

from __future__ import annotations

import os
import pathlib

import pytest
from backend_contract import BackendContract

from vmarchive.errors import BackendError, RepositoryError
from vmarchive.store.backend import Backend, open_backend
from vmarchive.store.faulty import Fault, FaultyBackend, InjectedFault
from vmarchive.store.local import LocalBackend


class TestLocalBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: pathlib.Path) -> Backend:
        return LocalBackend(str(tmp_path / "repo"))


class TestFaultyBackendWithoutFaults(BackendContract):
    """The wrapper is transparent when no fault is armed."""

    @pytest.fixture
    def backend(self, tmp_path: pathlib.Path) -> Backend:
        return FaultyBackend(LocalBackend(str(tmp_path / "repo")))


def test_open_backend_path_and_schemes(tmp_path: pathlib.Path) -> None:
    b = open_backend(str(tmp_path))
    assert isinstance(b, LocalBackend)
    assert isinstance(open_backend(f"file://{tmp_path}"), LocalBackend)
    with pytest.raises(RepositoryError, match="scheme"):
        open_backend("ftp://host/x")


def test_local_put_leaves_no_temporaries_and_cleans_crash_leftovers(tmp_path: pathlib.Path) -> None:
    b = LocalBackend(str(tmp_path))
    b.put("data/00/x", b"abc")
    b.put("data/00/x", b"abc", create_only=True)
    assert sorted(os.listdir(tmp_path / "data" / "00")) == ["x"]
    # A crashed writer leaves a temporary: never listed, removed by clean_temporaries.
    (tmp_path / "data" / "00" / ".tmp-dead").write_bytes(b"partial")
    assert [i.key for i in b.list("")] == ["data/00/x"]
    assert b.clean_temporaries(older_than=3600) == 0
    assert b.clean_temporaries(older_than=0) == 1
    assert sorted(os.listdir(tmp_path / "data" / "00")) == ["x"]


def test_local_put_for_read_back_keeps_the_pages_cached(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large objects go around the page cache (O_DIRECT), except those put for read-back:
    the round trip that reads them at once would find them on the device."""
    from vmarchive.store import local

    direct: list[str] = []
    real = local._write_direct

    def recording(tmp: str, data: bytes | memoryview) -> bool:
        direct.append(tmp)
        return real(tmp, data)

    monkeypatch.setattr(local, "_write_direct", recording)
    b = LocalBackend(str(tmp_path))
    big = os.urandom(local._DIRECT_MIN + 4096)
    b.put("data/00/plain", big, create_only=True)
    assert len(direct) == 1  # the negative control: a plain put of this size goes direct
    assert b.put_for_read_back("data/00/kept", big, create_only=True) is True
    assert len(direct) == 1
    assert b.get("data/00/kept") == big == b.get("data/00/plain")
    assert sorted(os.listdir(tmp_path / "data" / "00")) == ["kept", "plain"]


def _resident_pages(path: pathlib.Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) of a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        finally:
            del anchor  # the mapping cannot close while exported
        assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def _on_tmpfs(path: pathlib.Path) -> bool:
    """Whether ``path`` lies on a tmpfs (whose pages are the file: never dropped)."""
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
                best, fstype = mnt, typ
    return fstype == "tmpfs"


def test_local_done_reading_back_drops_the_cached_pages(tmp_path: pathlib.Path) -> None:
    """A pack put for read-back is cached (the control), and no longer once the reader
    says it is done with it: a capture's memory packs do not linger in the host's cache."""
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs: the page cache is the file")
    b = LocalBackend(str(tmp_path))
    data = os.urandom(4 << 20)
    b.put_for_read_back("data/00/p", data, create_only=True)
    path = tmp_path / "data" / "00" / "p"
    pages = len(data) // 4096
    assert _resident_pages(path) > pages // 2
    assert b.get_range("data/00/p", 4096, 8) == data[4096:4104]
    b.done_reading_back(["data/00/p", "data/00/missing"])  # a missing object: no error
    assert _resident_pages(path) < pages // 8
    assert b.get("data/00/p") == data


def test_local_write_error_is_a_backend_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "data").write_bytes(b"a file where a directory should be")
    b = LocalBackend(str(tmp_path))
    with pytest.raises(BackendError):
        b.put("data/00/x", b"abc")


def test_faulty_error_before_put_writes_nothing(tmp_path: pathlib.Path) -> None:
    inner = LocalBackend(str(tmp_path))
    b = FaultyBackend(inner, [Fault("put", "data/", skip=1)])
    b.put("data/a", b"1")
    with pytest.raises(InjectedFault):
        b.put("data/b", b"2")
    assert not inner.exists("data/b")
    b.put("data/c", b"3")  # fault fired once only
    assert inner.exists("data/c")
    assert ("put", "data/b") in b.calls


def test_faulty_error_after_put_publishes(tmp_path: pathlib.Path) -> None:
    inner = LocalBackend(str(tmp_path))
    b = FaultyBackend(inner, [Fault("put", mode="error_after")])
    with pytest.raises(InjectedFault):
        b.put("x", b"1")
    assert inner.get("x") == b"1"


def test_faulty_damaged_reads(tmp_path: pathlib.Path) -> None:
    inner = LocalBackend(str(tmp_path))
    inner.put("x", b"abcdefgh")
    b = FaultyBackend(inner, [Fault("get", mode="corrupt"), Fault("get_range", mode="truncate")])
    assert b.get("x") != b"abcdefgh"
    assert b.get("x") == b"abcdefgh"
    assert b.get_range("x", 0, 8) == b"abcd"
    b.add(Fault("list", mode="error", times=-1))
    for _ in range(2):
        with pytest.raises(InjectedFault):
            list(b.list(""))
