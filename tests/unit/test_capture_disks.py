"""The disk readers of :mod:`vmarchive.ops.capture_disks` against qemu-nbd serving a known
image.

``read_disk``: every chunk size must give the same stream (the image's bytes, holes left
out), each slot written once with its exact length, and no NBD read request longer than
:data:`~vmarchive.ops.capture_disks.REQUEST`: chunks smaller than a request are read
several to a request, larger ones by several requests.  ``read_pieces`` (what an
incremental reads): pieces of any length, whole, once each, in order.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

from vmarchive.hypervisor.nbd import CMD_READ, NBDClient
from vmarchive.ops import capture_disks as CD
from vmarchive.progress import NULL_PROGRESS

KiB, MiB = 1024, 1024 * 1024
SIZE = 9 * MiB + 20 * KiB  # not a multiple of the chunk sizes below: a short last slot
#: (offset, length, byte) written into the image; the rest is never written (holes)
WRITES = [
    (0, 300 * KiB, 0x11),
    (1 * MiB + 4 * KiB, 8 * KiB, 0x22),
    (5 * MiB, 3 * MiB, 0x33),
    (SIZE - 20 * KiB, 20 * KiB, 0x44),
]

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
    reason="qemu-utils not installed",
)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    img = tmp_path_factory.mktemp("disks") / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(SIZE)], check=True)
    cmds = [a for off, n, b in WRITES for a in ("-c", f"write -P {b:#x} {off} {n}")]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(img)], check=True, capture_output=True)
    return img


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every NBD read request sent while the test runs."""
    lengths: list[int] = []
    queue = NBDClient._queue

    def recording(self: NBDClient, kind: int, offset: int, length: int, flags: int = 0) -> int:
        if kind == CMD_READ:
            lengths.append(length)
        return queue(self, kind, offset, length, flags)

    monkeypatch.setattr(NBDClient, "_queue", recording)
    return lengths


class Sink:
    """Keeps what it is handed over as it is (the store keeps such buffers without a
    copy): a reader that wrote into a buffer again would change a slot already stored."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.slots: dict[int, bytes | bytearray | memoryview] = {}
        self.copied = 0

    def write_chunk(
        self, index: int, data: bytes | bytearray | memoryview, *, handed_over: bool = False
    ) -> None:
        assert index not in self.slots, f"slot {index} written twice"
        assert len(data) == min(self.chunk_size, SIZE - index * self.chunk_size), index
        self.slots[index] = data if handed_over else bytes(data)
        self.copied += not handed_over


def expected() -> bytes:
    b = bytearray(SIZE)
    for off, n, byte in WRITES:
        b[off : off + n] = bytes([byte]) * n
    return bytes(b)


@pytest.mark.parametrize("chunk_size", [4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB])
def test_every_chunk_size_reads_the_image_in_requests_of_at_most_256k(
    image: pathlib.Path, chunk_size: int, requests: list[int]
) -> None:
    sink = Sink(chunk_size)
    with CD.local_nbd(str(image), "qcow2") as sock:
        res = CD.read_disk(sock, "disk", sink, "vda", NULL_PROGRESS)
    stream = bytearray(SIZE)
    for i, data in sink.slots.items():
        stream[i * chunk_size : i * chunk_size + len(data)] = data
    assert bytes(stream) == expected()  # every buffer handed over still holds its slot
    assert sink.copied == 0
    assert res.bytes_read == sum(len(d) for d in sink.slots.values())
    if chunk_size <= MiB:  # (every 4 MiB slot has data)
        assert res.bytes_read < SIZE  # slots with no data in the image are not read
    assert max(requests) <= CD.REQUEST
    if chunk_size < CD.REQUEST:
        # several chunks to a request where the data runs on (the 3 MiB write)
        assert max(requests) > chunk_size
    assert len(requests) >= res.bytes_read // CD.REQUEST


def test_read_pieces_reads_pieces_of_any_length_in_order(
    image: pathlib.Path, requests: list[int]
) -> None:
    """What an incremental reads: dirty runs and whole slots, in slot order; a piece
    longer than a request is read by several, each piece comes whole and once."""
    pieces = [(0, 4 * KiB), (64 * KiB, 600 * KiB), (1 * MiB, 64 * KiB), (5 * MiB, 4 * MiB)]
    pieces.append((SIZE - 20 * KiB, 20 * KiB))
    want = expected()
    with CD.local_nbd(str(image), "qcow2") as sock, NBDClient.connect(sock, "disk") as c:
        got = [(off, bytes(view)) for off, view in CD.read_pieces(c, pieces)]
        with pytest.raises(ValueError):
            list(CD.read_pieces(c, [(0, 0)]))
    assert got == [(off, want[off : off + n]) for off, n in pieces]
    assert max(requests) == CD.REQUEST
    assert len(requests) == 1 + 3 + 1 + 16 + 1
