"""The NBD client against qemu-nbd (real server, known image contents).

The image has data at 1 MiB (64 KiB of 0xab) and at 10 MiB (3 MiB of 0x11), a zeroed
cluster range at 4 MiB (written with write-zeroes, so allocated-as-zero), and holes
elsewhere.  A persistent dirty bitmap ``b0`` is enabled after the first write, so only
later writes are dirty.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmarchive.errors import NBDError
from vmarchive.hypervisor.nbd import (
    BASE_ALLOCATION,
    Extent,
    NBDClient,
    data_ranges,
    dirty_bitmap_context,
)

MiB = 1024 * 1024
SIZE = 64 * MiB

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
    reason="qemu-utils not installed",
)


def _qemu_io(image: pathlib.Path, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    subprocess.run([*args, str(image)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("nbd")
    img = d / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    _qemu_io(img, "write -P 0xab 1M 64k")
    subprocess.run(["qemu-img", "bitmap", "--add", "--enable", str(img), "b0"], check=True)
    _qemu_io(img, "write -z 4M 1M", "write -P 0x11 10M 3M")
    return img


def _serve(image: pathlib.Path, sock: pathlib.Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "-r",
            "-t",
            "-e",
            "4",
            "-f",
            "qcow2",
            "-k",
            str(sock),
            "-x",
            "exp",
            *extra,
            str(image),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    for _ in range(200):
        if sock.exists():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd failed: {proc.stderr.read() if proc.stderr else b''!r}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("qemu-nbd did not create its socket")


@pytest.fixture(scope="module")
def server(image: pathlib.Path) -> Iterator[pathlib.Path]:
    sock = image.parent / "nbd.sock"
    proc = _serve(image, sock, "-B", "b0")
    try:
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def expected_bytes(offset: int, length: int) -> bytes:
    img = bytearray(SIZE)
    img[1 * MiB : 1 * MiB + 64 * 1024] = b"\xab" * (64 * 1024)
    img[10 * MiB : 13 * MiB] = b"\x11" * (3 * MiB)
    return bytes(img[offset : offset + length])


pytestmark = [pytest.mark.qemu, needs_qemu]


def test_handshake_reports_export(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        assert c.size == SIZE
        assert c.info.read_only
        assert c.structured
        assert set(c.contexts) == {BASE_ALLOCATION}


def test_reads_match_image_including_holes(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        for off, n in [
            (0, 4096),
            (MiB - 100, 200),
            (MiB, 64 * 1024),
            (9 * MiB, 5 * MiB),
            (0, SIZE),
        ]:
            assert c.read(off, n, request_size=MiB) == expected_bytes(off, n), (off, n)


def test_hole_chunks_reported_only_for_holes(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        buf = bytearray(b"\xff" * MiB)  # stale content must be overwritten by zeros
        holes = c.read_into(20 * MiB, buf)
        assert holes and buf == bytes(MiB)
        data = bytearray(MiB)
        assert c.read_into(10 * MiB, data) == []  # negative control: all data, no holes
        assert data == b"\x11" * MiB


def test_block_status_extents(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        exts = list(c.extents())
    assert exts[0].offset == 0 and exts[-1].end == SIZE
    assert all(a.end == b.offset for a, b in itertools.pairwise(exts))
    data = [(e.offset, e.length) for e in exts if not e.zero]
    assert data == [(MiB, 64 * 1024), (10 * MiB, 3 * MiB)]
    zero_at_4m = next(e for e in exts if e.offset <= 4 * MiB < e.end)
    assert zero_at_4m.zero  # allocated but written as zeroes: still never read
    assert data_ranges(exts, MiB) == [(MiB, MiB), (10 * MiB, 3 * MiB)]


def test_extents_of_subrange_are_clipped(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        exts = list(c.extents(offset=MiB + 4096, length=11 * MiB))
    assert exts[0].offset == MiB + 4096 and exts[-1].end == 12 * MiB + 4096
    assert [(e.offset, e.end) for e in exts if not e.zero] == [
        (MiB + 4096, MiB + 65536),
        (10 * MiB, 12 * MiB + 4096),
    ]


def test_dirty_bitmap_context(server: pathlib.Path) -> None:
    ctx = dirty_bitmap_context("b0")
    with NBDClient.connect(str(server), "exp", meta_contexts=[BASE_ALLOCATION, ctx]) as c:
        assert set(c.contexts) == {BASE_ALLOCATION, ctx}
        dirty = [(e.offset, e.length) for e in c.extents(ctx) if e.dirty]
    # written after the bitmap was enabled: dirty; the write at 1 MiB before it: clean
    assert (4 * MiB, MiB) in dirty
    assert any(o <= 10 * MiB and 13 * MiB <= o + n for o, n in dirty)
    assert not any(o <= MiB < o + n for o, n in dirty)


def test_pipelined_reads_in_order_and_early_stop(server: pathlib.Path) -> None:
    with NBDClient.connect(str(server), "exp") as c:
        ranges = list(c.split_ranges([(9 * MiB, 6 * MiB)], 512 * 1024))
        got = list(c.read_many(ranges, depth=8))
        assert [o for o, _ in got] == [o for o, _ in ranges]
        assert b"".join(d for _, d in got) == expected_bytes(9 * MiB, 6 * MiB)
        gen = c.read_many(ranges, depth=8)
        next(gen)
        gen.close()  # replies still in flight are drained ...
        assert c.read(10 * MiB, 16) == b"\x11" * 16  # ... so the connection stays usable


def test_errors_are_nbd_errors(server: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with pytest.raises(NBDError, match=r"unknown export|refused"):
        NBDClient.connect(str(server), "nope")
    with pytest.raises(NBDError, match="meta context not available"):
        NBDClient.connect(str(server), "exp", meta_contexts=[dirty_bitmap_context("nope")])
    with pytest.raises(NBDError, match="cannot connect"):
        NBDClient.connect(str(tmp_path / "missing.sock"), "exp")
    with NBDClient.connect(str(server), "exp") as c:
        with pytest.raises(NBDError, match="outside export"):
            c.read(SIZE - 10, 20)
        with pytest.raises(NBDError, match="not negotiated"):
            list(c.extents(dirty_bitmap_context("b0")))
        assert c.read(0, 1) == b"\0"  # still usable after refused requests


def test_not_an_nbd_server(tmp_path: pathlib.Path) -> None:
    import socket
    import threading

    path = str(tmp_path / "fake.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def talk() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    t = threading.Thread(target=talk)
    t.start()
    try:
        with pytest.raises(NBDError, match="not an NBD server"):
            NBDClient.connect(path, "exp")
    finally:
        t.join(5)
        srv.close()
        os.unlink(path)


# --- pure: data_ranges ----------------------------------------------------------------------

extent_lists = st.lists(st.tuples(st.integers(1, 5000), st.sampled_from([0, 1, 2, 3])), max_size=30)


@pytest.mark.parametrize("granularity", [1, 512, 4096])
@given(spec=extent_lists)
def test_data_ranges_cover_every_nonzero_byte(
    granularity: int, spec: list[tuple[int, int]]
) -> None:
    exts, pos = [], 0
    for n, f in spec:
        exts.append(Extent(pos, n, f))
        pos += n
    ranges = data_ranges(exts, granularity, size=pos)
    covered: set[int] = set()
    for o, n in ranges:
        assert o % granularity == 0 and n > 0
        assert o + n <= pos
        covered.update(range(o, o + n))
    assert all(b > a for (a, _), (b, _) in itertools.pairwise(ranges))
    for e in exts:
        if not e.zero:
            assert set(range(e.offset, e.end)) <= covered
    # and nothing is read for a slot that has no data at all
    for o, n in ranges:
        for s in range(o, o + n, granularity):
            assert any(not e.zero and e.offset < s + granularity and e.end > s for e in exts)
