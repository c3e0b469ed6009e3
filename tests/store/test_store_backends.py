"""Runs the backend contract against every backend we ship."""

from __future__ import annotations

import os
import pathlib

import pytest
from backend_contract import BackendContract

from vmarchive.errors import BackendError, RepositoryError
from vmarchive.store.backend import Backend, ObjectNotFoundError, open_backend
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


def _direct_io_refused(path: pathlib.Path) -> bool:
    """Whether the file system under ``path`` refuses O_DIRECT (the backend then reads
    and writes through the page cache)."""
    probe = path / "direct-probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return True
    finally:
        probe.unlink(missing_ok=True)
    return False


def test_local_read_back_goes_around_the_page_cache(tmp_path: pathlib.Path) -> None:
    """An object put for read-back is written and read back with O_DIRECT (none of its
    pages cached), until the reader is done with it; the control: the same object read
    after that, like any other, fills the cache."""
    if _on_tmpfs(tmp_path):
        pytest.skip("tmpfs: the page cache is the file")
    if _direct_io_refused(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    b = LocalBackend(str(tmp_path))
    data = os.urandom(4 << 20)
    b.put_for_read_back("data/00/p", data, create_only=True)
    path = tmp_path / "data" / "00" / "p"
    pages = len(data) // 4096
    assert _resident_pages(path) < pages // 8
    assert b.get_range("data/00/p", 4096, 1 << 20) == data[4096 : 4096 + (1 << 20)]
    assert _resident_pages(path) < pages // 8
    b.done_reading_back(["data/00/p", "data/00/missing"])  # a missing object: no error
    assert b.get_range("data/00/p", 0, len(data)) == data
    assert _resident_pages(path) > pages // 2


def test_local_read_back_ranges_are_exact(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges of an object put for read-back, read with O_DIRECT from aligned blocks:
    unaligned starts and ends, past the end, empty, a missing object; each read direct
    (the control: a plain object of the same size is read through the cache)."""
    from vmarchive.store import local

    direct: list[tuple[int, int]] = []
    real = local._read_direct

    def recording(path: str, offset: int, length: int) -> bytes | None:
        direct.append((offset, length))
        return real(path, offset, length)

    monkeypatch.setattr(local, "_read_direct", recording)
    b = LocalBackend(str(tmp_path))
    data = os.urandom((2 << 20) + 4096 * 3 + 1234)  # the last block is short
    b.put("data/00/plain", data)
    assert b.get_range("data/00/plain", 5, 10) == data[5:15]
    assert direct == []
    b.put_for_read_back("data/00/p", data)
    n = len(data)
    cases = [(0, n), (1, 4095), (4095, 2), (4096, 4096), (n - 1234, 1234), (n - 5, 100),
             (n - 4096 - 7, 4096 + 7), (n, 10), (n + 5000, 10), (777, 1 << 20), (3, 0)]  # fmt: skip
    for offset, length in cases:
        assert b.get_range("data/00/p", offset, length) == data[offset : offset + length]
    assert len(direct) == len(cases) - 1  # the empty range is no read
    with pytest.raises(ObjectNotFoundError):
        b.get_range("data/00/gone", 0, 10)
    b.put_for_read_back("data/00/gone", b"x" * 10)
    os.unlink(tmp_path / "data" / "00" / "gone")
    with pytest.raises(ObjectNotFoundError):
        b.get_range("data/00/gone", 0, 10)


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


def test_local_put_writes_a_mapped_pack_from_its_own_pages(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object in a page-aligned mapping (a pack as PackBuilder builds it) is written
    with O_DIRECT from there: only its last partial block goes through the scratch
    buffer.  Controls: the same bytes as ``bytes``, and a view that starts one byte into
    a mapping (unaligned: the kernel refuses it in place), are copied whole -- and every
    object reads back as it was."""
    import mmap

    from vmarchive.store import local

    if _direct_io_refused(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    scratch: list[int] = []
    real = local._aligned_buffer

    def recording(n: int) -> mmap.mmap:
        scratch.append(n)
        return real(n)

    monkeypatch.setattr(local, "_aligned_buffer", recording)
    b = LocalBackend(str(tmp_path))
    n = (3 << 20) + 123
    data = os.urandom(n)
    m = mmap.mmap(-1, n + 4096)
    m[: n + 1] = data + b"!"
    cases: list[tuple[str, bytes | memoryview, int]] = [
        ("mapped", memoryview(m)[:n].toreadonly(), 4096),
        ("bytes", data, n + 4096 - 123),
        ("unaligned", memoryview(m)[1 : n + 1], n + 4096 - 123),
    ]
    for name, obj, copied in cases:
        scratch.clear()
        b.put(f"data/00/{name}", obj)
        assert scratch[-1] == copied, name
        assert b.get(f"data/00/{name}") == bytes(obj), name
