"""The restore's stream tail gate and direct qcow2 layout (vmarchive.ops.restore), pure.

The gate is what keeps QEMU from completing the incoming migration (and running the guest)
before the disks are rebuilt: it must withhold at least the stream's EOF marker until the
barrier passes, and never write it when the barrier fails.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmarchive.errors import StreamError
from vmarchive.ops.restore import _DiskFile, _TailGate
from vmarchive.store import StreamInfo


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        self.data += b
        return len(b)


def feed(gate: _TailGate, pieces: list[bytes]) -> None:
    buf = bytearray()  # like the regenerator: one buffer, reused after every write
    for p in pieces:
        buf[:] = p
        gate.write(buf)
        buf[:] = b"\xee" * len(buf)  # a gate that kept a reference would now hold garbage


@given(
    pieces=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=30),
    hold=st.integers(min_value=1, max_value=400),
)
def test_gate_withholds_the_tail_until_the_barrier(pieces: list[bytes], hold: int) -> None:
    sink = Sink()
    passed: list[int] = []
    gate = _TailGate(sink, hold, lambda: passed.append(len(sink.data)))
    feed(gate, pieces)
    whole = b"".join(pieces)
    # Before the barrier: a prefix, and at least `hold` bytes (all, if shorter) withheld.
    assert whole.startswith(bytes(sink.data))
    assert len(sink.data) == max(0, len(whole) - hold)
    assert passed == []
    gate.release()
    assert passed == [max(0, len(whole) - hold)]
    assert bytes(sink.data) == whole


def test_failed_barrier_never_writes_the_tail() -> None:
    sink = Sink()
    stream = b"\x01" * 5000 + b"\x07" + b"\x06" + struct.pack(">I", 20) + b"v" * 20

    def fail() -> None:
        raise StreamError("a disk was not rebuilt")

    gate = _TailGate(sink, 20 + 6, fail)
    feed(gate, [stream[i : i + 700] for i in range(0, len(stream), 700)])
    with pytest.raises(StreamError):
        gate.release()
    assert b"\x07" not in sink.data  # the EOF marker never reached QEMU
    # Negative control: with a passing barrier the EOF marker is written.
    ok = Sink()
    gate = _TailGate(ok, 20 + 6, lambda: None)
    feed(gate, [stream[i : i + 700] for i in range(0, len(stream), 700)])
    gate.release()
    assert bytes(ok.data) == stream


def test_gate_without_a_known_tail_waits_before_the_first_byte() -> None:
    sink = Sink()
    order: list[str] = []
    gate = _TailGate(sink, None, lambda: order.append(f"barrier at {len(sink.data)}"))
    gate.write(b"abc")
    gate.write(b"def")
    gate.release()
    assert order == ["barrier at 0"]
    assert bytes(sink.data) == b"abcdef"


# --- a qcow2 image written in place, read back by qemu-img --------------------------------


def _stream(size: int, chunk: int, data_slots: set[int]) -> StreamInfo:
    table = b"".join(
        (i + 1).to_bytes(16, "big") if i in data_slots else bytes(16)
        for i in range(-(-size // chunk))
    )
    return StreamInfo(
        name="disk:vda", kind="disk", size=size, chunk_size=chunk, attrs={}, table=table
    )


@pytest.mark.parametrize("chunk", [256 << 10, 96 << 10])  # aligned and not cluster-aligned
def test_disk_file_qcow2_reads_back_as_the_stream(tmp_path: Path, chunk: int) -> None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img not installed")
    size = (512 << 20) + (9 << 20) + 7 * 512  # spans two L2 tables, odd tail
    slots = {0, 3, 4, 2047, 2048, 2060, -(-size // chunk) - 1}
    s = _stream(size, chunk, slots)
    want = tmp_path / "want.raw"
    extents = []
    with want.open("wb") as w:
        w.truncate(size)
        for i in range(s.slots):
            off, length = i * chunk, min(chunk, size - i * chunk)
            data = os.urandom(length) if i in slots else None
            if data is not None:
                w.seek(off)
                w.write(data)
            extents.append((off, length, data))
    image = tmp_path / "d.qcow2"
    f = _DiskFile(image, "qcow2", s, bytes(16))
    f.create()
    try:
        # Out of order: the structure is complete before any data, any fill order works.
        n = f.fill(iter(reversed(extents)), None, lambda: False, lambda _n: None)
    finally:
        f.close()
    assert n == sum(length for _o, length, d in extents if d is not None)
    check = subprocess.run([qemu_img, "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def same() -> bool:
        cmd = [qemu_img, "compare", "-q", "-f", "raw", "-F", "qcow2", str(want), str(image)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    assert same()
    # Negative control: one byte off in the last data slot is seen.
    with want.open("r+b") as img:
        img.seek(size - 1)
        last = img.read(1)
        img.seek(size - 1)
        img.write(bytes([last[0] ^ 1]))
    assert not same()


def test_stream_hold_ends_inside_the_ram_section() -> None:
    """The gate withholds the device part exactly plus RAM_TAIL_HOLD bytes of RAM: a cut
    there fails QEMU's incoming migration cleanly (after the RAM section it could hang)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import test_migstream as tm

    from vmarchive.format import migstream as ms
    from vmarchive.ops.restore import RAM_TAIL_HOLD, _Plan, _stream_hold

    layout, rec = tm.parse(tm.sample().build())
    stream = tm.regen(layout, rec)
    assert layout.records
    hold = _stream_hold(_Plan(None, "", "", [], layout, None))  # type: ignore[arg-type]
    assert hold is not None
    device_part = hold - RAM_TAIL_HOLD
    assert 0 < device_part < len(stream)
    ram = layout.ram
    assert ram is not None
    first = layout.records[0]
    before, after = stream[:-device_part], stream[-device_part:]
    # before the device part: the RAM section's footer; then the first device header
    assert before.endswith(bytes([ms.SEC_FOOTER]) + struct.pack(">I", ram.section_id))
    assert after[0] == first.section_type
    assert after[1:5] == struct.pack(">I", first.section_id)
    assert after[6 : 6 + len(first.idstr)] == first.idstr.encode()
    assert after.endswith(layout.vmdesc)
    # negative control: one byte more would start in the RAM footer, not at a header
    assert stream[-(device_part + 1)] != first.section_type
