"""Serve an archive's disks read-only over NBD, straight from the repository (ops layer).

``vmarchive serve ARCHIVE --socket PATH`` makes each archived disk an NBD export named by
its target (``vda``...): ``qemu-nbd -c /dev/nbd0 -r 'nbd+unix:///vda?socket=PATH'`` and
``mount -o ro``, ``guestmount``, ``qemu-img convert``, a forensic tool -- any NBD client
reads the disk as it was at the captured instant, without exporting it first.  Nothing is
staged: each read fetches the chunks it covers (verified, like every read of the store),
so a 200 GiB disk is browsable at once and costs only what is read.

The server speaks just what that needs (protocol facts from the NBD protocol document, as
for :mod:`vmarchive.hypervisor.nbd`): the fixed newstyle handshake with ``NBD_OPT_GO``,
``NBD_OPT_INFO``, ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_LIST``, ``NBD_OPT_ABORT``,
``NBD_OPT_STRUCTURED_REPLY`` and the meta context options for ``base:allocation``; the
commands ``NBD_CMD_READ``, ``NBD_CMD_BLOCK_STATUS``, ``NBD_CMD_FLUSH`` (nothing to do) and
``NBD_CMD_DISC``.  With structured replies a read sends the stored holes as hole chunks and
block status reports them (hole and zero), so sparse-aware clients (``qemu-img convert``,
``qemu-img map``) neither move nor write them; without, holes read as zeros.  Exports are
read-only: a write is refused with ``EPERM``.  A read that meets damage in the store
gets ``EIO`` (the client sees an I/O error there, and everything else still reads).  An
export's size is the disk's rounded up to 512 bytes (:func:`export_size`).

No TLS and no authentication: a unix socket (mode 0600) or a TCP port on localhost unless
told otherwise.  One thread per connection; the repository's shared lock is held while
serving, so ``gc`` waits rather than delete packs being read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgspec

from vmarchive.errors import (
    ChunkMissingError,
    DamageError,
    NotFoundError,
    RepositoryError,
    UsageError,
)
from vmarchive.hypervisor import nbd as P
from vmarchive.ops.repo import RepoRef, open_repo
from vmarchive.store import Archive, Repository, StreamReader

log = logging.getLogger(__name__)

#: The largest read the server answers (it says so with NBD_INFO_BLOCK_SIZE).
MAX_READ = 32 << 20
PREFERRED_BLOCK = 4096
TRANSMISSION_FLAGS = P.TFLAG_HAS_FLAGS | P.TFLAG_READ_ONLY | P.TFLAG_CAN_MULTI_CONN
CMD_WRITE = 1
CMD_FLUSH = 3

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum


class Export(msgspec.Struct, frozen=True):
    """One served disk: its NBD export name (the disk's target) and size."""

    name: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "size": self.size}


#: the one meta context this server has, and the id it gives it
BASE_ALLOCATION_ID = 1
_ERR_UNSUP = P.REP_ERR_BIT | 1
_ERR_INVALID = P.REP_ERR_BIT | 3
_ERR_UNKNOWN = P.REP_ERR_BIT | 6


@dataclass
class _Session:
    """One client's chosen export and what it negotiated."""

    reader: StreamReader
    size: int  # the export's size (the stream's, rounded up: see export_size)
    structured: bool
    allocation: bool  # base:allocation selected

    def runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, hole) runs covering the range: the stream's stored extents,
        then the padding up to the export's size as a hole."""
        runs = [(e.offset, e.length, e.hole) for e in self.reader.extents(offset, length)]
        end, pad = offset + length, max(offset, self.reader.size)
        if end > pad:
            if runs and runs[-1][2]:
                runs[-1] = (runs[-1][0], end - runs[-1][0], True)
            else:
                runs.append((pad, end - pad, True))
        return runs


class _Closed(Exception):
    """The client went away (or broke the protocol): end its connection quietly."""


class DiskServer:
    """The disks of one loaded archive as NBD exports; :meth:`serve` until stopped."""

    def __init__(self, repo: Repository, archive: Archive, disks: Sequence[str] = ()) -> None:
        """``disks``: targets to serve (default: every disk of the archive).

        Raises UsageError (the archive has no disk) and NotFoundError (no such disk).
        """
        self.repo = repo
        self.archive = archive
        have = {
            str(s.attrs.get("target")): s
            for s in archive.streams
            if s.kind == "disk" and s.attrs.get("target")
        }
        if not have:
            raise UsageError(f"archive {archive.id[:12]} has no disk to serve")
        for d in disks:
            if d not in have:
                raise NotFoundError(
                    f"archive {archive.id[:12]} has no disk {d!r} (it has {', '.join(sorted(have))})"
                )
        self._streams = {t: have[t] for t in (disks or sorted(have))}
        self.exports = [Export(t, export_size(int(s.size))) for t, s in self._streams.items()]
        self._sizes = {e.name: e.size for e in self.exports}
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._mutex = threading.Lock()

    # -- listening ------------------------------------------------------------------------
    def serve(self, listener: socket.socket, ready: threading.Event | None = None) -> None:
        """Accept and serve connections on ``listener`` until :meth:`stop`; then close
        every connection.  ``ready`` is set once accepting."""
        listener.settimeout(0.2)
        threads: list[threading.Thread] = []
        if ready is not None:
            ready.set()
        try:
            while not self._stop.is_set():
                try:
                    conn, _addr = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                with self._mutex:
                    self._conns.add(conn)
                t = threading.Thread(
                    target=self._serve_conn, args=(conn,), name="nbd-serve", daemon=True
                )
                t.start()
                threads.append(t)
                threads = [x for x in threads if x.is_alive()]
        finally:
            with self._mutex:
                for c in self._conns:
                    with contextlib.suppress(OSError):
                        c.shutdown(socket.SHUT_RDWR)
            for t in threads:
                t.join(5)

    def stop(self) -> None:
        self._stop.set()

    # -- one connection -------------------------------------------------------------------
    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            with conn:
                ses = self._handshake(conn)
                if ses is not None:
                    self._transmission(conn, ses)
        except _Closed as e:
            log.debug("NBD connection ended: %s", e)
        except OSError as e:
            log.debug("NBD connection failed: %s", e)
        except Exception:  # a bug must not take the server down, nor go unsaid
            log.exception("NBD connection failed")
        finally:
            with self._mutex:
                self._conns.discard(conn)

    def _handshake(self, conn: socket.socket) -> _Session | None:
        """Negotiate; the session on the chosen export, or None (the client aborted)."""
        conn.sendall(
            _HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (cflags,) = _U32.unpack(_recv(conn, 4))
        if cflags & ~(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES):
            raise _Closed(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & P.FLAG_NO_ZEROES)
        structured = allocation = False
        while True:
            magic, opt, length = P.OPTION_HEADER.unpack(_recv(conn, P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _Closed(f"bad option magic {magic:#x}")
            if length > 4096:
                raise _Closed(f"option {opt} of {length} bytes")
            data = _recv(conn, length)
            if opt == P.OPT_EXPORT_NAME:
                name = self._named(data.decode("utf-8", "replace"))
                if name not in self._streams:
                    raise _Closed(f"unknown export {name!r}")  # the protocol says: close
                conn.sendall(
                    struct.pack(">QH", self._sizes[name], TRANSMISSION_FLAGS)
                    + (b"" if no_zeroes else bytes(124))
                )
                return self._session(name, structured, allocation)
            if opt == P.OPT_ABORT:
                _opt_reply(conn, opt, P.REP_ACK)
                return None
            if opt == P.OPT_LIST:
                for e in self.exports:
                    raw = e.name.encode()
                    _opt_reply(conn, opt, P.REP_SERVER, _U32.pack(len(raw)) + raw)
                _opt_reply(conn, opt, P.REP_ACK)
                continue
            if opt in (P.OPT_INFO, P.OPT_GO):
                asked = self._info_request(data)
                if asked is None:
                    _opt_reply(conn, opt, _ERR_INVALID, b"malformed request")
                    continue
                chosen = self._known(conn, opt, asked)
                if chosen is None:
                    continue
                size = self._sizes[chosen]
                _opt_reply(
                    conn,
                    opt,
                    P.REP_INFO,
                    _INFO_EXPORT.pack(P.INFO_EXPORT, size, TRANSMISSION_FLAGS),
                )
                _opt_reply(
                    conn,
                    opt,
                    P.REP_INFO,
                    _INFO_BLOCK.pack(P.INFO_BLOCK_SIZE, 1, PREFERRED_BLOCK, MAX_READ),
                )
                _opt_reply(conn, opt, P.REP_ACK)
                if opt == P.OPT_GO:
                    return self._session(chosen, structured, allocation)
                continue
            if opt == P.OPT_STRUCTURED_REPLY:
                if data:
                    _opt_reply(conn, opt, _ERR_INVALID, b"no data expected")
                    continue
                structured = True
                _opt_reply(conn, opt, P.REP_ACK)
                continue
            if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
                meta = _meta_request(data)
                if meta is None:
                    _opt_reply(conn, opt, _ERR_INVALID, b"malformed request")
                    continue
                export, queries = meta
                if opt == P.OPT_SET_META_CONTEXT and not structured:
                    _opt_reply(conn, opt, _ERR_INVALID, b"structured replies first")
                    continue
                if self._known(conn, opt, export) is None:
                    continue
                listing = opt == P.OPT_LIST_META_CONTEXT
                wanted = [q for q in queries or ([P.BASE_ALLOCATION] if listing else [])]
                found = P.BASE_ALLOCATION in wanted or (listing and "base:" in wanted)
                if found:
                    body = _U32.pack(BASE_ALLOCATION_ID) + P.BASE_ALLOCATION.encode()
                    _opt_reply(conn, opt, P.REP_META_CONTEXT, body)
                if not listing:
                    allocation = found  # each SET replaces the selection
                _opt_reply(conn, opt, P.REP_ACK)
                continue
            _opt_reply(conn, opt, _ERR_UNSUP, b"not supported by this server")

    def _named(self, asked: str) -> str:
        """The export a client means: the one it names, or (no name) the only one."""
        if asked or len(self._streams) != 1:
            return asked
        return next(iter(self._streams))

    def _known(self, conn: socket.socket, opt: int, asked: str) -> str | None:
        """The export an option means (see :meth:`_named`), or None once an unknown one
        has been refused."""
        name = self._named(asked)
        if name in self._streams:
            return name
        _opt_reply(conn, opt, _ERR_UNKNOWN, f"no export {name!r}".encode())
        return None

    @staticmethod
    def _info_request(data: bytes) -> str | None:
        """The export name of an NBD_OPT_INFO/GO request (None: malformed)."""
        if len(data) < 6:
            return None
        (n,) = _U32.unpack_from(data)
        if 4 + n + 2 > len(data):
            return None
        name = data[4 : 4 + n].decode("utf-8", "replace")
        (k,) = _U16.unpack_from(data, 4 + n)
        if 4 + n + 2 + 2 * k != len(data):
            return None
        return name

    def _session(self, name: str, structured: bool, allocation: bool) -> _Session:
        reader = self.repo.open_stream(self.archive, self._streams[name].name)
        return _Session(reader, self._sizes[name], structured, allocation)

    def _transmission(self, conn: socket.socket, ses: _Session) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = P.REQUEST_HEADER.unpack(
                _recv(conn, P.REQUEST_HEADER.size)
            )
            if magic != P.REQUEST_MAGIC:
                raise _Closed(f"bad request magic {magic:#x}")
            if cmd == P.CMD_DISC:
                return
            if cmd == CMD_WRITE:
                _drain(conn, length)  # stay in step with the client, then refuse
                _reply(conn, handle, errno.EPERM)
            elif cmd == CMD_FLUSH:
                _reply(conn, handle, 0)
            elif cmd == P.CMD_READ:
                self._read(conn, ses, handle, offset, length)
            elif cmd == P.CMD_BLOCK_STATUS and ses.allocation:
                if length == 0 or offset + length > ses.size:
                    _error(conn, ses, handle, errno.EINVAL, "range outside the export")
                    continue
                runs = ses.runs(offset, length)
                if flags & P.CMD_FLAG_REQ_ONE:
                    runs = runs[:1]
                body = _U32.pack(BASE_ALLOCATION_ID) + b"".join(
                    struct.pack(">II", n, P.STATE_HOLE | P.STATE_ZERO if hole else 0)
                    for _off, n, hole in runs
                )
                _chunk(conn, handle, P.CHUNK_BLOCK_STATUS, body, done=True)
            else:
                _error(conn, ses, handle, errno.EINVAL, f"command {cmd} not supported")

    def _read(self, conn: socket.socket, ses: _Session, handle: int, offset: int, n: int) -> None:
        if n > MAX_READ or offset + n > ses.size:
            _error(conn, ses, handle, errno.EINVAL, "read outside the export or too large")
            return
        if n == 0:  # nothing to send but the end of the reply
            if ses.structured:
                _chunk(conn, handle, P.CHUNK_NONE, b"", done=True)
            else:
                _reply(conn, handle, 0)
            return
        runs = ses.runs(offset, n)
        pieces: list[bytes | None] = []  # read them all first: an error is then one reply
        try:
            for off, k, hole in runs:
                pieces.append(None if hole else ses.reader.read_range(off, k).ljust(k, b"\0"))
        except (DamageError, ChunkMissingError, RepositoryError) as e:
            log.error("read of %s at %d (+%d) failed: %s", ses.reader.name, offset, n, e)
            _error(conn, ses, handle, errno.EIO, "damaged data in the repository")
            return
        if not ses.structured:
            data = b"".join(
                p if p is not None else bytes(k)
                for p, (_o, k, _h) in zip(pieces, runs, strict=True)
            )
            conn.sendall(P.SIMPLE_REPLY_HEADER.pack(P.SIMPLE_REPLY_MAGIC, 0, handle) + data)
            return
        for i, (piece, (off, k, _hole)) in enumerate(zip(pieces, runs, strict=True)):
            done = i == len(runs) - 1
            if piece is None:
                _chunk(conn, handle, P.CHUNK_OFFSET_HOLE, struct.pack(">QI", off, k), done=done)
            else:
                _chunk(conn, handle, P.CHUNK_OFFSET_DATA, struct.pack(">Q", off) + piece, done=done)


def _meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Export name and queries of a LIST/SET_META_CONTEXT option (None: malformed)."""
    try:
        (n,) = _U32.unpack_from(data)
        export = data[4 : 4 + n].decode("utf-8", "replace")
        pos = 4 + n
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (k,) = _U32.unpack_from(data, pos)
            queries.append(data[pos + 4 : pos + 4 + k].decode("utf-8", "replace"))
            pos += 4 + k
    except struct.error:
        return None
    return (export, queries) if pos == len(data) else None


def _chunk(conn: socket.socket, handle: int, kind: int, payload: bytes, *, done: bool) -> None:
    flags = P.REPLY_FLAG_DONE if done else 0
    head = P.CHUNK_HEADER.pack(P.STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload))
    conn.sendall(head + payload)


def _error(conn: socket.socket, ses: _Session, handle: int, error: int, message: str) -> None:
    """An error reply: structured when negotiated (reads must not get simple ones then)."""
    if not ses.structured:
        _reply(conn, handle, error)
        return
    msg = message.encode()
    _chunk(conn, handle, P.CHUNK_ERROR, struct.pack(">IH", error, len(msg)) + msg, done=True)


def export_size(size: int) -> int:
    """An export's size: the disk's, rounded up to 512 bytes with zeros as QEMU's own NBD
    server does (QEMU's client hangs on an export whose size is not a multiple of 512).
    Disks QEMU captured always are; a disk image of another size gets the padding."""
    return -(-size // 512) * 512


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise _Closed("client closed the connection")
        got += k
    return bytes(buf)


def _drain(conn: socket.socket, n: int) -> None:
    while n > 0:
        n -= len(_recv(conn, min(n, 1 << 20)))


def _opt_reply(conn: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
    conn.sendall(P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, opt, rtype, len(data)) + data)


def _reply(conn: socket.socket, handle: int, error: int) -> None:
    conn.sendall(P.SIMPLE_REPLY_HEADER.pack(P.SIMPLE_REPLY_MAGIC, error, handle))


# -- listeners ----------------------------------------------------------------------------
@contextlib.contextmanager
def unix_listener(path: str) -> Iterator[socket.socket]:
    """A listening unix socket at ``path`` (mode 0600), removed afterwards.

    Raises UsageError when ``path`` exists (it is never replaced) or cannot be bound (no
    such directory, too long for a unix socket, no permission)."""
    if os.path.lexists(path):
        raise UsageError(f"{path} exists: give a new socket path")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            ls.bind(path)
        except OSError as e:
            raise UsageError(f"cannot listen on {path}: {e.strerror or e}") from e
        finally:
            os.umask(old)
        ls.listen(16)
        yield ls
    finally:
        ls.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def tcp_listener(host: str, port: int) -> Iterator[socket.socket]:
    """A listening TCP socket. Raises UsageError when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve {host!r}: {e}") from e
    family, _t, _p, _c, addr = infos[0]
    ls = socket.socket(family, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind(addr)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from e
        ls.listen(16)
        yield ls
    finally:
        ls.close()


# -- the command --------------------------------------------------------------------------
@contextlib.contextmanager
def open_server(ref: RepoRef, archive_name: str, disks: Sequence[str] = ()) -> Iterator[DiskServer]:
    """A server of ``archive_name``'s disks, the repository open and its shared lock held
    until the context ends.

    Raises the repository's errors, NotFoundError/AmbiguousError (archive or disk),
    UsageError (no disk), LockedError (gc holds the repository)."""
    repo = open_repo(ref)
    try:
        with repo.lock("shared"):
            yield DiskServer(repo, repo.load_archive(archive_name), disks)
    finally:
        repo.close()


def parse_listen(value: str) -> tuple[str, int]:
    """``PORT`` (localhost) or ``HOST:PORT`` (``[v6]:PORT``). Raises UsageError."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "localhost", value
    host = host.strip("[]") or "localhost"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {value!r}: give PORT or HOST:PORT")
    return host, int(port)


def export_uri(
    name: str, *, socket_path: str | None = None, tcp: tuple[str, int] | None = None
) -> str:
    """The NBD URI of export ``name`` (what qemu-img, qemu-nbd and nbdinfo take)."""
    if socket_path is not None:
        return f"nbd+unix:///{name}?socket={socket_path}"
    assert tcp is not None
    host = f"[{tcp[0]}]" if ":" in tcp[0] else tcp[0]
    return f"nbd://{host}:{tcp[1]}/{name}"
