"""`vmarchive serve`: an archive's disks as read-only NBD exports, read by vmarchive's own
NBD client and by QEMU's (qemu-img), damage answered with EIO, the command's lifecycle."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from vmarchive.errors import NBDError, NotFoundError, UsageError
from vmarchive.hypervisor import nbd as P
from vmarchive.hypervisor.nbd import NBDClient
from vmarchive.ops import serve
from vmarchive.ops.repo import RepoRef
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions

ROOT = pathlib.Path(__file__).resolve().parents[2]
MiB = 1 << 20


def padded(data: bytes) -> bytes:
    """What an export holds: the disk, then zeros up to a multiple of 512 bytes."""
    return data + bytes(serve.export_size(len(data)) - len(data))


def disk_image(seed: int, size: int) -> bytes:
    """Random data, a long hole and a run of repeats, ending off a chunk boundary."""
    r = random.Random(seed)
    data = bytearray(size)
    data[: size // 3] = r.randbytes(size // 3)
    data[size // 2 : size // 2 + 200_000] = b"abcdefgh" * 25_000
    data[-5000:] = r.randbytes(5000)
    return bytes(data)


@pytest.fixture
def archive(tmp_path: pathlib.Path) -> tuple[str, str, dict[str, bytes]]:
    path = str(tmp_path / "repo")
    disks = {"vda": disk_image(1, 5 * MiB + 12345), "vdb": disk_image(2, MiB + 7)}
    with Repository.init(path, InitOptions()) as repo, repo.writer() as w:
        for target, data in disks.items():
            sw = w.stream(f"disk:{target}", "disk", len(data), attrs={"target": target})
            sw.write(0, data)
            sw.close()
        sw = w.stream("domain.xml", "meta", 6)
        sw.write(0, b"<d/>\n\n")
        sw.close()
        aid = w.commit({"time": "2026-01-01T00:00:00Z", "domain": "vm1", "kind": "disk-only"})
    return path, aid, disks


@contextlib.contextmanager
def serving(path: str, aid: str, sock: str) -> Iterator[None]:
    """``aid``'s disks served on ``sock`` by a server thread, stopped afterwards."""
    ready = threading.Event()
    with serve.open_server(RepoRef(path), aid) as srv, serve.unix_listener(sock) as ls:
        t = threading.Thread(target=srv.serve, args=(ls, ready), daemon=True)
        t.start()
        assert ready.wait(10)
        try:
            yield
        finally:
            srv.stop()
            t.join(10)
            assert not t.is_alive()
    assert not os.path.exists(sock), "the socket is removed when serving ends"


@pytest.fixture
def served(
    archive: tuple[str, str, dict[str, bytes]], tmp_path: pathlib.Path
) -> Iterator[tuple[str, dict[str, bytes], str]]:
    path, aid, disks = archive
    sock = str(tmp_path / "nbd.sock")
    with serving(path, aid, sock):
        yield sock, disks, path


def test_reads_match_the_archived_disk(served: tuple[str, dict[str, bytes], str]) -> None:
    sock, disks, _ = served
    r = random.Random(3)
    for target, disk in disks.items():
        data = padded(disk)  # what the export holds
        with NBDClient.connect(sock, target, meta_contexts=()) as c:
            assert c.size == len(data) and c.info.read_only
            ranges = [
                (0, 4096),
                (len(data) - 4096, 4096),
                (len(data) - 1, 1),
                (123, len(data) - 200),
            ]
            ranges += [
                (o, r.randrange(1, 300_000)) for o in r.sample(range(len(data) - 300_000), 40)
            ]
            for off, n in ranges:
                assert c.read(off, n) == data[off : off + n], (target, off, n)
    with pytest.raises(NBDError):
        NBDClient.connect(sock, "vdz", meta_contexts=())


def test_block_status_reports_the_stored_holes(served: tuple[str, dict[str, bytes], str]) -> None:
    sock, disks, path = served
    with Repository.open(path) as repo:
        a = repo.load_archive(repo.archive_ids()[0])
        stored = {
            t: [(e.offset, e.length, e.hole) for e in repo.open_stream(a, f"disk:{t}").extents()]
            for t in disks
        }
    for target, data in disks.items():
        want = stored[target]
        if target == "vda":  # big enough for whole-chunk holes: both kinds are checked
            assert any(h for *_, h in want) and any(not h for *_, h in want), want
        pad = serve.export_size(len(data)) - len(data)
        if pad:  # the padding up to the export's size reads as a hole too
            off, n, hole = want[-1]
            want = want[:-1] + (
                [(off, n + pad, True)] if hole else [(off, n, False), (len(data), pad, True)]
            )
        with NBDClient.connect(sock, target) as c:
            got = [(e.offset, e.length, e.hole) for e in c.extents()]
            assert got == want
            assert all(e.zero == e.hole for e in c.extents())
            # one request, the whole export: the same runs
            one = c.block_status(0, c.size)[P.BASE_ALLOCATION]
            assert [(e.offset, e.length, e.hole) for e in one] == want
            # reads come back whole, holes sent as hole chunks
            assert c.read(0, c.size) == padded(data)


def test_qemu_reads_the_exports(
    served: tuple[str, dict[str, bytes], str], tmp_path: pathlib.Path
) -> None:
    sock, disks, _ = served
    for target, data in disks.items():
        out = tmp_path / f"{target}.raw"
        uri = serve.export_uri(target, socket_path=sock)
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
            check=True,
            capture_output=True,
        )
        assert out.read_bytes() == padded(data)
    # QEMU sees the stored holes through block status (qemu-img map asks base:allocation)
    vda = serve.export_uri("vda", socket_path=sock)
    m = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "raw", vda],
        capture_output=True,
        text=True,
        check=True,
    )
    regions = json.loads(m.stdout)
    assert {r["zero"] for r in regions} == {True, False}, regions
    assert sum(r["length"] for r in regions) == serve.export_size(len(disks["vda"]))
    # QEMU sees the export read-only: a write through it is refused
    p = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write 0 4k", serve.export_uri("vda", socket_path=sock)],
        capture_output=True,
        text=True,
    )
    assert "wrote" not in p.stdout, p.stdout


def _raw_session(sock: str, export: str) -> socket.socket:
    """A hand-made client past NBD_OPT_EXPORT_NAME (what our client never sends)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    magic, opt, flags = struct.unpack(">QQH", s.recv(18, socket.MSG_WAITALL))
    assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT) and flags & P.FLAG_FIXED_NEWSTYLE
    s.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    name = export.encode()
    s.sendall(struct.pack(">QII", P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
    size, tflags = struct.unpack(">QH", s.recv(10, socket.MSG_WAITALL))
    assert tflags & P.TFLAG_READ_ONLY and size > 0
    return s


def _hello(sock: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    s.recv(18, socket.MSG_WAITALL)
    s.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
    return s


def _option(s: socket.socket, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
    """Send an option; its replies (type, data) up to the final one."""
    s.sendall(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        magic, ropt, rtype, n = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
        assert magic == P.OPTION_REPLY_MAGIC and ropt == opt
        out.append((rtype, s.recv(n, socket.MSG_WAITALL) if n else b""))
        if rtype in (P.REP_ACK,) or rtype & P.REP_ERR_BIT:
            return out


def _meta(export: str, *queries: str) -> bytes:
    raw = export.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return body + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


def _go(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE)


def test_option_haggling(served: tuple[str, dict[str, bytes], str]) -> None:
    sock, disks, _ = served
    with _hello(sock) as s:
        listed = _option(s, P.OPT_LIST)
        assert [d[4:].decode() for t, d in listed if t == P.REP_SERVER] == ["vda", "vdb"]
        assert listed[-1][0] == P.REP_ACK
        assert _option(s, 5)[0][0] == P.REP_ERR_BIT | 1  # NBD_OPT_STARTTLS: not supported
        alloc = struct.pack(">I", 1) + P.BASE_ALLOCATION.encode()
        assert _option(s, P.OPT_SET_META_CONTEXT, _meta("vda", P.BASE_ALLOCATION))[0][0] == (
            P.REP_ERR_BIT | 3  # structured replies first
        )
        assert _option(s, P.OPT_LIST_META_CONTEXT, _meta("vda")) == [
            (P.REP_META_CONTEXT, alloc),
            (P.REP_ACK, b""),
        ]
        assert _option(s, P.OPT_STRUCTURED_REPLY) == [(P.REP_ACK, b"")]
        assert _option(s, P.OPT_SET_META_CONTEXT, _meta("vdz", P.BASE_ALLOCATION))[0][0] == (
            P.REP_ERR_BIT | 6
        )
        assert _option(s, P.OPT_SET_META_CONTEXT, _meta("vda", "qemu:dirty-bitmap:x")) == [
            (P.REP_ACK, b"")  # nothing of that name: none selected
        ]
        assert _option(s, P.OPT_SET_META_CONTEXT, _meta("vda", P.BASE_ALLOCATION)) == [
            (P.REP_META_CONTEXT, alloc),
            (P.REP_ACK, b""),
        ]
        assert _option(s, P.OPT_GO, b"\x00\x00")[0][0] == P.REP_ERR_BIT | 3  # malformed
        assert _option(s, P.OPT_GO, _go("vdz"))[0][0] == P.REP_ERR_BIT | 6  # unknown export
        info = _option(s, P.OPT_INFO, _go("vdb"))  # the session goes on after each refusal
        assert [t for t, _ in info] == [P.REP_INFO, P.REP_INFO, P.REP_ACK]
        kind, size, flags = struct.unpack(">HQH", info[0][1])
        assert (kind, size) == (P.INFO_EXPORT, serve.export_size(len(disks["vdb"])))
        assert flags & P.TFLAG_READ_ONLY
        assert struct.unpack(">HIII", info[1][1]) == (P.INFO_BLOCK_SIZE, 1, 4096, serve.MAX_READ)
        assert [t for t, _ in _option(s, P.OPT_GO, _go("vda"))] == [
            P.REP_INFO,
            P.REP_INFO,
            P.REP_ACK,
        ]
        s.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 1000, 24))
        magic, flags, kind, handle, n = struct.unpack(">IHHQI", s.recv(20, socket.MSG_WAITALL))
        assert (magic, flags, kind, handle, n) == (
            P.STRUCTURED_REPLY_MAGIC,
            P.REPLY_FLAG_DONE,
            P.CHUNK_OFFSET_DATA,
            7,
            8 + 24,
        )
        assert s.recv(n, socket.MSG_WAITALL) == struct.pack(">Q", 1000) + disks["vda"][1000:1024]
    with _hello(sock) as s:
        assert _option(s, P.OPT_ABORT) == [(P.REP_ACK, b"")]
        assert s.recv(1) == b""


def _request(
    s: socket.socket, cmd: int, handle: int, off: int, n: int, payload: bytes = b""
) -> int:
    s.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, cmd, handle, off, n) + payload)
    magic, error, h = struct.unpack(">IIQ", s.recv(16, socket.MSG_WAITALL))
    assert magic == P.SIMPLE_REPLY_MAGIC and h == handle
    return int(error)


def test_writes_and_bad_requests_are_refused_and_the_session_goes_on(
    served: tuple[str, dict[str, bytes], str],
) -> None:
    sock, disks, _ = served
    with _raw_session(sock, "vdb") as s:
        assert _request(s, serve.CMD_WRITE, 1, 0, 512, b"x" * 512) == errno.EPERM
        end = serve.export_size(len(disks["vdb"]))
        assert _request(s, P.CMD_READ, 2, end - 10, 11) == errno.EINVAL
        assert _request(s, 99, 3, 0, 0) == errno.EINVAL
        assert _request(s, P.CMD_READ, 4, 100, 50) == 0
        assert s.recv(50, socket.MSG_WAITALL) == disks["vdb"][100:150]
        s.sendall(struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_DISC, 5, 0, 0))
        assert s.recv(1) == b""  # the server closed its side


def test_damage_is_an_io_error_where_it_is_and_nowhere_else(
    archive: tuple[str, str, dict[str, bytes]], tmp_path: pathlib.Path
) -> None:
    path, aid, disks = archive
    with Repository.open(path) as repo:
        a = repo.load_archive(aid)
        vda = a.stream("disk:vda")
        cid = vda.chunk_id(1)  # random data: a chunk of its own
        loc = repo.index.get(cid)
        chunk = vda.chunk_size
    assert loc is not None
    pack = pathlib.Path(path) / "data" / loc.pack_id[:2] / loc.pack_id
    blob = bytearray(pack.read_bytes())
    blob[loc.offset + loc.length // 2] ^= 0xFF
    pack.write_bytes(bytes(blob))
    sock = str(tmp_path / "d.sock")
    with serving(path, aid, sock):
        with NBDClient.connect(sock, "vda", meta_contexts=()) as c:
            assert c.read(0, chunk) == disks["vda"][:chunk]
            with pytest.raises(NBDError) as e:
                c.read(chunk + 10, 100)
            assert e.value.fields.get("errno") == errno.EIO, e.value.fields
            assert c.read(2 * chunk, 4096) == disks["vda"][2 * chunk : 2 * chunk + 4096]
        uri = serve.export_uri("vda", socket_path=sock)
        p = subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(tmp_path / "x.raw")],
            capture_output=True,
            text=True,
        )
        assert p.returncode != 0 and "error" in p.stderr.lower(), p.stderr


def test_tcp_listener(archive: tuple[str, str, dict[str, bytes]], tmp_path: pathlib.Path) -> None:
    path, aid, disks = archive
    ready = threading.Event()
    with serve.open_server(RepoRef(path), aid) as srv, serve.tcp_listener("127.0.0.1", 0) as ls:
        port = ls.getsockname()[1]
        t = threading.Thread(target=srv.serve, args=(ls, ready), daemon=True)
        t.start()
        assert ready.wait(10)
        try:
            with NBDClient.connect(("127.0.0.1", port), "vdb", meta_contexts=()) as c:
                assert c.read(0, 4096) == disks["vdb"][:4096]
            out = tmp_path / "vdb.raw"
            uri = serve.export_uri("vdb", tcp=("127.0.0.1", port))
            subprocess.run(["qemu-img", "convert", "-O", "raw", uri, str(out)], check=True)
            assert out.read_bytes() == padded(disks["vdb"])
        finally:
            srv.stop()
            t.join(10)
    with serve.tcp_listener("127.0.0.1", 0) as ls:
        taken = ls.getsockname()[1]
        with (
            pytest.raises(UsageError, match="cannot listen"),
            serve.tcp_listener("127.0.0.1", taken),
        ):
            pass


def test_unix_listener_refuses_a_path_it_cannot_bind(tmp_path: pathlib.Path) -> None:
    for bad, why in (
        (tmp_path / "no-such-dir" / "s.sock", "No such file or directory"),
        (tmp_path / ("x" * 120), "too long"),
    ):
        with (
            pytest.raises(UsageError, match=f"cannot listen on .*{why}"),
            serve.unix_listener(str(bad)),
        ):
            pass
        assert not os.path.lexists(bad)
    # Negative control: a new path in a directory that exists is bound, and removed after.
    good = tmp_path / "s.sock"
    with serve.unix_listener(str(good)) as ls:
        assert ls.getsockname() == str(good)
    assert not os.path.lexists(good)


def test_only_the_disks_asked_for_are_served(archive: tuple[str, str, dict[str, bytes]]) -> None:
    path, aid, _ = archive
    with serve.open_server(RepoRef(path), aid, ["vdb"]) as srv:
        assert [e.name for e in srv.exports] == ["vdb"]
    with (
        pytest.raises(NotFoundError, match="no disk 'vdz'"),
        serve.open_server(RepoRef(path), aid, ["vdz"]),
    ):
        pass


@pytest.mark.parametrize("value", ["0", "70000", "x", "host:", ":x"])
def test_bad_listen_values(value: str) -> None:
    with pytest.raises(UsageError, match="--listen"):
        serve.parse_listen(value)


def test_export_sizes_are_whole_sectors() -> None:
    assert [serve.export_size(n) for n in (0, 1, 511, 512, 513, 1 << 30)] == [
        0,
        512,
        512,
        512,
        1024,
        1 << 30,
    ]


def test_listen_values() -> None:
    assert serve.parse_listen("10809") == ("localhost", 10809)
    assert serve.parse_listen("0.0.0.0:10809") == ("0.0.0.0", 10809)
    assert serve.parse_listen("[::1]:10809") == ("::1", 10809)
    assert serve.export_uri("vda", tcp=("::1", 10809)) == "nbd://[::1]:10809/vda"


def _cli(*args: str) -> subprocess.Popen[str]:
    # SIGINT as a terminal gives it: a test run started in the background of a
    # non-interactive shell (nohup ... &) ignores SIGINT, children inherit that, and Python
    # then leaves it ignored -- as any program should; the server then served on (CI).
    # faulthandler: SIGABRT makes a hung server print every thread's stack (_exits).
    return subprocess.Popen(
        ["env", "--default-signal=INT", sys.executable, "-m", "vmarchive", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )


def _exits(p: subprocess.Popen[str], after: str, timeout: float = 30) -> int:
    """``p``'s exit code; a process still running after ``timeout`` is made to print its
    threads' stacks and the test fails with them."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        try:
            _out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            _out, err = p.communicate()
        pytest.fail(f"still running {timeout:.0f} s after {after}; its stacks:\n{err}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_until_signalled(
    archive: tuple[str, str, dict[str, bytes]], tmp_path: pathlib.Path, sig: signal.Signals
) -> None:
    path, aid, disks = archive
    sock = tmp_path / "cli.sock"
    p = _cli("serve", aid[:10], "--socket", str(sock), "--disk", "vdb", "--json", "--repo", path)
    try:
        assert p.stdout is not None
        lines: list[str] = []
        while not lines or lines[-1] != "}\n":
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            lines.append(line)
        told = json.loads("".join(lines))
        assert told["archive"] == aid
        (exp,) = told["exports"]
        assert exp == {
            "name": "vdb",
            "size": serve.export_size(len(disks["vdb"])),
            "uri": f"nbd+unix:///vdb?socket={sock}",
        }
        out = tmp_path / "vdb.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", exp["uri"], str(out)], check=True
        )
        assert out.read_bytes() == padded(disks["vdb"])
        # gc waits for the shared lock rather than delete what is being served
        gc = subprocess.run(
            [sys.executable, "-m", "vmarchive", "gc", "--repo", path],
            capture_output=True,
            text=True,
            env={**os.environ, "VMARCHIVE_LOCK_WAIT": "0"},
            cwd=ROOT,
        )
        assert gc.returncode == 3 and "lock" in gc.stderr.lower(), gc.stderr
        p.send_signal(sig)
        assert _exits(p, sig.name) == 0, p.stderr.read() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not sock.exists()


def test_command_usage_errors(
    archive: tuple[str, str, dict[str, bytes]], tmp_path: pathlib.Path
) -> None:
    path, aid, _ = archive
    taken = tmp_path / "taken"
    taken.write_text("")
    for args in (
        ["serve", aid, "--repo", path],
        ["serve", aid, "--socket", "x.sock", "--listen", "10809", "--repo", path],
        ["serve", aid, "--socket", str(tmp_path / "s"), "--disk", "vdz", "--repo", path],
        ["serve", aid, "--socket", str(taken), "--repo", path],
    ):
        p = _cli(*args)
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("vmarchive: "), err
