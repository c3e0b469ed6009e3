"""Live capture against real libvirt guests: RAM and disk from ONE instant, cleanup, kills.

One workload guest (tests/guestlib.py) is shared by the whole module (TCG boots are slow).
Consistency is checked on the archive itself: the workload's counter page found in the
archived RAM (by its magic) against the tick block on the archived disk.  The negative
control delays the disk view by a second and must be caught by the same check.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass

import libvirt
import pytest

from vmarchive.errors import (
    DomainNotFoundError,
    HostPreconditionError,
    HypervisorError,
    LockedError,
    RepositoryNotFoundError,
    UsageError,
)
from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops.capture import CaptureOptions, CaptureResult, Mode, capture, snapshot_supported
from vmarchive.ops.capture_cleanup import PREFIX
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

# --- reading the archive -------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    ram_last_written: int
    ram_counter: int
    disk_counter: int
    boot_id: str
    ram_in_check: int

    @property
    def consistent(self) -> bool:
        # The workload writes tick N to disk, then records N in RAM.  An instant between the
        # two (the write drained by QEMU at the stop, not yet seen by the guest) legally
        # shows the disk one ahead, with the RAM counter not yet advanced either, and the
        # guest inside its check-and-write of N.
        if self.disk_counter == self.ram_last_written:
            return True
        return (
            self.disk_counter == self.ram_last_written + 1
            and self.ram_counter == self.ram_last_written
            and self.ram_in_check == self.disk_counter
        )


def _counter_in_ram(repo: Repository, archive_id: str, boot_id: str) -> guestlib.CounterPage:
    archive = repo.load_archive(archive_id)
    found: list[guestlib.CounterPage] = []
    ram = [s for s in archive.streams if s.kind == "ram"]
    if ram:
        for s in ram:
            reader = repo.open_stream(archive, s.name)
            for _off, data in reader.iter_chunks():
                if data is None:
                    continue
                for p in range(0, len(data), guestlib.PAGE):
                    cp = guestlib.parse_counter_page(data[p : p + guestlib.COUNTER_BYTES])
                    if cp is not None and cp.boot_id == boot_id:
                        found.append(cp)
        assert len(found) == 1, f"expected one counter page in the RAM image, found {found}"
        return found[0]
    # Opaque stream: pages appear once per pass that sent them; the last copy is final.
    (stream,) = [s for s in archive.streams if s.kind == "stream"]
    data = repo.open_stream(archive, stream.name).read_all()
    pos = data.rfind(guestlib.COUNTER_MAGIC)
    while pos >= 0:
        cp = guestlib.parse_counter_page(data[pos : pos + guestlib.COUNTER_BYTES])
        if cp is not None and cp.boot_id == boot_id:
            return cp
        pos = data.rfind(guestlib.COUNTER_MAGIC, 0, pos)
    raise AssertionError("no counter page in the archived migration stream")


def observe(repo: Repository, archive_id: str, boot_id: str) -> Observed:
    archive = repo.load_archive(archive_id)
    disk = repo.open_stream(archive, "disk:vda").read_range(guestlib.TICK_OFFSET, guestlib.PAGE)
    tick = guestlib.parse_tick_block(disk)
    assert tick is not None and tick.boot_id == boot_id, "no tick block on the archived disk"
    cp = _counter_in_ram(repo, archive_id, boot_id)
    return Observed(cp.last_written, cp.counter, tick.counter, boot_id, cp.in_check)


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def conn(libvirt_conn: libvirt.virConnect) -> libvirt.virConnect:
    return libvirt_conn


@pytest.fixture(scope="module")
def guest(module_guest_factory: guestlib.GuestFactory) -> guestlib.Guest:
    """One guest for the module: qcow2 vda (tick block) + raw vdb under the random writer,
    RAM churn, 100 ms ticks."""
    spec = guestlib.GuestSpec(
        memory_mib=160,
        disks=(guestlib.DiskSpec(), guestlib.DiskSpec(fmt="raw", size_mib=16)),
        params={"tick_ms": 100, "churn": 16, "writer": guestlib.TWO_DISK_WRITER_SEED},
    )
    g = module_guest_factory(spec)
    g.wait_ticks(3)
    return g


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("capture")
    repo = base / "repo"
    Repository.init(str(repo), InitOptions()).close()
    state = base / "state"
    state.mkdir()
    return {"repo": repo, "state": state, "base": base}


def opts(g: guestlib.Guest, env: dict[str, pathlib.Path], **kw: object) -> CaptureOptions:
    return CaptureOptions(
        domain=g.name,
        repo=str(env["repo"]),
        uri=guestlib.URI,
        state_dir=env["state"],
        **kw,  # type: ignore[arg-type]
    )


def snapshot_reason(g: guestlib.Guest) -> str | None:
    with Connection.open(guestlib.URI) as c:
        ok, why = snapshot_supported(QMP(c.lookup(g.name)))
    return None if ok else why


def qemu_leftovers(g: guestlib.Guest) -> list[str]:
    """Everything vmarchive may have left in QEMU (empty when clean)."""
    with Connection.open(guestlib.URI) as c:
        q = QMP(c.lookup(g.name))
        out = [
            f"node {n['node-name']}"
            for n in q.execute("query-named-block-nodes", {"flat": True})
            if str(n["node-name"]).startswith(PREFIX)
        ]
        out += [f"job {j['id']}" for j in q.execute("query-jobs")]
        out += [f"export {e['id']}" for e in q.execute("query-block-exports")]
        out += [
            f"fdset {s['fdset-id']}"
            for s in q.execute("query-fdsets")
            if any(str(f.get("opaque", "")).startswith(PREFIX) for f in s["fds"])
        ]
        caps = {c["capability"]: c["state"] for c in q.execute("query-migrate-capabilities")}
        out += [
            f"capability {k}"
            for k in ("pause-before-switchover", "background-snapshot")
            if caps.get(k)
        ]
        st = q.execute("query-status")
        if not st["running"]:
            out.append(f"guest not running: {st['status']}")
        mig = q.execute("query-migrate").get("status")
        if mig in ("setup", "active", "pre-switchover", "device", "cancelling"):
            out.append(f"migration {mig}")
    return out


def capture_and_check(
    g: guestlib.Guest, env: dict[str, pathlib.Path], mode: Mode, **kw: object
) -> tuple[CaptureResult, Observed]:
    boot = g.boot_id
    assert boot is not None
    r = capture(opts(g, env, mode=mode, **kw))
    with Repository.open(str(env["repo"])) as repo:
        ob = observe(repo, r.id, boot)
    return r, ob


# --- tests ----------------------------------------------------------------------------------


def _series(g: guestlib.Guest, env: dict[str, pathlib.Path], mode: Mode, n: int) -> None:
    mark = g.serial.mark()
    pauses = []
    for _ in range(n):
        r, ob = capture_and_check(g, env, mode)
        assert r.mode == mode.value
        assert ob.consistent, f"RAM and disk from different instants: {ob}"
        assert r.guest_pause_ms is not None
        pauses.append(r.guest_pause_ms)
        with Repository.open(str(env["repo"])) as repo:
            meta = repo.load_archive(r.id).metadata
        assert meta["mode"] == mode.value and meta["kind"] == "full"
        assert meta["memory"]["format"] in ("parsed", "opaque")
        assert {d.target for d in r.disks if d.copied} == {"vda", "vdb"}
    # The guest lived through it, and never saw its disk disagree with its RAM.
    before = g.last_tick(mark).n if g.serial.ticks(mark) else 0
    g.wait_for("a tick after the captures", lambda: g.last_tick(mark).n > before or None, 60)
    assert g.serial.mismatches(mark) == []
    assert qemu_leftovers(g) == []
    # An incomplete cleanup (e.g. file node options not restored) keeps the marker.
    assert not list(env["state"].glob("*.json")), "capture marker left behind"
    print(
        f"{mode.value}: pauses ms {sorted(round(p, 1) for p in pauses)}, median {statistics.median(pauses):.1f}"
    )


def test_switchover_captures_are_consistent(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    _series(guest, env, Mode.SWITCHOVER, 10)


def test_snapshot_captures_are_consistent(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    why = snapshot_reason(guest)
    if why is not None:
        pytest.skip(f"snapshot mode unavailable here: {why}")
    _series(guest, env, Mode.SNAPSHOT, 10)


def test_snapshot_captures_of_huge_page_backed_guest_are_consistent(
    guest_factory: guestlib.GuestFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Guest RAM on hugetlbfs (libvirt <hugepages/>): QEMU write-protects and releases it 2 MiB
    at a time during the background snapshot, and a guest write to a page not yet sent waits
    for the whole 2 MiB page to be copied.  RAM and disks must still be from one instant."""
    spec = guestlib.GuestSpec(
        memory_mib=160,
        disks=(guestlib.DiskSpec(), guestlib.DiskSpec(fmt="raw", size_mib=16)),
        params={"tick_ms": 100, "churn": 16, "writer": guestlib.TWO_DISK_WRITER_SEED},
        hugepages=True,
    )
    base = tmp_path_factory.mktemp("hugepages")
    env = {"repo": base / "repo", "state": base / "state"}
    Repository.init(str(env["repo"]), InitOptions()).close()
    env["state"].mkdir()
    with guestlib.huge_pages_reserved(spec.memory_mib + 16):
        g = guest_factory(spec)
        try:
            pid = int((pathlib.Path("/run/libvirt/qemu") / f"{g.name}.pid").read_text())
            # what the test is about: the guest's RAM really is on huge pages
            assert guestlib.huge_page_backed_mib(pid) >= spec.memory_mib
            why = snapshot_reason(g)
            if why is not None:
                pytest.skip(f"snapshot mode unavailable here: {why}")
            g.wait_ticks(3)
            _series(g, env, Mode.SNAPSHOT, 5)
        finally:
            g.cleanup()  # before the reservation goes


def _guest_ram_huge_kib(g: guestlib.Guest) -> int:
    """AnonHugePages of QEMU's mapping of the guest's RAM (the anonymous mapping exactly
    as large as it): how much of it is mapped with 2 MiB entries."""
    pid = (pathlib.Path("/run/libvirt/qemu") / f"{g.name}.pid").read_text().strip()
    want = g.spec.memory_mib * 1024
    size = None
    found = []
    for line in pathlib.Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key == "Size":
            size = int(rest.split()[0])
        elif key == "AnonHugePages" and size == want:
            found.append(int(rest.split()[0]))
    assert len(found) == 1, f"no single {want} KiB mapping for the guest RAM: {found}"
    return found[0]


def test_snapshot_capture_leaves_guest_ram_huge_page_mapped(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    """QEMU's write tracking splits guest RAM's huge page mappings (the next capture's
    pause then grows with RAM); the capture maps them whole again afterwards."""
    if (why := snapshot_reason(guest)) is not None:
        pytest.skip(why)
    capture(opts(guest, env, mode=Mode.SNAPSHOT))
    before = _guest_ram_huge_kib(guest)
    if before == 0:
        pytest.skip("no transparent huge pages under this guest's RAM (THP off on this host)")
    # the control: without the remap the capture leaves them split (what the check sees)
    r = capture(opts(guest, env, mode=Mode.SNAPSHOT, remap_huge_pages=False))
    assert r.huge_pages is None
    split = _guest_ram_huge_kib(guest)
    assert split < before // 4, (before, split)
    r = capture(opts(guest, env, mode=Mode.SNAPSHOT))
    assert r.huge_pages is not None and r.huge_pages["skipped"] is None, r.huge_pages
    assert r.huge_pages["remapped_mib"] * 1024 >= before * 0.9
    assert _guest_ram_huge_kib(guest) >= before * 0.9, (before, r.huge_pages)
    assert qemu_leftovers(guest) == []


@pytest.mark.parametrize("mode", [Mode.SWITCHOVER, Mode.SNAPSHOT])
def test_late_disk_is_detected(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], mode: Mode
) -> None:
    """Negative control: the same check fails when the disk view is taken a second late."""
    if mode == Mode.SNAPSHOT and (why := snapshot_reason(guest)) is not None:
        pytest.skip(f"snapshot mode unavailable here: {why}")
    _r, ob = capture_and_check(guest, env, mode, disk_delay_s=1.0)
    assert not ob.consistent, f"a disk taken 1 s late must disagree with RAM: {ob}"
    assert ob.disk_counter > ob.ram_last_written + 1
    assert qemu_leftovers(guest) == []


def test_repository_verifies_and_dedups(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    a = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    b = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    with Repository.open(str(env["repo"])) as repo:
        report = repo.verify(full=True)
        assert report.ok, report.problems
        ids = [s.id for s in repo.list_archives()]
        assert a.id in ids and b.id in ids
    print(f"second capture stored {b.bytes_stored} of {b.bytes_read} bytes read")
    assert b.bytes_stored < b.bytes_read


@pytest.mark.parametrize("by_process", [True, False], ids=["disk-process", "disk-threads"])
def test_disks_read_by_a_process_or_on_threads_are_stored_and_counted(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], tmp_path: pathlib.Path, by_process: bool
) -> None:
    """A live capture reads its disks in a process of its own (vmarchive.ops.disk_process),
    or on threads of its own process (its fallback): either way a first capture into a new
    repository is consistent, verifies, and counts every disk's new bytes."""
    repo = tmp_path / "repo"
    Repository.init(str(repo), InitOptions()).close()
    mode = Mode.SWITCHOVER if snapshot_reason(guest) else Mode.SNAPSHOT
    boot = guest.boot_id
    assert boot is not None
    o = dataclasses.replace(opts(guest, env, mode=mode, disk_process=by_process), repo=str(repo))
    r = capture(o)
    with Repository.open(str(repo)) as rp:
        ob = observe(rp, r.id, boot)
        assert ob.consistent, f"RAM and disk from different instants: {ob}"
        report = rp.verify(full=True)
        assert report.ok, report.problems
    stored = {d.target: d.bytes_stored for d in r.disks if d.copied}
    assert set(stored) == {"vda", "vdb"} and all(n > 0 for n in stored.values()), stored
    assert qemu_leftovers(guest) == []


def test_the_command_forks_its_disk_reader(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    """``vmarchive capture`` forks its disk reader before it starts a thread
    (vmarchive.ops.disk_process.fork_reader), and the child reads the disks; capture()
    called from a process that runs threads (this one) spawns it instead."""
    args = ["--repo", str(env["repo"]), "--mode", "switchover", "--full", "--json"]
    p = subprocess.run(
        [sys.executable, "-m", "vmarchive", "-v", "--debug", "capture", guest.name, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "VMARCHIVE_STATE_DIR": str(env["state"])},
    )
    assert p.returncode == 0, p.stderr
    said = re.findall(r"disks read by a process of their own \(pid \d+, (\w+)\)", p.stderr)
    assert said == ["forked"], p.stderr[-3000:]
    assert all(d["bytes_read"] > 0 for d in json.loads(p.stdout)["disks"] if d["copied"])
    # the control: the same capture in this process
    caplog.set_level(logging.DEBUG, logger="vmarchive.ops.capture")
    capture(dataclasses.replace(opts(guest, env, mode=Mode.SWITCHOVER), full=True))
    said = [m for m in caplog.messages if "read by a process of their own" in m]
    assert len(said) == 1 and said[0].endswith(", spawned)"), said


def test_bad_input_is_one_clear_error(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    with pytest.raises(DomainNotFoundError):
        capture(
            opts(guest, env, mode=Mode.SWITCHOVER).__class__(
                domain="vmatest-no-such", repo=str(env["repo"])
            )
        )
    with pytest.raises(RepositoryNotFoundError):
        capture(CaptureOptions(domain=guest.name, repo=str(env["base"] / "nope")))
    cli = [sys.executable, "-m", "vmarchive", "capture"]
    for args, code in (
        (["vmatest-no-such", "--repo", str(env["repo"])], 5),
        ([guest.name, "--repo", str(env["base"] / "nope")], 3),
        (
            [
                guest.name,
                "--repo",
                str(env["repo"]),
                "--connect",
                "qemu+unix:///system?socket=/nonexistent",
            ],
            5,
        ),
    ):
        p = subprocess.run(cli + args, capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmarchive: "), p.stderr


def test_second_capture_of_same_domain_is_refused(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    from vmarchive.ops.capture_cleanup import domain_lock

    with Connection.open(guestlib.URI) as c:
        uuid = c.lookup(guest.name).uuid
    with domain_lock(env["state"], uuid, guest.name), pytest.raises(LockedError):
        capture(opts(guest, env, mode=Mode.SWITCHOVER))


def test_json_output(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmarchive",
            "capture",
            guest.name,
            "--repo",
            str(env["repo"]),
            "--mode",
            "switchover",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "VMARCHIVE_STATE_DIR": str(env["state"])},
    )
    assert p.returncode == 0, p.stderr
    obj = json.loads(p.stdout)
    for k in (
        "id",
        "domain",
        "mode",
        "guest_pause_ms",
        "bytes_read",
        "bytes_stored",
        "duration_s",
        "disks",
    ):
        assert k in obj
    assert obj["domain"] == guest.name and obj["mode"] == "switchover"


KILL_POINTS = [
    "capture-locked",
    "capture-probed",  # snapshot mode only: background-snapshot set, kept for the capture
    "capture-prepared",
    "capture-migrating",
    "capture-switchover",
    "capture-disks-fixed",
    "capture-instant",
    "capture-reading",
    "capture-committing",
    "before-manifest",
    "capture-cleaning",
]


@pytest.mark.parametrize(
    ("point", "mode"),
    [
        (point, mode)
        for point in KILL_POINTS
        for mode in (Mode.SWITCHOVER, Mode.SNAPSHOT)
        if (point, mode) != ("capture-probed", Mode.SWITCHOVER)  # probes for snapshot mode
    ],
)
def test_kill_anywhere_leaves_guest_running_and_next_run_cleans(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], point: str, mode: Mode
) -> None:
    if mode == Mode.SNAPSHOT and (why := snapshot_reason(guest)) is not None:
        pytest.skip(f"snapshot mode unavailable here: {why}")
    with Repository.open(str(env["repo"])) as repo:
        before = set(repo.archive_ids())
    mark = guest.serial.mark()
    wlog = env["state"] / f"{guest.dom.UUIDString()}.watchdog.log"
    logged = len(wlog.read_text()) if wlog.exists() else 0
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmarchive",
            "capture",
            guest.name,
            "--repo",
            str(env["repo"]),
            "--mode",
            mode.value,
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "VMARCHIVE_STATE_DIR": str(env["state"]),
            "VMARCHIVE_CRASH_AT": f"{point}:1",
        },
        timeout=300,
    )
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    # The guest keeps ticking (QEMU resumes it by itself, or it never stopped) ...
    n0 = guest.last_tick(mark).n if guest.serial.ticks(mark) else 0
    guest.wait_for("ticks after the kill", lambda: (guest.last_tick(mark).n > n0 + 1) or None, 60)
    # ... except in the window between a completed migration and `cont`.
    if mode == Mode.SWITCHOVER and point not in ("capture-locked", "capture-prepared"):
        # Only the watchdog could clean up after this one (and, until the migration
        # completed, resume the TCG guest it had stopped): its log says what it did.
        said = wlog.read_text()[logged:] if wlog.exists() else ""
        assert "ended abnormally; cleaning up" in said, said
        assert said.rstrip().endswith("done"), said
        stopped = point in ("capture-migrating", "capture-switchover", "capture-disks-fixed")
        assert ("resuming guest" in said) == stopped, said
    with Repository.open(str(env["repo"])) as repo:
        after = set(repo.archive_ids())
    if point not in ("capture-cleaning",):
        assert after == before, "a killed capture must not list an archive"
    # The next run cleans up and captures consistently.
    _r, ob = capture_and_check(guest, env, mode)
    assert ob.consistent, ob
    assert qemu_leftovers(guest) == []
    assert not list(env["state"].glob("*.json")), "marker left behind"
    with Repository.open(str(env["repo"])) as repo:
        assert repo.verify().ok
    assert guest.serial.mismatches(mark) == []


def test_paused_guest_is_captured_and_stays_paused(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    guest.dom.suspend()
    try:
        r, ob = capture_and_check(guest, env, Mode.AUTO)
        assert r.mode == "paused"
        assert ob.consistent, ob
        state, _reason = guest.dom.state()
        assert state == libvirt.VIR_DOMAIN_PAUSED
        # QEMU cannot migrate it again until resumed: one clear error, nothing changed.
        with pytest.raises(UsageError, match="still paused"):
            capture(opts(guest, env, mode=Mode.AUTO))
        assert qemu_leftovers(guest) == ["guest not running: postmigrate"]
    finally:
        guest.dom.resume()
    mark = guest.serial.mark()
    guest.wait_ticks(2, since=mark, timeout=60)
    assert guest.serial.mismatches(mark) == []


def test_shut_off_domain_gives_disk_only_archive(
    conn: libvirt.virConnect, env: dict[str, pathlib.Path]
) -> None:
    wd = guestlib.make_workdir()
    name = guestlib.unique_name()
    img = wd / "off.qcow2"
    raw = wd / "off.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 1M 64k", str(img)], check=True, capture_output=True
    )
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "4M"], check=True)
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img}'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{raw}'/><target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
</devices></domain>"""
    dom = conn.defineXML(xml)
    try:
        r = capture(CaptureOptions(domain=name, repo=str(env["repo"]), state_dir=env["state"]))
        assert r.kind == "disk-only" and r.guest_pause_ms is None
        by = {d.target: d for d in r.disks}
        assert by["vda"].copied and by["vdb"].copied and not by["hdc"].copied
        assert by["vda"].bytes_read < 8 * 1024 * 1024  # holes never read
        with Repository.open(str(env["repo"])) as repo:
            a = repo.load_archive(r.id)
            assert a.metadata["kind"] == "disk-only"
            s = repo.open_stream(a, "disk:vda")
            assert s.read_range(1024 * 1024, 65536) == b"\x5a" * 65536
            assert s.read_range(0, 65536) == bytes(65536)
            assert {x.kind for x in a.streams} == {"meta", "disk"}
    finally:
        dom.undefine()
        subprocess.run(["rm", "-rf", str(wd)], check=False)


def _define_shut_off(conn: libvirt.virConnect, image: pathlib.Path) -> libvirt.virDomain:
    xml = f"""<domain type='qemu'><name>{guestlib.unique_name()}</name><memory unit='MiB'>64</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{image}'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>"""
    return conn.defineXML(xml)


def test_shut_off_domain_whose_disk_cannot_be_opened_says_why(
    conn: libvirt.virConnect, env: dict[str, pathlib.Path]
) -> None:
    # qemu-nbd creates its socket before it opens the image: the failure used to surface as
    # a refused NBD connection, which the capture then blamed on the domain "stopping".
    wd = guestlib.make_workdir()
    missing = wd / "missing.qcow2"
    dom = _define_shut_off(conn, missing)
    name = dom.name()
    try:
        with Repository.open(str(env["repo"])) as repo:
            before = set(repo.archive_ids())
        with pytest.raises(HypervisorError) as err:
            capture(CaptureOptions(domain=name, repo=str(env["repo"]), state_dir=env["state"]))
        msg = str(err.value)
        assert f"qemu-nbd cannot serve {missing}" in msg and "No such file" in msg, msg
        assert "stopped during the capture" not in msg, msg
        with Repository.open(str(env["repo"])) as repo:
            assert set(repo.archive_ids()) == before
            assert repo.verify().ok
    finally:
        dom.undefine()
        subprocess.run(["rm", "-rf", str(wd)], check=False)


def test_several_domains_in_one_command(
    guest: guestlib.Guest, conn: libvirt.virConnect, env: dict[str, pathlib.Path]
) -> None:
    wd = guestlib.make_workdir()
    img = wd / "off.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    off = _define_shut_off(conn, img)
    broken = _define_shut_off(conn, wd / "missing.qcow2")
    cli = [sys.executable, "-m", "vmarchive", "capture", "--repo", str(env["repo"])]
    run_env = {**os.environ, "VMARCHIVE_STATE_DIR": str(env["state"])}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, cwd=ROOT, env=run_env, timeout=300
        )

    def archive_ids() -> set[str]:
        with Repository.open(str(env["repo"])) as repo:
            return set(repo.archive_ids())

    try:
        before = archive_ids()
        # A failing domain in the middle: reported, the others still captured, and the
        # exit code is its own (a hypervisor error).
        p = run(guest.name, broken.name(), off.name(), "--json")
        assert p.returncode == 5, p.stderr
        out = json.loads(p.stdout)
        assert [c["domain"] for c in out["captures"]] == [guest.name, off.name()]
        assert [c["kind"] for c in out["captures"]] == ["full", "disk-only"]
        (f,) = out["failures"]
        assert f["domain"] == broken.name() and f["exit_code"] == 5
        assert "qemu-nbd cannot serve" in f["error"]
        assert out["skipped"] == [] and out["interrupted"] is False
        assert p.stderr.strip() == f"vmarchive: {broken.name()}: {f['error']}"
        ids = {c["id"] for c in out["captures"]}
        assert archive_ids() == before | ids
        with Repository.open(str(env["repo"])) as repo:
            assert observe(repo, out["captures"][0]["id"], guest.boot_id or "").consistent
            assert repo.verify().ok
        assert qemu_leftovers(guest) == []
        # each is now its domain's newest archive, by name and by UUID
        for c, dom in zip(out["captures"], (guest.dom, off), strict=True):
            for who in (dom.name(), dom.UUIDString()):
                info = ["info", f"{who}@latest", "--json", "--repo", str(env["repo"])]
                p = subprocess.run(
                    [sys.executable, "-m", "vmarchive", *info],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                assert p.returncode == 0 and json.loads(p.stdout)["id"] == c["id"], p.stderr

        # --all: the running and paused domains only (the shut-off ones are not taken),
        # less the excluded ones; here every active domain but this module's guest.
        others = [
            d.name()
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            if d.name() != guest.name
        ]
        excl = [a for o in others for a in ("--exclude", o)]
        p = run("--all", *excl, "--exclude", "vmatest-no-such-domain")
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("\narchive ") + p.stdout.startswith("archive ") == 1, p.stdout
        assert f"domain       {guest.name} " in p.stdout
        assert p.stdout.rstrip().endswith("1 of 1 domains captured"), p.stdout
        assert "--exclude vmatest-no-such-domain: no such domain" in p.stderr

        # An unknown name among several: nothing is captured at all.
        n = len(archive_ids())
        p = run(off.name(), "vmatest-no-such-domain", "--json")
        assert p.returncode == 5 and p.stdout == "", (p.stdout, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1
        assert len(archive_ids()) == n
    finally:
        off.undefine()
        broken.undefine()
        subprocess.run(["rm", "-rf", str(wd)], check=False)


def test_auto_mode_uses_snapshot_only_where_it_works(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    expect = "switchover" if snapshot_reason(guest) is not None else "snapshot"
    r, ob = capture_and_check(guest, env, Mode.AUTO)
    assert r.mode == expect and ob.consistent
    if expect == "switchover":
        # Where QEMU refuses background-snapshot, --mode snapshot says so and changes nothing.
        with pytest.raises(HostPreconditionError, match="snapshot mode does not work"):
            capture(opts(guest, env, mode=Mode.SNAPSHOT))
        assert qemu_leftovers(guest) == []


UFFD_SYSCTL = pathlib.Path("/proc/sys/vm/unprivileged_userfaultfd")


def test_auto_mode_falls_back_where_userfaultfd_is_refused(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    """The other branch of the test above, forced: with the host refusing userfaultfd to
    QEMU's unprivileged user, auto mode takes switchover (the probe's answer serves the
    saved settings too) and leaves QEMU's capabilities as they were."""
    if os.geteuid() != 0 or not os.access(UFFD_SYSCTL, os.W_OK):
        pytest.skip("needs root to set vm.unprivileged_userfaultfd for the test")
    before = UFFD_SYSCTL.read_text()
    UFFD_SYSCTL.write_text("0\n")
    wlog = env["state"] / f"{guest.dom.UUIDString()}.watchdog.log"
    try:
        assert snapshot_reason(guest) is not None  # the control: QEMU refuses now
        r, ob = capture_and_check(guest, env, Mode.AUTO)
        assert r.mode == "switchover" and ob.consistent
        logged = len(wlog.read_text()) if wlog.exists() else 0
        with pytest.raises(HostPreconditionError, match="snapshot mode does not work"):
            capture(opts(guest, env, mode=Mode.SNAPSHOT))
        # A refused probe changed nothing: no marker left for the watchdog to act on.
        said = wlog.read_text()[logged:] if wlog.exists() else ""
        assert "cleaning up" not in said, said
        assert not list(env["state"].glob("*.json")), "marker left behind"
    finally:
        UFFD_SYSCTL.write_text(before)
    assert qemu_leftovers(guest) == []
    expect = "switchover" if snapshot_reason(guest) is not None else "snapshot"
    r, ob = capture_and_check(guest, env, Mode.AUTO)  # and back to what the host allows
    assert r.mode == expect and ob.consistent


def test_locked_repository_is_refused_and_guest_untouched(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    with Repository.open(str(env["repo"])) as repo:
        lock = repo.lock("exclusive")
        try:
            with pytest.raises(LockedError):
                capture(opts(guest, env, mode=Mode.SWITCHOVER))
        finally:
            lock.release()
    assert qemu_leftovers(guest) == []
