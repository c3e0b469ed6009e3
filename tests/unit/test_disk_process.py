"""The disk reader process (:mod:`vmarchive.ops.disk_process`) against qemu-nbd serving a
known image: what the child stores, the capture's writer adopts and commits, and a fresh
open of the repository reads back byte for byte; a failed, cancelled or killed child
fails (or stops) the reads in one line and adopts nothing.  The integration tests of
captures run it against QEMU (it is how a live capture reads its disks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmarchive.errors import HypervisorError, InterruptedError_, UsageError, VmarchiveError
from vmarchive.format import constants as C
from vmarchive.format.crypto import TEST_SCRYPT, KeyMaterial
from vmarchive.ops import capture_disks as CD
from vmarchive.ops import disk_process as DP
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions
from vmarchive.store.writer import ArchiveWriter

KiB, MiB = 1024, 1024 * 1024
SIZE = 9 * MiB + 20 * KiB  # a short last slot
META = {"time": "2026-11-29T00:00:00Z", "domain": "dp", "kind": "capture"}

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="qemu-utils not installed",
)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The image's bytes: random data, a run of one byte, and holes."""
    data = bytearray(SIZE)
    data[0 : 3 * MiB] = os.urandom(3 * MiB)
    data[5 * MiB : 6 * MiB] = b"\x5a" * MiB
    data[SIZE - 20 * KiB :] = os.urandom(20 * KiB)
    return bytes(data)


@pytest.fixture(scope="module")
def image(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("dp")
    (d / "d.raw").write_bytes(raw)
    img = d / "d.qcow2"
    cmd = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(d / "d.raw"), str(img)]
    subprocess.run(cmd, check=True)
    return img


class Recorder:
    """A Progress that keeps every task's name, total and advances."""

    def __init__(self) -> None:
        self.tasks: list[dict[str, Any]] = []

    def task(self, name: str, total: int | None = None, unit: str = "B") -> Any:
        rec: dict[str, Any] = {"name": name, "total": total, "done": 0, "closed": False}
        self.tasks.append(rec)

        class T:
            def advance(self, n: int) -> None:
                rec["done"] += n

            def set_total(self, total: int | None) -> None:
                rec["total"] = total

            def close(self) -> None:
                rec["closed"] = True

        return T()


@dataclasses.dataclass
class Reading:
    """A capture's side of a disk reader process: its repository, writer and disk stream,
    the child, and the NBD socket serving the image (as export "disk")."""

    location: str
    repo: Repository
    w: ArchiveWriter
    sink: Any
    dp: DP.DiskProcess
    sock: str
    progress: Recorder

    def read(self, export: str = "disk") -> None:
        self.dp.start("vda", self.sink, socket=self.sock, export=export)

    def read_and_fail(self, match: str, export: str = "disk") -> VmarchiveError:
        """Read; the reads fail with an error matching ``match``, in one line, and no slot
        of the stream is set."""
        self.read(export)
        self.dp.join()
        with pytest.raises(VmarchiveError, match=match) as err:
            self.dp.raise_first()
        assert "\n" not in str(err.value)
        assert self.nothing_set()
        return err.value

    def nothing_set(self) -> bool:
        table: bytes = self.sink.table()
        return table == bytes(len(table))


PASSPHRASE = "dp-pass"
#: an encrypted repository (with scrypt parameters for tests)
ENCRYPTED = InitOptions(
    encryption=C.ENCRYPTION_AES256GCM, passphrase=PASSPHRASE, scrypt=TEST_SCRYPT
)


@contextlib.contextmanager
def reading(
    tmp_path: pathlib.Path,
    image: pathlib.Path,
    *,
    repo_for_child: str | None = None,
    chunk_size: int | None = None,
    options: InitOptions | None = None,
    before_spawn: Callable[[Repository], None] = lambda repo: None,
) -> Iterator[Reading]:
    loc = str(tmp_path / "repo")
    Repository.init(loc, options).close()
    repo = Repository.open(loc, PASSPHRASE)
    rec = Recorder()
    with CD.local_nbd(str(image), "qcow2") as sock, repo.writer() as w:
        sink = w.stream("disk:vda", "disk", SIZE, chunk_size=chunk_size)
        before_spawn(repo)
        dp = DP.DiskProcess.spawn(repo_for_child or loc, w, rec)
        yield Reading(loc, repo, w, sink, dp, sock, rec)


def keys_moved_away(loc: str) -> Callable[[Repository], None]:
    """Before the child starts: the repository's key files go away (back after the
    test's reads), so a child that unlocked them with a passphrase could not open it."""

    def move(repo: Repository) -> None:
        keys = pathlib.Path(loc) / "keys"
        assert list(keys.iterdir()), "an encrypted repository has key files"
        keys.rename(keys.with_name("keys.away"))

    return move


def keys_back(loc: str) -> None:
    away = pathlib.Path(loc) / "keys.away"
    if away.exists():
        away.rename(away.with_name("keys"))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_the_child_stores_the_disk_and_the_writer_commits_it(
    tmp_path: pathlib.Path, image: pathlib.Path, raw: bytes, encrypted: bool
) -> None:
    """Encrypted: the child opens the repository with the parent's key material, without
    its key files (moved away while it runs): no passphrase, no key derivation."""
    loc = str(tmp_path / "repo")
    options, move = (ENCRYPTED, keys_moved_away(loc)) if encrypted else (None, lambda r: None)
    with reading(tmp_path, image, options=options, before_spawn=move) as rd:
        rd.read()
        rd.dp.end_input()
        rd.dp.join()
        keys_back(loc)
        rd.dp.raise_first()
        st = rd.sink.close()
        archive = rd.w.commit(META)
    assert rd.repo.codecs.config.encrypted == encrypted
    r = rd.dp.results["vda"]
    assert rd.dp._proc.returncode == 0
    assert st.bytes_new == 0, "the parent stored nothing itself"
    # 3 MiB random + 1 MiB of one byte + the random tail: each read once, the
    # random data stored (the repeated byte compresses)
    assert r.bytes_read >= 4 * MiB + 20 * KiB
    assert r.bytes_stored >= 3 * MiB
    (task,) = [t for t in rd.progress.tasks if t["name"] == "disk vda"]
    assert task["done"] == r.bytes_read and task["closed"]
    # a fresh open (another process's view: only what is durable) reads the disk back
    again = Repository.open(rd.location, PASSPHRASE)
    assert again.open_stream(archive, "disk:vda").read_all() == raw
    report = again.verify(full=True)
    assert report.ok, report.problems


def test_without_adoption_the_tables_name_chunks_the_writer_does_not_know(
    tmp_path: pathlib.Path, image: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative control of the adoption: the child's chunks are unknown to the
    capture's writer until it takes in the child's index objects."""
    monkeypatch.setattr(ArchiveWriter, "adopt_index", lambda self, names: 0)
    with reading(tmp_path, image) as rd:
        rd.read_and_fail("not in the repository")


def test_a_child_writing_under_another_key_fails_the_adoption(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    """The key the child is given is not checked when it opens the repository; what it
    writes under a wrong one fails authentication when the capture adopts it."""

    def wrong_key(repo: Repository) -> None:
        repo.codecs.key = KeyMaterial.generate()

    with reading(tmp_path, image, options=ENCRYPTED, before_spawn=wrong_key) as rd:
        rd.read_and_fail("authentication failed")
    assert rd.repo.list_archives() == []


def test_a_failed_read_fails_in_one_line_and_nothing_is_adopted(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    with reading(tmp_path, image) as rd:
        err = rd.read_and_fail("nosuch", export="nosuch")
        assert isinstance(err, HypervisorError)  # NBDError, as on a thread
        assert rd.dp._proc.returncode == 0  # it reported the failure and aborted
    assert rd.repo.list_archives() == []


def test_cancel_stops_the_child_and_adopts_nothing(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    with reading(tmp_path, image) as rd:
        rd.read()
        rd.dp.cancel()
        t = time.monotonic()
        rd.dp.join()
        assert time.monotonic() - t < 20
        assert rd.dp._proc.returncode is not None
        assert rd.nothing_set()
        assert rd.dp._published is None and rd.dp._aborted == "cancelled"


def test_a_stream_of_another_chunk_size_is_refused_not_misfilled(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    with reading(tmp_path, image, chunk_size=64 * KiB) as rd:
        assert rd.sink.chunk_size != rd.repo.codecs.default_chunk_size("disk")
        rd.read_and_fail("does not fit")


def test_a_killed_child_is_an_error_not_a_hang(tmp_path: pathlib.Path, image: pathlib.Path) -> None:
    with reading(tmp_path, image) as rd:
        rd.dp._proc.kill()
        rd.read_and_fail("without a result")


def test_a_repository_the_child_cannot_open_is_reported(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    with reading(tmp_path, image, repo_for_child=str(tmp_path / "elsewhere")) as rd:
        rd.read_and_fail("cannot open the repository")


def test_errors_come_back_as_their_class_or_as_an_internal_error() -> None:
    e = DP._error_of({"type": "InterruptedError_", "message": "reading disk vda cancelled"})
    assert type(e) is InterruptedError_ and str(e) == "reading disk vda cancelled"
    assert type(DP._error_of({"type": "UsageError", "message": "x"})) is UsageError
    other = DP._error_of({"type": "KeyError", "message": "'x'"})
    assert type(other) is VmarchiveError and "KeyError" in str(other)
    assert type(DP._error_of({"type": "getLogger", "message": "x"})) is VmarchiveError


#: A capture's process as far as the forked child goes (a process of its own: the fork
#: must happen while it runs one thread, which pytest's process cannot promise).  Every
#: process that runs the exit handlers writes its pid to argv[4].
_FORKING = """
import atexit, json, os, sys, threading
from vmarchive.ops import capture_disks as CD, disk_process as DP
from vmarchive.progress import NULL_PROGRESS
from vmarchive.store import Repository

loc, image, size, exits, mode = sys.argv[1:6]
atexit.register(lambda: open(exits, "a").write(f"{os.getpid()}\\n"))
out = {}
if mode == "threads":
    ev = threading.Event()
    t = threading.Thread(target=ev.wait)
    t.start()
    out["with_a_thread"] = DP.fork_reader() is not None
    ev.set()
    t.join()
forked = DP.fork_reader()
out["forked"] = forked is not None
if mode == "plain":  # the control: a child that ends as the caller would
    if os.fork() == 0:
        sys.exit(0)
    os.wait()
elif mode == "read":
    repo = Repository.open(loc)
    with CD.local_nbd(image, "qcow2") as sock, repo.writer() as w:
        sink = w.stream("disk:vda", "disk", int(size))
        dp = DP.DiskProcess.spawn(loc, w, NULL_PROGRESS, forked)
        out["same_child"] = dp.pid == forked.pid
        dp.start("vda", sink, socket=sock, export="disk")
        dp.end_input()
        dp.join()
        dp.raise_first()
        out["parent_stored"] = sink.close().bytes_new
        out["archive"] = w.commit({"time": "2026-11-29T00:00:00Z", "domain": "dp", "kind": "capture"})
    out["claimed"] = forked.claimed
    forked.dismiss()  # as the capture does at its end: nothing more to do
if forked is not None:
    forked.dismiss()
    out["rc"] = forked.returncode
print(json.dumps(out))
"""


def forking(tmp_path: pathlib.Path, image: pathlib.Path, mode: str) -> tuple[dict[str, Any], str]:
    """Run :data:`_FORKING` in ``mode``; its output, and the pids that ran exit handlers."""
    loc = str(tmp_path / "repo")
    Repository.init(loc, None).close()
    exits = tmp_path / "exits"
    p = subprocess.run(
        [sys.executable, "-c", _FORKING, loc, str(image), str(SIZE), str(exits), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), exits.read_text()


def test_a_forked_child_reads_the_disk_and_leaves_the_parent_its_exit(
    tmp_path: pathlib.Path, image: pathlib.Path, raw: bytes
) -> None:
    """The child forked before the capture's threads start reads and stores the disk as
    a spawned one does, and ends without running the capture's exit handlers."""
    out, exits = forking(tmp_path, image, "read")
    assert out["forked"] and out["same_child"] and out["claimed"]
    assert out["parent_stored"] == 0, "the parent stored nothing itself"
    assert out["rc"] == 0
    assert len(exits.split()) == 1, f"exit handlers ran in the child too: {exits!r}"
    again = Repository.open(str(tmp_path / "repo"))
    assert again.open_stream(out["archive"], "disk:vda").read_all() == raw
    report = again.verify(full=True)
    assert report.ok, report.problems


def test_a_dismissed_child_exits_at_once_and_runs_nothing_of_the_parent(
    tmp_path: pathlib.Path, image: pathlib.Path
) -> None:
    out, exits = forking(tmp_path, image, "dismiss")
    assert out == {"forked": True, "rc": 0}
    assert len(exits.split()) == 1, exits
    # the control: a forked child that returns into the caller's code runs its handlers
    _out, exits = forking(tmp_path / "control", image, "plain")
    assert len(exits.split()) == 2, exits


def test_no_fork_while_another_thread_runs(tmp_path: pathlib.Path, image: pathlib.Path) -> None:
    out, _exits = forking(tmp_path, image, "threads")
    assert out["with_a_thread"] is False
    assert out["forked"] is True, "the control: one thread again, the fork is made"
