"""The FIFO writer of a restore (vmarchive.ops.restore_feed) and the process's malloc
thresholds (vmarchive.ops.malloc_tuning), against real pipes and a real glibc."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from vmarchive.ops.restore_feed import FifoWriter


class _Reader:
    """Reads a pipe on a thread until EOF (or ``stop``), keeping what arrived."""

    def __init__(self, fd: int, go: bool = True) -> None:
        self.fd = fd
        self.data = bytearray()
        self.go = threading.Event()
        if go:
            self.go.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.go.wait()
        while b := os.read(self.fd, 1 << 16):
            self.data += b


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    fds = {r, w}
    yield r, w
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def test_everything_arrives_in_order_and_mutable_input_is_copied(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    reader = _Reader(r)
    fw = FifoWriter(w, limit=1 << 16)
    want = bytearray()
    mutable = bytearray(b"m" * 5000)
    for i in range(300):
        piece = os.urandom(1 + (i * 7919) % 20000)
        # bytes (or a view of them as ints), a view of bytes, a bytearray the caller
        # changes right after
        if i % 3 == 0 and len(piece) % 4 == 0:
            fw.write(memoryview(piece).cast("I"))  # counted in bytes, not items
        elif i % 3 == 0:
            fw.write(piece)
        elif i % 3 == 1:
            fw.write(memoryview(piece)[1:])
            piece = piece[1:]
        else:
            mutable[:] = piece
            fw.write(mutable)
            mutable[:] = b"x" * len(mutable)
        want += piece
    assert fw.write(b"") == 0
    fw.close()
    os.close(w)
    reader.thread.join(10)
    assert bytes(reader.data) == bytes(want)


def test_writes_wait_once_limit_bytes_are_queued(pipe: tuple[int, int]) -> None:
    r, w = pipe
    reader = _Reader(r, go=False)  # reads nothing until told
    fw = FifoWriter(w, limit=1 << 20)
    done = threading.Event()
    written = [0]

    def produce() -> None:
        for _ in range(64):
            fw.write(bytes(256 << 10))
            written[0] += 256 << 10
        done.set()

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    time.sleep(0.5)
    assert not done.is_set()
    # the pipe holds what the kernel takes (64 KiB - 1 MiB); the queue at most the limit
    assert written[0] <= (1 << 20) + (1 << 20) + (256 << 10)
    reader.go.set()
    assert done.wait(10)
    fw.close()
    os.close(w)
    reader.thread.join(10)
    assert len(reader.data) == 64 * (256 << 10)


def test_a_closed_reader_fails_the_next_write_or_close(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    fw = FifoWriter(w)
    fw.write(b"lost")
    with pytest.raises(BrokenPipeError):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            fw.write(b"more")
            time.sleep(0.01)
    with pytest.raises(BrokenPipeError):
        fw.close()
    assert fw.join(5)


def test_abort_drops_the_queue_and_ends_after_the_current_write(pipe: tuple[int, int]) -> None:
    r, w = pipe
    fw = FifoWriter(w, limit=64 << 20)
    fw.write(bytes(1 << 20))  # more than the pipe takes: the thread blocks in writev
    time.sleep(0.2)
    for _ in range(15):
        fw.write(bytes(1 << 20))  # queued behind it
    fw.abort()
    assert not fw.join(0.2)  # still in its write: nobody reads
    with pytest.raises(BrokenPipeError):
        fw.write(b"after abort")
    os.set_blocking(r, False)
    got = 0
    deadline = time.monotonic() + 10
    while not fw.join(0.01) and time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):  # reading ends the write in progress
            got += len(os.read(r, 1 << 20))
    assert fw.join(0)
    with contextlib.suppress(BlockingIOError):
        got += len(os.read(r, 1 << 20))
    assert got <= 1 << 20  # the rest of the queue was dropped, never written


def test_partial_writes_resume_inside_an_item(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev(2) may write less than asked (a signal): the rest of a half-written
    buffer goes next, nothing twice."""
    real = os.writev
    calls = [0]

    def short_writev(fd: int, buffers: list[bytes | memoryview]) -> int:
        calls[0] += 1
        if calls[0] > 200:  # 15000 bytes need 20: the writer is going round in circles
            raise OSError("too many writes")
        return real(fd, [memoryview(buffers[0])[:777]])

    monkeypatch.setattr(os, "writev", short_writev)  # restore_feed.os
    r, w = pipe
    reader = _Reader(r)
    fw = FifoWriter(w)
    want = b"".join(os.urandom(3000) for _ in range(5))
    for k in range(0, len(want), 3000):
        fw.write(want[k : k + 3000])
    fw.close()
    os.close(w)
    reader.thread.join(10)
    assert bytes(reader.data) == want
    assert calls[0] >= len(want) // 777


_FAULTS = """
import resource, sys, threading
from vmarchive.ops.malloc_tuning import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
faults = []
def work():
    for _ in range(4):
        keep = [bytearray(2 << 20) for _ in range(8)]
        del keep
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt)
t = threading.Thread(target=work); t.start(); t.join()
print(faults[-1] - faults[0])  # the rounds after the first
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_freed_buffers_are_reused_without_new_page_faults() -> None:
    """16 MiB allocated and freed again and again on a thread: with the thresholds raised
    the rounds after the first fault in (almost) nothing; with glibc's defaults (the
    control) every round gets fresh, zeroed pages from the kernel."""
    tuned, default = _faults("tuned"), _faults("default")
    assert tuned < 500
    assert default > 4000
