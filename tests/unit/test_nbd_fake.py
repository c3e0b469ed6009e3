"""The NBD client against a small scripted server: paths qemu-nbd does not take.

* a server without structured replies (simple replies carry the read data);
* structured replies arriving out of order and interleaved between requests;
* error chunks and simple-reply errors -> NBDError with the errno;
* a server that hangs up mid-reply.
"""

from __future__ import annotations

import pathlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from vmarchive.errors import NBDError
from vmarchive.hypervisor import nbd as N

SIZE = 1 << 20
DATA = bytes((i * 7) & 0xFF for i in range(SIZE))


def _recv(c: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        k = c.recv(n - len(b))
        if not k:
            raise EOFError
        b += k
    return b


def _opt_reply(c: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
    c.sendall(struct.pack(">QIII", N.OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data)


Handler = Callable[[socket.socket, list[tuple[int, int, int, int]]], None]


class FakeServer:
    """Handshake per the options given, then hands batches of requests to ``handler``."""

    def __init__(self, path: str, *, structured: bool, handler: Handler, batch: int = 1) -> None:
        self.path = path
        self.structured = structured
        self.handler = handler
        self.batch = batch
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        try:
            conn.sendall(
                struct.pack(
                    ">QQH", N.NBDMAGIC, N.IHAVEOPT, N.FLAG_FIXED_NEWSTYLE | N.FLAG_NO_ZEROES
                )
            )
            _recv(conn, 4)
            while True:
                _, opt, length = struct.unpack(">QII", _recv(conn, 16))
                body = _recv(conn, length)
                if opt == N.OPT_STRUCTURED_REPLY:
                    _opt_reply(conn, opt, N.REP_ACK if self.structured else N.REP_ERR_BIT | 1)
                elif opt == N.OPT_SET_META_CONTEXT:
                    _opt_reply(
                        conn, opt, N.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation"
                    )
                    _opt_reply(conn, opt, N.REP_ACK)
                elif opt == N.OPT_GO:
                    assert body[4 : 4 + struct.unpack(">I", body[:4])[0]] == b"e"
                    _opt_reply(
                        conn, opt, N.REP_INFO, struct.pack(">HQH", N.INFO_EXPORT, SIZE, 1 | 2)
                    )
                    _opt_reply(conn, opt, N.REP_ACK)
                    break
            while True:
                reqs = []
                for _ in range(self.batch):
                    magic, _fl, kind, handle, off, n = struct.unpack(">IHHQQI", _recv(conn, 28))
                    assert magic == N.REQUEST_MAGIC
                    if kind == N.CMD_DISC:
                        return
                    reqs.append((kind, handle, off, n))
                self.handler(conn, reqs)
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def sockpath(tmp_path: pathlib.Path) -> Iterator[str]:
    yield str(tmp_path / "fake.sock")


def _chunk(flags: int, ctype: int, handle: int, payload: bytes) -> bytes:
    return (
        struct.pack(">IHHQI", N.STRUCTURED_REPLY_MAGIC, flags, ctype, handle, len(payload))
        + payload
    )


def test_simple_replies_without_structured(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        for kind, h, off, n in reqs:
            assert kind == N.CMD_READ
            err = 5 if off == 4096 else 0
            c.sendall(
                struct.pack(">IIQ", N.SIMPLE_REPLY_MAGIC, err, h)
                + (b"" if err else DATA[off : off + n])
            )

    srv = FakeServer(sockpath, structured=False, handler=handler)
    try:
        with N.NBDClient.connect(sockpath, "e", meta_contexts=()) as c:
            assert not c.structured and c.size == SIZE and c.info.read_only
            assert c.read(100, 3000) == DATA[100:3100]
            with pytest.raises(NBDError, match="EIO") as ei:
                c.read(4096, 512)
            assert ei.value.fields["errno"] == 5
            assert c.read(0, 10) == DATA[:10]
    finally:
        srv.close()
    srv = FakeServer(sockpath + "2", structured=False, handler=handler)
    try:
        with pytest.raises(NBDError, match="no structured replies"):
            N.NBDClient.connect(sockpath + "2", "e", timeout=10)  # no block status: said clearly
    finally:
        srv.close()


def test_structured_out_of_order_interleaved_and_error_chunk(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        # Answer the second request first, in two chunks interleaved with the first's.
        (_k1, h1, o1, n1), (_k2, h2, o2, n2) = reqs
        half = n2 // 2
        c.sendall(_chunk(0, N.CHUNK_OFFSET_DATA, h2, struct.pack(">Q", o2) + DATA[o2 : o2 + half]))
        if o1 == 0:
            c.sendall(_chunk(0, N.CHUNK_OFFSET_HOLE, h1, struct.pack(">QI", o1, n1 // 2)))
            tail = o1 + n1 // 2
            c.sendall(
                _chunk(
                    N.REPLY_FLAG_DONE,
                    N.CHUNK_OFFSET_DATA,
                    h1,
                    struct.pack(">Q", tail) + DATA[tail : o1 + n1],
                )
            )
        else:
            msg = b"disk on fire"
            c.sendall(
                _chunk(N.REPLY_FLAG_DONE, N.CHUNK_ERROR, h1, struct.pack(">IH", 5, len(msg)) + msg)
            )
        rest = o2 + half
        c.sendall(
            _chunk(
                N.REPLY_FLAG_DONE,
                N.CHUNK_OFFSET_DATA,
                h2,
                struct.pack(">Q", rest) + DATA[rest : o2 + n2],
            )
        )

    srv = FakeServer(sockpath, structured=True, handler=handler, batch=2)
    try:
        with N.NBDClient.connect(sockpath, "e") as c:
            got = list(c.read_many([(0, 8192), (65536, 8192)], depth=2))
            assert got[0] == (0, bytearray(4096) + DATA[4096:8192])
            assert got[1] == (65536, bytearray(DATA[65536 : 65536 + 8192]))
            with pytest.raises(NBDError, match="EIO: disk on fire"):
                list(c.read_many([(8192, 4096), (0, 4096)], depth=2))
    finally:
        srv.close()


def test_chunk_outside_request_is_refused(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        _, h, off, n = reqs[0]
        c.sendall(
            _chunk(
                N.REPLY_FLAG_DONE, N.CHUNK_OFFSET_DATA, h, struct.pack(">Q", off + n) + b"x" * 16
            )
        )

    srv = FakeServer(sockpath, structured=True, handler=handler)
    try:
        with N.NBDClient.connect(sockpath, "e") as c:
            with pytest.raises(NBDError, match="outside request"):
                c.read(0, 4096)
            with pytest.raises(NBDError, match="unusable after an earlier error"):
                c.read(0, 4096)  # the stream is out of step: refuse instead of misreading
    finally:
        srv.close()


def test_server_hangs_up_mid_reply(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        _, h, off, n = reqs[0]
        c.sendall(
            _chunk(
                N.REPLY_FLAG_DONE,
                N.CHUNK_OFFSET_DATA,
                h,
                struct.pack(">Q", off) + DATA[off : off + n],
            )[:100]
        )
        c.shutdown(socket.SHUT_RDWR)

    srv = FakeServer(sockpath, structured=True, handler=handler)
    try:
        with (
            N.NBDClient.connect(sockpath, "e") as c,
            pytest.raises(NBDError, match="closed the connection"),
        ):
            c.read(0, 4096)
    finally:
        srv.close()


def test_block_status_from_fake(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        kind, h, _off, n = reqs[0]
        assert kind == N.CMD_BLOCK_STATUS
        # describe only part of the request; the client must ask again from there
        step = min(n, 65536)
        desc = struct.pack(">II", step // 2, 0) + struct.pack(">II", step - step // 2, 3)
        c.sendall(_chunk(N.REPLY_FLAG_DONE, N.CHUNK_BLOCK_STATUS, h, struct.pack(">I", 7) + desc))

    srv = FakeServer(sockpath, structured=True, handler=handler)
    try:
        with N.NBDClient.connect(sockpath, "e") as c:
            exts = list(c.extents(offset=0, length=4 * 65536))
        assert [(e.offset, e.length, e.flags) for e in exts] == [
            (i * 32768, 32768, 0 if i % 2 == 0 else 3) for i in range(8)
        ]
    finally:
        srv.close()


class _Counting:
    """The client's socket, counting its receive and send calls."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.recvs = 0
        self.sends = 0

    def recv_into(self, *a: object) -> int:
        self.recvs += 1
        return self.sock.recv_into(*a)  # type: ignore[arg-type]

    def sendall(self, data: bytes) -> None:
        self.sends += 1
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)


def test_replies_are_received_in_few_calls_and_requests_sent_in_batches(sockpath: str) -> None:
    # Each system call costs the reading thread a GIL round trip (a capture's disk reads
    # beside its memory parser): 64 small reads must not cost four calls per reply.
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        out = b"".join(
            _chunk(
                N.REPLY_FLAG_DONE,
                N.CHUNK_OFFSET_DATA,
                h,
                struct.pack(">Q", off) + DATA[off : off + n],
            )
            for _k, h, off, n in reqs
        )
        c.sendall(out)

    srv = FakeServer(sockpath, structured=True, handler=handler, batch=4)
    try:
        with N.NBDClient.connect(sockpath, "e") as c:
            counting = _Counting(c._sock)
            c._sock = counting  # type: ignore[assignment]
            pieces = [(i * 8192, 4096) for i in range(64)]
            got = list(c.read_many(pieces, depth=8))
            assert got == [(o, bytearray(DATA[o : o + n])) for o, n in pieces]
            assert counting.sends <= 64 // 4 + 1, counting.sends  # one per refill, not per read
            assert counting.recvs <= 64 // 2, counting.recvs  # several replies per call
    finally:
        srv.close()
    srv = FakeServer(sockpath + "2", structured=True, handler=handler, batch=1)
    try:
        with N.NBDClient.connect(sockpath + "2", "e") as c:
            # payloads larger than the receive buffer arrive whole, straight into place
            big = [(4096, 300_000), (400_000, 2_000), (500_000, 500_000)]
            assert list(c.read_many(big, depth=3)) == [
                (o, bytearray(DATA[o : o + n])) for o, n in big
            ]
    finally:
        srv.close()


def test_a_server_that_stops_answering_times_out(sockpath: str) -> None:
    def handler(c: socket.socket, reqs: list[tuple[int, int, int, int]]) -> None:
        pass  # never answers

    srv = FakeServer(sockpath, structured=True, handler=handler)
    try:
        with (
            N.NBDClient.connect(sockpath, "e", timeout=0.3) as c,
            pytest.raises(NBDError, match="receive failed"),
        ):
            c.read(0, 4096)
    finally:
        srv.close()
