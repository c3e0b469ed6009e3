"""A small, fast NBD client for reading point-in-time disk images (hypervisor layer).

vmarchive reads disks through QEMU: the capture exports a frozen or fleecing block node
over NBD and reads it here, using block status so that unallocated and zero ranges are
never transferred.  Only what that needs is implemented (protocol facts from the NBD
protocol document, ``doc/proto.md`` of the NBD project):

* fixed newstyle handshake over a unix or TCP socket, no TLS;
* ``NBD_OPT_STRUCTURED_REPLY`` (reads may come back as data and hole chunks);
* ``NBD_OPT_SET_META_CONTEXT`` for ``base:allocation`` and ``qemu:dirty-bitmap:NAME``;
* ``NBD_OPT_GO`` with the export size, transmission flags and block size constraints;
* ``NBD_CMD_READ``, ``NBD_CMD_BLOCK_STATUS`` and ``NBD_CMD_DISC``.

Several requests may be in flight (:meth:`NBDClient.read_many`); replies are matched by
handle and read with ``recv_into`` straight into the destination buffer.  One client is
used by one thread at a time; open several clients for parallel reads when the export
advertises ``can_multi_conn``.

Every failure raises :class:`vmarchive.errors.NBDError` (fields: ``export``, and where it
applies ``offset``, ``length``, ``errno``, ``option``).
"""

from __future__ import annotations

import collections
import contextlib
import errno as errno_mod
import logging
import socket
import struct
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import msgspec

from vmarchive.errors import NBDError

log = logging.getLogger(__name__)

# --- protocol constants ------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) / client flags
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 1 << 31
REP_ERRORS = {
    REP_ERR_BIT | 1: "unsupported option",
    REP_ERR_BIT | 2: "forbidden by server policy",
    REP_ERR_BIT | 3: "invalid option",
    REP_ERR_BIT | 4: "not supported on this platform",
    REP_ERR_BIT | 5: "TLS required",
    REP_ERR_BIT | 6: "unknown export",
    REP_ERR_BIT | 7: "server shutting down",
    REP_ERR_BIT | 8: "block size negotiation required",
    REP_ERR_BIT | 9: "request too big",
}

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# transmission flags
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
CMD_FLAG_REQ_ONE = 1 << 3

REPLY_FLAG_DONE = 1 << 0
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR_BIT = 1 << 15
CHUNK_ERROR = CHUNK_ERROR_BIT | 1
CHUNK_ERROR_OFFSET = CHUNK_ERROR_BIT | 2

#: base:allocation status bits
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: qemu:dirty-bitmap:NAME status bit
STATE_DIRTY = 1 << 0

BASE_ALLOCATION = "base:allocation"
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024  # what the spec lets a client assume without info
DEFAULT_REQUEST_SIZE = 2 * 1024 * 1024
#: The client's receive buffer, and the piece size from which the rest of a piece is
#: received straight into its destination instead (see NBDClient._recv_into).
RECV_BUFFER = 256 * 1024
RECV_DIRECT = 128 * 1024

# wire headers (the server in vmarchive.ops.serve writes and reads the same ones)
REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length: 28 B
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")  # magic, error, handle: 16 bytes
CHUNK_HEADER = struct.Struct(">IHHQI")  # structured reply: magic, flags, type, handle, length
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length: 16 bytes
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, type, length: 20 bytes


def dirty_bitmap_context(bitmap: str) -> str:
    """The meta context name QEMU uses for a dirty bitmap exported with the node."""
    return f"qemu:dirty-bitmap:{bitmap}"


class Extent(msgspec.Struct, frozen=True):
    """A run of bytes sharing one block-status value for one meta context.

    For ``base:allocation``: :attr:`hole` (unallocated) and :attr:`zero` (reads as zero).
    For a dirty bitmap: :attr:`dirty`.
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def hole(self) -> bool:
        return bool(self.flags & STATE_HOLE)

    @property
    def zero(self) -> bool:
        return bool(self.flags & STATE_ZERO)

    @property
    def dirty(self) -> bool:
        return bool(self.flags & STATE_DIRTY)


class ExportInfo(msgspec.Struct, frozen=True):
    """What ``NBD_OPT_GO`` told us about the export."""

    name: str
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_PAYLOAD

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TFLAG_CAN_MULTI_CONN)


@dataclass
class _Pending:
    kind: int
    offset: int
    length: int
    buf: memoryview | None = None
    done: bool = False
    error: int = 0
    message: str = ""
    holes: list[tuple[int, int]] = field(default_factory=list)
    extents: dict[int, list[Extent]] = field(default_factory=dict)


def _errno_name(code: int) -> str:
    return errno_mod.errorcode.get(code, f"error {code}")


def _kernel_timeouts(sock: socket.socket, timeout: float | None) -> None:
    """Make ``sock`` blocking with its time limit enforced by the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO) instead of Python's: a socket with a Python timeout polls before every
    receive (two GIL round trips per call, see NBDClient._recv_into) and cannot wait for a
    whole payload in one call (``MSG_WAITALL``).  A receive that times out now fails with
    EAGAIN, an OSError like Python's timeout."""
    sock.settimeout(None)
    if timeout is None:
        return
    sec = int(timeout)
    tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
    for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, opt, tv)


class NBDClient:
    """A connected NBD client for one export.  Use :meth:`connect`; close with :meth:`close`
    or a ``with`` block."""

    def __init__(
        self,
        sock: socket.socket,
        info: ExportInfo,
        contexts: dict[str, int],
        structured: bool,
    ) -> None:
        self._sock = sock
        self.info = info
        #: Negotiated meta contexts: name -> server's context id.
        self.contexts = contexts
        self.structured = structured
        self._context_names = {v: k for k, v in contexts.items()}
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1
        self._hdr = bytearray(CHUNK_HEADER.size)
        #: received bytes not yet consumed: ``_rbuf[_rstart:_rend]`` (see :meth:`_recv_into`)
        self._rbuf = bytearray(RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._out: list[bytes] = []  # requests queued, not sent yet
        self._broken = False  # protocol state lost: no more requests
        self._closed = False

    # --- connection ----------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: str | tuple[str, int],
        export: str = "",
        *,
        meta_contexts: Sequence[str] = (BASE_ALLOCATION,),
        timeout: float | None = 60.0,
    ) -> NBDClient:
        """Connect to ``address`` (a unix socket path or ``(host, port)``), negotiate and
        open ``export``.

        ``meta_contexts`` are requested with ``NBD_OPT_SET_META_CONTEXT`` (needs structured
        replies); each one must be granted.

        Raises:
            NBDError: cannot connect, not a fixed-newstyle server, unknown export, a requested
                meta context not granted, or any protocol violation.
        """
        fields = {"export": export, "address": str(address)}
        try:
            if isinstance(address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as e:
            raise NBDError(f"cannot create socket: {e}", **fields) from e
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            if not isinstance(address, str):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
            except OSError as e:
                raise NBDError(f"cannot connect to NBD server {address}: {e}", **fields) from e
            client = _Handshake(sock, export).run(meta_contexts)
            _kernel_timeouts(sock, timeout)
        except BaseException:
            sock.close()
            raise
        return client

    def close(self) -> None:
        """Send ``NBD_CMD_DISC`` and close the socket (idempotent; never raises)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._broken:
                self._sock.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            self._broken = True
            self._sock.close()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Export size in bytes."""
        return self.info.size

    # --- low level -----------------------------------------------------------------------

    def _fail(self, message: str, cause: BaseException | None = None, **fields: object) -> NBDError:
        err = NBDError(f"NBD export {self.info.name!r}: {message}", export=self.info.name, **fields)
        if cause is not None:
            err.__cause__ = cause
        return err

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view`` from the connection.

        Small pieces (reply headers, the payloads of small reads) come out of one
        receive buffer that each system call fills as far as the socket has bytes: one
        call serves several replies.  Every call releases the GIL and must take it back,
        which costs up to the interpreter's switch interval while another thread computes
        (a capture's memory parser): reading 10 MiB as 162 scattered 64 KiB pieces took
        7 ms alone and 250 ms beside a busy thread with four calls per reply.  What is
        left of a large piece is received straight into ``view``.
        """
        try:
            have = self._rend - self._rstart
            if have:
                k = min(have, len(view))
                view[:k] = self._rview[self._rstart : self._rstart + k]
                self._rstart += k
                view = view[k:]
            while view:
                if len(view) >= RECV_DIRECT:
                    n = self._sock.recv_into(view, 0, socket.MSG_WAITALL)
                    if n == 0:
                        raise self._fail("server closed the connection")
                    view = view[n:]
                    continue
                n = self._sock.recv_into(self._rbuf)
                if n == 0:
                    raise self._fail("server closed the connection")
                k = min(n, len(view))
                view[:k] = self._rview[:k]
                self._rstart, self._rend = k, n
                view = view[k:]
        except OSError as e:
            self._broken = True
            raise self._fail(f"receive failed: {e}", e) from e

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, kind: int, offset: int, length: int, flags: int = 0) -> int:
        handle = self._queue(kind, offset, length, flags)
        self._flush()
        return handle

    def _queue(self, kind: int, offset: int, length: int, flags: int = 0) -> int:
        """A request, sent with the next :meth:`_flush` (several in one system call)."""
        if self._closed or self._broken:
            raise self._fail(
                "connection is closed"
                if self._closed
                else "connection is unusable after an earlier error"
            )
        handle = self._next_handle
        self._next_handle += 1
        self._out.append(REQUEST_HEADER.pack(REQUEST_MAGIC, flags, kind, handle, offset, length))
        return handle

    def _flush(self) -> None:
        if not self._out:
            return
        data = b"".join(self._out)
        self._out.clear()
        try:
            self._sock.sendall(data)
        except OSError as e:
            self._broken = True
            raise self._fail(f"send failed: {e}", e) from e

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.info.size:
            raise self._fail(
                f"range {offset}+{length} outside export of {self.info.size} bytes",
                offset=offset,
                length=length,
            )
        if length > 0xFFFFFFFF:
            raise self._fail("request longer than 4 GiB", offset=offset, length=length)

    def _read_reply(self) -> None:
        """Read one reply (simple) or one chunk (structured) and file it under its request."""
        hdr = memoryview(self._hdr)
        self._recv_into(hdr[:4])
        (magic,) = struct.unpack_from(">I", hdr)
        if magic == SIMPLE_REPLY_MAGIC:
            self._recv_into(hdr[4 : SIMPLE_REPLY_HEADER.size])
            _, err, handle = SIMPLE_REPLY_HEADER.unpack_from(hdr)
            p = self._take(handle)
            if err:
                p.error = err
            elif p.kind == CMD_READ and p.buf is not None:
                self._recv_into(p.buf)
            p.done = True
            return
        if magic != STRUCTURED_REPLY_MAGIC or not self.structured:
            self._broken = True
            raise self._fail(f"bad reply magic {magic:#x}")
        self._recv_into(hdr[4 : CHUNK_HEADER.size])
        _, flags, ctype, handle, length = CHUNK_HEADER.unpack_from(hdr)
        p = self._take(handle)
        if ctype == CHUNK_OFFSET_DATA and p.kind == CMD_READ and p.buf is not None:
            if length < 8:
                raise self._fail("short data chunk")
            (off,) = struct.unpack(">Q", self._recv(8))
            n = length - 8
            rel = off - p.offset
            if rel < 0 or rel + n > p.length:
                self._broken = True
                raise self._fail(f"data chunk {off}+{n} outside request {p.offset}+{p.length}")
            self._recv_into(p.buf[rel : rel + n])
        elif ctype == CHUNK_OFFSET_HOLE and p.kind == CMD_READ and p.buf is not None:
            off, n = struct.unpack(">QI", self._recv(length))
            rel = off - p.offset
            if rel < 0 or rel + n > p.length:
                self._broken = True
                raise self._fail(f"hole chunk {off}+{n} outside request {p.offset}+{p.length}")
            p.buf[rel : rel + n] = bytes(n)
            p.holes.append((off, n))
        elif ctype == CHUNK_BLOCK_STATUS and p.kind == CMD_BLOCK_STATUS:
            payload = self._recv(length)
            if length < 4 or (length - 4) % 8:
                raise self._fail("malformed block status chunk")
            (ctx,) = struct.unpack_from(">I", payload)
            pos = p.offset
            out = p.extents.setdefault(ctx, [])
            for i in range(4, length, 8):
                n, st = struct.unpack_from(">II", payload, i)
                out.append(Extent(pos, n, st))
                pos += n
        elif ctype & CHUNK_ERROR_BIT:
            payload = self._recv(length)
            err, mlen = struct.unpack_from(">IH", payload)
            p.error = err or errno_mod.EIO
            p.message = payload[6 : 6 + mlen].decode("utf-8", "replace")
        elif ctype == CHUNK_NONE:
            if length:
                self._recv(length)
        else:
            self._broken = True
            raise self._fail(f"unexpected reply chunk type {ctype} for command {p.kind}")
        if flags & REPLY_FLAG_DONE:
            p.done = True

    def _take(self, handle: int) -> _Pending:
        p = self._pending.get(handle)
        if p is None:
            self._broken = True
            raise self._fail(f"reply for unknown handle {handle}")
        return p

    def _wait(self, handle: int) -> _Pending:
        p = self._pending[handle]
        while not p.done:
            try:
                self._read_reply()
            except NBDError:
                # Mid-reply failure: the byte stream is out of step, nothing more can be read.
                self._broken = True
                self._pending.clear()
                raise
        del self._pending[handle]
        if p.error:
            what = "read" if p.kind == CMD_READ else "block status"
            detail = f": {p.message}" if p.message else ""
            raise self._fail(
                f"{what} at {p.offset}+{p.length} failed: {_errno_name(p.error)}{detail}",
                offset=p.offset,
                length=p.length,
                errno=p.error,
            )
        return p

    # --- reads ---------------------------------------------------------------------------

    def _max_request(self, request_size: int) -> int:
        n = max(1, min(request_size, self.info.max_block))
        if self.info.min_block > 1:
            n -= n % self.info.min_block
        return max(n, self.info.min_block)

    def _check_read(self, offset: int, length: int) -> None:
        """Raises NBDError unless one read request can fetch the range."""
        self._check_range(offset, length)
        if length > self.info.max_block:
            raise self._fail(f"read of {length} bytes exceeds max payload {self.info.max_block}")

    def read_into(self, offset: int, buf: memoryview | bytearray) -> list[tuple[int, int]]:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (one request: at most the
        export's maximum payload).  Holes are zero-filled.

        Returns the hole ranges ``(offset, length)`` the server reported.

        Raises:
            NBDError: out of range, too long, or the server failed the read.
        """
        view = memoryview(buf).cast("B")
        self._check_read(offset, len(view))
        handle = self._send(CMD_READ, offset, len(view))
        self._pending[handle] = _Pending(CMD_READ, offset, len(view), view)
        return self._wait(handle).holes

    def read(self, offset: int, length: int, *, request_size: int = DEFAULT_REQUEST_SIZE) -> bytes:
        """Read ``length`` bytes at ``offset`` (split into pipelined requests).

        Raises:
            NBDError: as :meth:`read_into`.
        """
        out = bytearray(length)
        self._check_range(offset, length)
        step = self._max_request(request_size)
        ranges = [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]
        for off, data in self.read_many(ranges):
            out[off - offset : off - offset + len(data)] = data
        return bytes(out)

    def read_many(
        self, ranges: Iterable[tuple[int, int]], *, depth: int = 4
    ) -> Generator[tuple[int, bytearray], None, None]:
        """Read each ``(offset, length)`` range with up to ``depth`` requests in flight;
        yield ``(offset, data)`` in the order given.  Each ``data`` is a new buffer owned
        by the caller.  Ranges must each fit in one request (see :meth:`split_ranges`).

        If the caller stops early, replies still in flight are drained so the connection
        stays usable.

        Raises:
            NBDError: as :meth:`read_into`.
        """
        bufs: collections.deque[bytearray] = collections.deque()

        def targets() -> Iterator[tuple[int, memoryview]]:
            for off, n in ranges:
                self._check_read(off, n)  # before the buffer is made
                buf = bytearray(n)
                bufs.append(buf)
                yield off, memoryview(buf)

        with contextlib.closing(self.read_many_into(targets(), depth=depth)) as replies:
            for off, _view in replies:  # (closed with this generator: drains what is in flight)
                yield off, bufs.popleft()

    def read_many_into(
        self, targets: Iterable[tuple[int, memoryview]], *, depth: int = 4
    ) -> Generator[tuple[int, memoryview], None, None]:
        """:meth:`read_many` into the caller's buffers: read ``len(view)`` bytes at each
        ``(offset, view)`` into ``view`` (a byte view, format ``B``); yield each pair, in
        the order given, once its bytes are there.  Holes are zero-filled.

        Raises:
            NBDError: as :meth:`read_into`.
        """
        inflight: collections.deque[tuple[int, int, memoryview]] = collections.deque()
        it = iter(targets)
        exhausted = False
        depth = max(1, depth)
        try:
            while True:
                # Refill once half the requests are answered: their headers go out in one
                # system call (see _recv_into for why the calls matter).
                while (
                    not exhausted
                    and len(inflight) < depth
                    and (len(inflight) <= depth // 2 or self._out)
                ):
                    nxt = next(it, None)
                    if nxt is None:
                        exhausted = True
                        break
                    off, view = nxt
                    n = len(view)
                    self._check_read(off, n)
                    h = self._queue(CMD_READ, off, n)
                    self._pending[h] = _Pending(CMD_READ, off, n, view)
                    inflight.append((h, off, view))
                self._flush()  # the requests just queued, in one system call
                if not inflight:
                    return
                h, off, view = inflight.popleft()
                self._wait(h)
                yield off, view
        finally:
            if self._out and not self._broken:
                # requests queued when the caller stopped: their replies are drained below
                with contextlib.suppress(NBDError):
                    self._flush()
            for h, _off, _view in inflight:
                if h in self._pending and not self._broken:
                    try:
                        self._wait(h)
                    except NBDError:
                        break

    def split_ranges(
        self, ranges: Iterable[tuple[int, int]], request_size: int = DEFAULT_REQUEST_SIZE
    ) -> Iterator[tuple[int, int]]:
        """Split ranges into pieces no longer than one request."""
        step = self._max_request(request_size)
        for off, n in ranges:
            end = off + n
            while off < end:
                k = min(step, end - off)
                yield off, k
                off += k

    # --- block status --------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """One ``NBD_CMD_BLOCK_STATUS`` request: extents per negotiated meta context.

        The server may describe less than ``length`` (never zero bytes); extents are
        clipped to the export.

        Raises:
            NBDError: no meta context negotiated, out of range, or the server failed.
        """
        if not self.contexts:
            raise self._fail("no meta context negotiated for block status")
        length = min(length, 0xFFFFFFFF - 0xFFFFFFFF % max(1, self.info.min_block))
        self._check_range(offset, length)
        h = self._send(CMD_BLOCK_STATUS, offset, length)
        self._pending[h] = _Pending(CMD_BLOCK_STATUS, offset, length)
        p = self._wait(h)
        out: dict[str, list[Extent]] = {}
        for ctx, exts in p.extents.items():
            name = self._context_names.get(ctx)
            if name is None:
                raise self._fail(f"block status for unknown context id {ctx}")
            clipped = [
                Extent(e.offset, min(e.end, self.info.size) - e.offset, e.flags)
                for e in exts
                if e.offset < self.info.size and e.length > 0
            ]
            out[name] = clipped
        return out

    def extents(
        self, context: str = BASE_ALLOCATION, offset: int = 0, length: int | None = None
    ) -> Iterator[Extent]:
        """All extents of ``context`` covering ``[offset, offset+length)`` (default: the
        whole export), adjacent extents with equal flags merged, clipped to the range.

        Raises:
            NBDError: context not negotiated, or the server failed.
        """
        if context not in self.contexts:
            raise self._fail(f"meta context {context!r} was not negotiated", context=context)
        end = self.info.size if length is None else offset + length
        pos = offset
        pending: Extent | None = None
        while pos < end:
            exts = self.block_status(pos, min(end - pos, 1 << 30)).get(context) or []
            if not exts:
                raise self._fail(f"server sent no extents for {context} at {pos}", offset=pos)
            for e in exts:
                if e.offset >= end:
                    break
                e = Extent(e.offset, min(e.end, end) - e.offset, e.flags)
                if pending is not None and pending.flags == e.flags and pending.end == e.offset:
                    pending = Extent(pending.offset, pending.length + e.length, e.flags)
                else:
                    if pending is not None:
                        yield pending
                    pending = e
            pos = pending.end if pending is not None else end
        if pending is not None:
            yield pending


def data_ranges(
    extents: Iterable[Extent], granularity: int, *, size: int | None = None
) -> list[tuple[int, int]]:
    """Ranges worth reading, aligned to ``granularity``: every ``granularity``-sized slot
    that intersects an extent not marked zero (``base:allocation``), merged into runs.
    ``size`` clips the last run to the export's end.

    A slot outside every returned range reads as all zeros and need not be read.
    """
    if granularity <= 0:
        raise ValueError("granularity must be positive")
    runs: list[tuple[int, int]] = []
    for e in extents:
        if e.zero or e.length == 0:
            continue
        start = e.offset - e.offset % granularity
        end = -(-e.end // granularity) * granularity
        if size is not None:
            end = min(end, size)
        if runs and runs[-1][1] >= start:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    return [(s, e - s) for s, e in runs]


class _Handshake:
    """Option haggling up to ``NBD_OPT_GO`` (fixed newstyle only)."""

    def __init__(self, sock: socket.socket, export: str) -> None:
        self.sock = sock
        self.export = export

    def _fail(self, message: str, **fields: object) -> NBDError:
        return NBDError(
            f"NBD handshake for export {self.export!r}: {message}", export=self.export, **fields
        )

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        try:
            while view:
                k = self.sock.recv_into(view)
                if k == 0:
                    raise self._fail("server closed the connection")
                view = view[k:]
        except OSError as e:
            raise self._fail(f"receive failed: {e}") from e
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise self._fail(f"send failed: {e}") from e

    def _option(self, opt: int, data: bytes = b"") -> None:
        self._send(OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, rtype, length = OPTION_REPLY_HEADER.unpack(
            self._recv(OPTION_REPLY_HEADER.size)
        )
        if magic != OPTION_REPLY_MAGIC or ropt != opt:
            raise self._fail(f"bad option reply (magic {magic:#x}, option {ropt})")
        if length > 64 * 1024 * 1024:
            raise self._fail(f"option reply of {length} bytes")
        return rtype, self._recv(length) if length else b""

    def _reply_error(self, opt: int, rtype: int, data: bytes) -> NBDError:
        what = REP_ERRORS.get(rtype, f"error reply {rtype:#x}")
        msg = data.decode("utf-8", "replace")
        return self._fail(
            f"option {opt} refused: {what}" + (f" ({msg})" if msg else ""), option=opt
        )

    def run(self, meta_contexts: Sequence[str]) -> NBDClient:
        magic, opt_magic = struct.unpack(">QQ", self._recv(16))
        if magic != NBDMAGIC:
            raise self._fail(f"not an NBD server (magic {magic:#x})")
        if opt_magic == OLDSTYLE_MAGIC:
            raise self._fail("old-style NBD servers are not supported")
        if opt_magic != IHAVEOPT:
            raise self._fail(f"unknown NBD handshake magic {opt_magic:#x}")
        (hflags,) = struct.unpack(">H", self._recv(2))
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._fail("server does not speak fixed newstyle")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))

        self._option(OPT_STRUCTURED_REPLY)
        rtype, data = self._reply(OPT_STRUCTURED_REPLY)
        structured = rtype == REP_ACK
        if not structured and not rtype & REP_ERR_BIT:
            raise self._fail(f"unexpected reply {rtype} to structured reply option")

        contexts: dict[str, int] = {}
        if meta_contexts:
            if not structured:
                raise self._fail("server has no structured replies, so no block status")
            name = self.export.encode()
            body = struct.pack(">I", len(name)) + name + struct.pack(">I", len(meta_contexts))
            for q in meta_contexts:
                qb = q.encode()
                body += struct.pack(">I", len(qb)) + qb
            self._option(OPT_SET_META_CONTEXT, body)
            while True:
                rtype, data = self._reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT:
                    (cid,) = struct.unpack_from(">I", data)
                    contexts[data[4:].decode("utf-8", "replace")] = cid
                elif rtype & REP_ERR_BIT:
                    raise self._reply_error(OPT_SET_META_CONTEXT, rtype, data)
                else:
                    raise self._fail(f"unexpected reply {rtype} to set meta context")
            missing = [q for q in meta_contexts if q not in contexts]
            if missing:
                raise self._fail(
                    f"meta context not available: {', '.join(missing)}", missing=missing
                )

        name = self.export.encode()
        self._option(
            OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        )
        size: int | None = None
        tflags = 0
        blocks = (1, 4096, DEFAULT_MAX_PAYLOAD)
        while True:
            rtype, data = self._reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO:
                (itype,) = struct.unpack_from(">H", data)
                if itype == INFO_EXPORT:
                    size, tflags = struct.unpack_from(">QH", data, 2)
                elif itype == INFO_BLOCK_SIZE:
                    blocks = struct.unpack_from(">III", data, 2)
            elif rtype & REP_ERR_BIT:
                raise self._reply_error(OPT_GO, rtype, data)
            else:
                raise self._fail(f"unexpected reply {rtype} to go")
        if size is None:
            raise self._fail("server did not report the export size")
        info = ExportInfo(self.export, size, tflags, blocks[0], blocks[1], blocks[2])
        log.debug("NBD export %r: %s", self.export, info)
        return NBDClient(self.sock, info, contexts, structured)
