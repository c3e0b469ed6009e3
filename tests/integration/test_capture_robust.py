"""Capture in the corners issue 4 names: a disk on a block device, 1 GiB of RAM, a domain
that vanishes mid-capture, a repository disk that fills up.

Each test reuses the archive checks of ``test_capture.py`` (counter page in the archived
RAM against the tick block on the archived disk; nothing of ours left in QEMU) and adds
its own truth:

* block device: the whole loop device read while the capture holds the guest at its
  instant (``VMARCHIVE_HOLD_AT``) equals the archived disk; a read after the capture
  (the guest ticked on) must differ (the negative control);
* vanished domain / full disk: the CLI prints one line and exits non-zero, no archive is
  listed, the repository verifies, no marker or temporary file stays, and the next
  capture works.  Leftover checks are shown to see what they look for (the held
  capture's work directory and marker; the bitmap a good capture leaves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt
import pytest
from test_capture import observe, qemu_leftovers, snapshot_reason

from vmarchive.errors import BackendError, HypervisorError, StreamError, StreamRefusedError
from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops import capture_parse, capture_parsed
from vmarchive.ops.capture import CaptureOptions, CaptureResult, Mode, _Capture, capture
from vmarchive.ops.capture_cleanup import PREFIX
from vmarchive.ops.capture_memory import PipeReader
from vmarchive.progress import NULL_PROGRESS
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions
from vmarchive.store.writer import ArchiveWriter

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

T = TypeVar("T")
MiB = 1024 * 1024


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def env(vm_workdir: pathlib.Path) -> dict[str, pathlib.Path]:
    """A repository, a state dir (markers, locks) and a TMPDIR (capture work dirs)."""
    for d in ("state", "tmp"):
        (vm_workdir / d).mkdir()
    return {
        "base": vm_workdir,
        "repo": vm_workdir / "repo",
        "state": vm_workdir / "state",
        "tmp": vm_workdir / "tmp",
    }


def init_repo(path: pathlib.Path) -> None:
    Repository.init(str(path), InitOptions()).close()


def opts(g: guestlib.Guest, env: dict[str, pathlib.Path], mode: Mode) -> CaptureOptions:
    return CaptureOptions(
        domain=g.name,
        repo=str(env["repo"]),
        uri=guestlib.URI,
        mode=mode,
        state_dir=env["state"],
        work_dir=env["tmp"],
    )


def need_snapshot(g: guestlib.Guest, mode: Mode) -> None:
    if mode == Mode.SNAPSHOT and (why := snapshot_reason(g)) is not None:
        pytest.skip(f"snapshot mode unavailable here: {why}")


def our_bitmaps(g: guestlib.Guest) -> list[str]:
    """``node/bitmap [(frozen)]`` of every vmarchive dirty bitmap in the guest's QEMU."""
    with Connection.open(guestlib.URI) as c:
        nodes = QMP(c.lookup(g.name)).execute("query-named-block-nodes", {"flat": True})
    return [
        f"{n['node-name']}/{b['name']}" + ("" if b.get("recording") else " (frozen)")
        for n in nodes
        for b in n.get("dirty-bitmaps") or []
        if str(b.get("name", "")).startswith(PREFIX)
    ]


def leftover_files(env: dict[str, pathlib.Path]) -> list[str]:
    """Markers and temporary files a capture may leave (its lock file is kept on purpose)."""
    out = [p.name for p in env["state"].iterdir() if not p.name.endswith(".lock")]
    return out + [p.name for p in env["tmp"].iterdir()]


def archive_ids(repo: pathlib.Path) -> set[str]:
    with Repository.open(str(repo)) as r:
        return set(r.archive_ids())


def verify_ok(repo: pathlib.Path, full: bool = True) -> None:
    with Repository.open(str(repo)) as r:
        report = r.verify(full=full)
    assert report.ok, report.problems


def keeps_ticking(g: guestlib.Guest, mark: int) -> None:
    n0 = g.last_tick(mark).n if g.serial.ticks(mark) else 0
    g.wait_for("ticks after the capture", lambda: g.last_tick(mark).n > n0 + 2 or None, 60)


def cli(args: list[str], env: dict[str, pathlib.Path], **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmarchive", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "VMARCHIVE_STATE_DIR": str(env["state"]),
            "TMPDIR": str(env["tmp"]),
            **extra,
        },
    )


def one_line_failure(p: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    """Wait for a CLI run that must fail with one ``vmarchive:`` line; (exit code, line)."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode not in (0, None), (p.returncode, out, err)
    # Log lines (WARNING ...) may precede it, but none from a cleanup or the watchdog:
    # a cleanup that worked is silent.
    lines = [x for x in err.strip().splitlines() if not x.startswith(("WARNING ", "INFO "))]
    assert len(lines) == 1 and lines[0].startswith("vmarchive: "), err
    assert not any(
        w in err for w in ("Traceback", ": cleanup:", "incomplete", "vmarchive watchdog")
    ), err
    return p.returncode, lines[0]


class Hold:
    """``VMARCHIVE_HOLD_AT`` for one point: wait until a capture reaches it, release it."""

    def __init__(self, where: pathlib.Path, point: str) -> None:
        self.where, self.point = where, point
        where.mkdir(exist_ok=True)

    @property
    def env(self) -> str:
        return f"{self.point}:{self.where}"

    def wait(self, alive: Callable[[], bool]) -> bool:
        reached = self.where / f"{self.point}.reached"
        while not reached.exists() and alive():
            time.sleep(0.01)
        return reached.exists()

    def release(self) -> None:
        (self.where / f"{self.point}.release").touch()


def held_capture(
    o: CaptureOptions,
    hold: Hold,
    monkeypatch: pytest.MonkeyPatch,
    at_hold: Callable[[], T],
) -> tuple[CaptureResult, T]:
    """Capture in a thread, held at ``hold.point``; ``at_hold()`` runs there."""
    monkeypatch.setenv("VMARCHIVE_HOLD_AT", hold.env)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["r"] = capture(o)
        except BaseException as e:  # re-raised below
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    try:
        assert hold.wait(t.is_alive), f"capture never reached {hold.point}: {box}"
        seen = at_hold()
    finally:
        hold.release()
        t.join()
        monkeypatch.delenv("VMARCHIVE_HOLD_AT")
    if "e" in box:
        raise box["e"]
    return box["r"], seen


# --- 1. a disk on a block device ----------------------------------------------------------


@contextlib.contextmanager
def loop_device(image: pathlib.Path, size_mib: int) -> Iterator[str]:
    subprocess.run(["truncate", "-s", f"{size_mib}M", str(image)], check=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.fixture(scope="module")
def block_guest(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str]
) -> Iterator[tuple[guestlib.Guest, str]]:
    """A guest whose vda (the tick block) is a loop device, ``<disk type='block'>`` raw."""
    wd = guestlib.make_workdir()
    spec = guestlib.GuestSpec(disks=(guestlib.DiskSpec(fmt="raw", size_mib=32),))
    g = guestlib.Guest(libvirt_conn, spec, wd)
    try:
        with loop_device(g.disk_paths[0], 32) as dev:
            src = "<disk type='file' device='disk'>\n      <driver name='qemu' type='raw'"
            assert src in g.xml
            g.xml = g.xml.replace(src, src.replace("type='file'", "type='block'"), 1).replace(
                f"<source file='{g.disk_paths[0]}'/>", f"<source dev='{dev}'/>", 1
            )
            g.start()
            try:
                g.wait_up()
                g.wait_ticks(3)
                yield g, dev
            finally:
                g.cleanup()
    finally:
        shutil.rmtree(wd, ignore_errors=True)


@pytest.mark.parametrize("mode", [Mode.SWITCHOVER, Mode.SNAPSHOT])
def test_block_device_disk_is_the_device_at_the_instant(
    block_guest: tuple[guestlib.Guest, str],
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
    mode: Mode,
) -> None:
    g, dev = block_guest
    need_snapshot(g, mode)
    init_repo(env["repo"])
    assert f"dev='{dev}'" in g.dom.XMLDesc(0)

    def read_device() -> bytes:
        with open(dev, "rb") as f:
            return f.read()

    # At this point the disk view is fixed and the guest stopped (switchover: at
    # pre-switchover; snapshot: before `migrate`), so the device holds the instant.
    hold = Hold(env["base"] / "hold", "capture-disks-fixed")
    r, at_instant = held_capture(opts(g, env, mode), hold, monkeypatch, read_device)
    assert r.mode == mode.value
    (vda,) = [d for d in r.disks if d.target == "vda"]
    assert vda.copied and vda.size == 32 * MiB
    with Repository.open(str(env["repo"])) as repo:
        archive = repo.load_archive(r.id)
        assert archive.stream("disk:vda").attrs["source_type"] == "block"
        archived = repo.open_stream(archive, "disk:vda").read_range(0, 32 * MiB)
        ob = observe(repo, r.id, str(g.boot_id))
    assert ob.consistent, f"RAM and block-device disk from different instants: {ob}"
    assert archived == at_instant, "archived disk differs from the device at the instant"
    # Negative control: the device a moment later (more ticks) is not the archive.
    g.wait_tick(ob.disk_counter + 2)
    assert read_device() != archived, "a later read matched: the comparison is blind"
    assert qemu_leftovers(g) == []
    print(
        f"block device {mode.value}: pause incl. the hold {r.guest_pause_ms:.1f} ms, read {vda.bytes_read} "
        f"of {vda.size} bytes, tick {ob.disk_counter}"
    )


# --- 2. a guest with 1 GiB of RAM ---------------------------------------------------------


def test_one_gib_guest(
    guest_factory: guestlib.GuestFactory,
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Snapshot mode also shows here that the set-up gate's check fires: without the
    channel's filler QEMU takes the RAM instant before the disks are fixed, and the capture
    must refuse (and leave nothing); the gated capture that follows is consistent.

    The check is asked 3 s after QEMU is seen waiting: a QEMU past the gate has
    write-protected the guest's RAM by then and its main loop may block on a protected
    page, so the check's own query hung until the capture drained the channel (it hung
    forever in one CI run before it did)."""
    g = guest_factory(guestlib.GuestSpec(memory_mib=1024, params={"fill": 16}))
    g.wait_ticks(2)
    mode = Mode.SNAPSHOT if snapshot_reason(g) is None else Mode.SWITCHOVER
    init_repo(env["repo"])
    mark = g.serial.mark()
    if mode == Mode.SNAPSHOT:
        seen = _Capture._snapshot_gate

        def late(self: _Capture, pid: int | None) -> bool:
            blocked = seen(self, pid)
            time.sleep(3)
            return blocked

        with monkeypatch.context() as m:
            m.setattr(_Capture, "_snapshot_gate", late)
            with pytest.raises(HypervisorError, match="did not wait at the set-up gate"):
                capture(dataclasses.replace(opts(g, env, mode), open_gate=True))
        assert archive_ids(env["repo"]) == set()
        assert qemu_leftovers(g) == [] and leftover_files(env) == []
        keeps_ticking(g, mark)
    gate_seen: list[bool] = []
    if mode == Mode.SNAPSHOT:
        real = _Capture._snapshot_gate

        def noting(self: _Capture, pid: int | None) -> bool:
            gate_seen.append(real(self, pid))
            return gate_seen[-1]

        monkeypatch.setattr(_Capture, "_snapshot_gate", noting)
    r = capture(opts(g, env, mode))
    # /proc showed QEMU's thread waiting on the filled channel (else the pause would have
    # taken in the rest of QEMU's set-up: still correct, but not what the gate is for)
    assert gate_seen == ([True] if mode == Mode.SNAPSHOT else []), gate_seen
    assert r.mode == mode.value and r.memory_format == "parsed"
    assert r.guest_pause_ms is not None and r.guest_pause_ms > 0
    with Repository.open(str(env["repo"])) as repo:
        a = repo.load_archive(r.id)
        mem = a.metadata["memory"]
        ram = {s.name: s.size for s in a.streams if s.kind == "ram"}
        ob = observe(repo, r.id, str(g.boot_id))
    assert mem["format"] == "parsed" and mem["roundtrip"]["ok"], mem
    assert ram.get("ram:pc.ram") == 1024 * MiB, ram
    assert a.metadata["guest_pause_ms"] == r.guest_pause_ms
    assert ob.consistent, ob
    keeps_ticking(g, mark)
    assert qemu_leftovers(g) == []
    print(
        f"1 GiB {mode.value}: pause {r.guest_pause_ms:.1f} ms, read {r.bytes_read / MiB:.0f} MiB, "
        f"stored {r.bytes_stored / MiB:.0f} MiB in {r.duration_s:.1f} s"
    )


# --- 3. the domain vanishes mid-capture ---------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.SNAPSHOT, Mode.SWITCHOVER])
def test_domain_destroyed_while_memory_streams(
    guest_factory: guestlib.GuestFactory, env: dict[str, pathlib.Path], mode: Mode
) -> None:
    g = guest_factory(guestlib.GuestSpec(params={"fill": 32, "churn": 16}))
    need_snapshot(g, mode)
    g2 = guest_factory(guestlib.GuestSpec(), wait=False)  # the next guest, booting meanwhile
    init_repo(env["repo"])
    hold = Hold(env["base"] / "hold", "capture-migrating")
    p = cli(
        ["capture", g.name, "--repo", str(env["repo"]), "--mode", mode.value, "--no-progress"],
        env,
        VMARCHIVE_HOLD_AT=hold.env,
    )
    try:
        assert hold.wait(lambda: p.poll() is None), p.communicate()
        # Held with the migration started: a marker and a work dir exist (what the
        # leftover check below looks for), and QEMU is streaming memory.
        assert leftover_files(env), "the leftover check cannot see a running capture"
        with Connection.open(guestlib.URI) as c:
            st = QMP(c.lookup(g.name)).execute("query-migrate")
        assert st.get("status") in ("setup", "active", "pre-switchover"), st
        g.destroy()
    finally:
        hold.release()
    code, line = one_line_failure(p)
    print(f"{mode.value}: exit {code}: {line}")
    assert code == 5 and g.name in line and "stopped during the capture" in line, line
    assert archive_ids(env["repo"]) == set()
    verify_ok(env["repo"])
    assert leftover_files(env) == []
    # The next capture, of a new guest, works.
    g2.wait_up()
    r = capture(opts(g2, env, mode))
    with Repository.open(str(env["repo"])) as repo:
        assert observe(repo, r.id, str(g2.boot_id)).consistent
    assert archive_ids(env["repo"]) == {r.id}
    assert leftover_files(env) == []


def test_truncated_stream_ends_the_pipe_reader(tmp_path: pathlib.Path) -> None:
    """What the destroyed domain looks like to the memory side, without a guest: the
    stream ends mid-record.  The parser's error, not a hang, must end the reader (it
    used to wait for a second end-of-stream marker, and the capture hung forever)."""
    init_repo(tmp_path / "repo")
    with Repository.open(str(tmp_path / "repo")) as repo, repo.writer() as w:
        consumer = capture_parse.make_consumer(w, True)
        rfd, wfd = os.pipe()
        reader = PipeReader(rfd, consumer, NULL_PROGRESS.task("memory"))
        reader.start()
        os.write(wfd, b"QEVM\x00\x00\x00\x03\x07")  # header, then a cut section
        # Control: while the stream is open the reader waits (the check below can fail).
        reader.join(0.5)
        assert reader.is_alive()
        os.close(wfd)
        reader.join(60)  # a hang guard, not a timing
        assert not reader.is_alive(), "the pipe reader hangs on a truncated stream"
        assert isinstance(reader.error, StreamError), reader.error


# --- 4. the repository's disk fills up ----------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size_mib: int) -> Iterator[pathlib.Path]:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def resize(mnt: pathlib.Path, size_mib: int | None = None, free_mib: int = 1) -> None:
    """Resize the tmpfs to ``size_mib``, or to what it holds plus ``free_mib``."""
    if size_mib is None:
        st = os.statvfs(mnt)
        size_mib = (st.f_blocks - st.f_bfree) * st.f_frsize // MiB + free_mib
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(mnt)], check=True)


def fails_for_space(g: guestlib.Guest, env: dict[str, pathlib.Path], mode: Mode) -> None:
    """A CLI capture into the full repository: one line, exit 3; the guest runs on and
    nothing of the capture is left in QEMU or on the host."""
    mark = g.serial.mark()
    before = archive_ids(env["repo"])
    p = cli(
        ["capture", g.name, "--repo", str(env["repo"]), "--mode", mode.value, "--no-progress"],
        env,
    )
    code, line = one_line_failure(p)
    print(f"{mode.value}: exit {code}: {line}")
    assert code == 3 and "No space left on device" in line, line
    keeps_ticking(g, mark)
    assert qemu_leftovers(g) == []
    assert leftover_files(env) == []
    assert archive_ids(env["repo"]) == before


@pytest.mark.parametrize("mode", [Mode.SNAPSHOT, Mode.SWITCHOVER])
def test_full_repository_disk(
    guest_factory: guestlib.GuestFactory, env: dict[str, pathlib.Path], mode: Mode
) -> None:
    # 48 MiB of random RAM cannot fit in 24 MiB; the churn (~0.8 MiB per tick) fills
    # the 1 MiB left after a first archive.
    g = guest_factory(guestlib.GuestSpec(params={"fill": 48, "churn": 4}))
    need_snapshot(g, mode)
    with tmpfs(env["base"] / "mnt", 24) as mnt:
        env["repo"] = mnt / "repo"
        init_repo(env["repo"])
        # 1. A first capture that does not fit: the bitmap it started is gone again.
        fails_for_space(g, env, mode)
        assert our_bitmaps(g) == []
        resize(mnt, 256)
        verify_ok(env["repo"], full=False)
        a = capture(opts(g, env, mode))
        with Repository.open(str(env["repo"])) as repo:
            assert observe(repo, a.id, str(g.boot_id)).consistent
        # The bitmap check sees the one bitmap a committed capture leaves.
        (tracking,) = our_bitmaps(g)
        # 2. An incremental capture that does not fit: the parent's bitmap records again
        # (with the failed capture's writes merged in), the new one is gone.
        resize(mnt, free_mib=1)
        g.wait_tick(g.last_tick().n + 10)
        fails_for_space(g, env, mode)
        assert our_bitmaps(g) == [tracking]
        resize(mnt, 256)
        verify_ok(env["repo"], full=False)
        b = capture(opts(g, env, mode))
        with Repository.open(str(env["repo"])) as repo:
            assert observe(repo, b.id, str(g.boot_id)).consistent
        assert [d.incremental for d in b.disks if d.target == "vda"] == [True], b.disks
        assert archive_ids(env["repo"]) == {a.id, b.id}
        verify_ok(env["repo"])
        assert qemu_leftovers(g) == [] and leftover_files(env) == []
        print(
            f"stored {a.bytes_stored / MiB:.1f} MiB, then {b.bytes_stored / MiB:.1f} MiB "
            f"(incremental) once space was freed"
        )


def test_packs_failing_beside_the_round_trip(
    guest_factory: guestlib.GuestFactory,
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packs go out while the memory's round trip still reads what the capture stored
    (ArchiveWriter.flush).  When that fails, the capture fails as any storage failure does
    -- once the round trip stopped reading from the writer it is about to lose.  The
    round trip is slowed so that, were it not waited for, it would still be reading when
    the writer is aborted (what the control, run without the wait, showed)."""
    g = guest_factory(guestlib.GuestSpec(params={"fill": 16}))
    init_repo(env["repo"])
    check = capture_parse.roundtrip_check
    reading_at_abort: list[bool] = []

    def slow_check(*args: Any, **kw: Any) -> Any:
        time.sleep(2)
        return check(*args, **kw)

    def failing_flush(self: ArchiveWriter) -> None:
        raise BackendError("the repository's disk is gone (test)")

    abort = ArchiveWriter.abort

    def watched_abort(self: ArchiveWriter) -> None:
        reading_at_abort.append(
            any(t.name == "memory-roundtrip" and t.is_alive() for t in threading.enumerate())
        )
        abort(self)

    monkeypatch.setattr(capture_parse, "roundtrip_check", slow_check)
    monkeypatch.setattr(ArchiveWriter, "flush", failing_flush)
    monkeypatch.setattr(ArchiveWriter, "abort", watched_abort)
    with pytest.raises(BackendError, match="disk is gone"):
        capture(opts(g, env, Mode.SWITCHOVER))
    assert reading_at_abort and not reading_at_abort[0]
    assert archive_ids(env["repo"]) == set()
    verify_ok(env["repo"], full=False)
    assert qemu_leftovers(g) == [] and leftover_files(env) == []
    assert g.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


# --- 5. a capture taken again with its stream stored opaquely -----------------------------


def test_a_capture_retried_opaquely_is_readable_by_every_process(
    libvirt_conn: libvirt.virConnect,
    guest_build: dict[str, str],
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parser may refuse a stream at its very end (a device section comes after all of
    RAM); the capture is then taken again, stream stored opaquely, by the same process
    with the same Repository object.  The first attempt had stored the disks in packs it
    published: the retry must not deduplicate against chunks no index object names.  It
    did (the control, run on the code before the fix): the capture's own round trip
    passed, and a fresh Repository -- any other process -- could not read vdb
    (ChunkMissingError).  Small packs and a disk of random data make the first attempt
    publish (and wait for) disk packs; the refusal waits until the disks are read."""
    wd = guestlib.make_workdir()
    spec = guestlib.GuestSpec(disks=(guestlib.DiskSpec(), guestlib.DiskSpec(size_mib=32)))
    g = guestlib.Guest(libvirt_conn, spec, wd)
    data = os.urandom(32 * MiB)
    try:
        g.create_disks()
        raw = wd / "vdb.raw"
        raw.write_bytes(data)
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(g.disk_paths[1])],
            check=True,
        )
        raw.unlink()
        g.start()
        g.wait_up()
        Repository.init(str(env["repo"]), InitOptions(pack_size=2 * MiB)).close()
        finish = capture_parsed.ParsedConsumer.finish
        refused: list[float] = []

        def refuse_at_the_end(self: capture_parsed.ParsedConsumer) -> None:
            finish(self)
            if not refused:
                time.sleep(3)  # the disks are read by then (32 MiB, in well under 1 s)
                refused.append(time.monotonic())
                raise StreamRefusedError("device section refused (test)")

        monkeypatch.setattr(capture_parsed.ParsedConsumer, "finish", refuse_at_the_end)
        r = capture(opts(g, env, Mode.SWITCHOVER))
        assert refused and r.memory_format == "opaque", r
        with Repository.open(str(env["repo"])) as repo:  # another process's view
            a = repo.load_archive(r.id)
            assert repo.open_stream(a, "disk:vdb").read_range(0, 32 * MiB) == data
            assert "refused" in str(a.metadata["memory"])
        verify_ok(env["repo"])
        assert qemu_leftovers(g) == [] and leftover_files(env) == []
    finally:
        g.cleanup()
        shutil.rmtree(wd, ignore_errors=True)
