"""Restore-as-resume, clones and replay against real libvirt guests (issue 5).

One busy workload guest (RAM churn, 100 ms ticks, a NIC) is captured once per module; the
tests restore and clone that archive.  What the guest prints is the judge: the same boot
id, the first tick after resume = the counter found in the archived RAM + 1, no MISMATCH
(the workload compares the tick block it reads back from disk with the value its RAM says
it wrote: that is the memory/disk consistency check), and the tick block on the rebuilt
disk following the counter.  Negative controls: a disk that does not match the memory
must produce MISMATCH; damaged or forged archives must be refused before a guest starts,
leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import libvirt
import pytest

from vmarchive.errors import (
    AlreadyExistsError,
    DamageError,
    FormatError,
    HostPreconditionError,
    HypervisorError,
    UsageError,
)
from vmarchive.hypervisor.hugepages import probe_hugetlbfs
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.ops.restore import RestoreOptions, RestoreResult, export_save, restore
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

#: How long a resumed guest is watched for MISMATCH.  The workload checks memory against
#: disk on its FIRST tick after the resume (it reads back the tick block its RAM says it
#: wrote); every later check only re-reads what the resumed guest wrote itself.  50 ticks
#: (5 s at 100 ms) cover that first check with a wide margin.
WATCH_TICKS = 50
VMARCHIVE = [sys.executable, "-m", "vmarchive"]


@dataclass(frozen=True)
class Captured:
    id: str
    counter: int
    last_written: int
    boot_id: str
    #: the workload's check-and-write under way at the instant (0: none)
    in_check: int


def counter_in_archive(repo: Repository, archive_id: str, boot_id: str) -> guestlib.CounterPage:
    archive = repo.load_archive(archive_id)
    chunks = (
        data
        for s in archive.streams
        if s.kind == "ram"
        for _off, data in repo.open_stream(archive, s.name).iter_chunks()
    )
    found = guestlib.counter_pages_in(chunks, boot_id)
    assert len(found) == 1, found
    return found[0]


NIC = "<interface type='user'><model type='virtio'/></interface>\n    <memballoon"


class Domains:
    """Names of domains the tests made; every one is removed at teardown."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.names: list[str] = []
        self.dirs: list[pathlib.Path] = []

    def workdir(self) -> pathlib.Path:
        d = guestlib.make_workdir("vmatest-restore-")
        self.dirs.append(d)
        return d

    def remove(self, name: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            dom = self.conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)  # UEFI ones need it
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/var/log/libvirt/qemu/{name}.log")

    def close(self) -> None:
        for n in self.names:
            self.remove(n)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def domains(libvirt_conn: libvirt.virConnect) -> Iterator[Domains]:
    d = Domains(libvirt_conn)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def original(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str], domains: Domains
) -> guestlib.Guest:
    spec = guestlib.GuestSpec(params={"tick_ms": 100, "churn": 16})
    g = guestlib.Guest(libvirt_conn, spec, domains.workdir())
    g.xml = g.xml.replace("<memballoon", NIC, 1)
    domains.names.append(g.name)
    g.start()
    g.wait_up()
    g.wait_ticks(3)
    return g


@pytest.fixture(scope="module")
def repo_path(domains: Domains) -> str:
    path = str(domains.workdir() / "repo")
    Repository.init(path, InitOptions()).close()
    return path


def capture_guest(g: guestlib.Guest, repo_path: str) -> Captured:
    r = capture(CaptureOptions(domain=g.name, repo=repo_path))
    assert r.memory_format == "parsed"
    with Repository.open(repo_path) as repo:
        assert g.boot_id is not None
        cp = counter_in_archive(repo, r.id, g.boot_id)
    return Captured(r.id, cp.counter, cp.last_written, g.boot_id, cp.in_check)


@pytest.fixture(scope="module")
def captured(original: guestlib.Guest, repo_path: str) -> Captured:
    return capture_guest(original, repo_path)


def opts(repo_path: str, captured: Captured, **kw: Any) -> RestoreOptions:
    return RestoreOptions(archive=captured.id, repo=repo_path, **kw)


def console(result: RestoreResult) -> guestlib.SerialLog:
    assert len(result.serial_logs) == 1
    return guestlib.SerialLog(pathlib.Path(result.serial_logs[0]))


def restored_guest(conn: libvirt.virConnect, result: RestoreResult, disk_dir: pathlib.Path) -> Any:
    """A guestlib.Guest view of a restored domain (for its waiting helpers)."""
    g = guestlib.Guest(conn, guestlib.GuestSpec(), disk_dir, name=result.domain)
    g.serial = console(result)
    g.disk_paths = [pathlib.Path(d.path) for d in result.disks]
    g.spec = replace(g.spec, disks=tuple(guestlib.DiskSpec(fmt=d.format) for d in result.disks))
    return g


def assert_resumed(g: guestlib.Guest, captured: Captured) -> list[guestlib.Tick]:
    """Same boot, first tick = captured counter + 1 (within one), no MISMATCH, no reboot.

    Or the captured counter itself: the workload sets the counter, then churns RAM, then
    prints the tick line, so an instant inside that window resumes a guest that prints
    the captured counter's line first (seen once in CI, with churn 16 MiB/s and 100 ms
    ticks).  A resume from an older state fails the MISMATCH check (the disk holds the
    captured counter)."""
    ticks = g.wait_ticks(WATCH_TICKS)
    first = ticks[0]
    assert first.boot_id == captured.boot_id
    assert captured.counter <= first.n <= captured.counter + 2, (first, captured)
    assert [t.n for t in ticks] == list(range(first.n, first.n + len(ticks)))
    assert g.serial.mismatches() == []
    assert g.serial.boot_ids() == []  # resumed, not booted
    assert g.serial.trouble() == []
    return ticks


def save_image_xml(img: pathlib.Path) -> str:
    """The domain XML libvirt reads from save image ``img``."""
    return subprocess.run(
        ["virsh", "-c", guestlib.URI, "save-image-dumpxml", str(img)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def no_leftovers(conn: libvirt.virConnect, name: str, disk_dir: pathlib.Path) -> None:
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(name)
    assert list(disk_dir.iterdir()) == []
    assert guestlib.libvirt_leftovers(name) == []


# --- clone while the original runs; replay ----------------------------------------------------


def test_clones_run_beside_the_original_and_replay_identically(
    libvirt_conn: libvirt.virConnect,
    original: guestlib.Guest,
    repo_path: str,
    captured: Captured,
    domains: Domains,
) -> None:
    results = []
    disk_hashes = []
    for i in range(3):
        d = domains.workdir()
        name = f"{original.name}-c{i}"
        domains.names.append(name)
        r = restore(
            opts(repo_path, captured, name=name, disk_dir=d, clone=True, paused=True, digests=True)
        )
        assert r.paused and r.domain == name
        g = restored_guest(libvirt_conn, r, d)
        # While paused the image is stable: hash what the clone will run from.
        disk_hashes.append(hashlib.sha256(guestlib.read_disk(g.disk_paths[0], "qcow2")).hexdigest())
        g.dom.resume()
        results.append((r, g))

    # Replay: every clone started from byte-identical memory and disks, and at one counter.
    assert len({r.stream_sha256 for r, _ in results}) == 1
    assert all(r.stream_sha256 for r, _ in results)
    assert len({r.disks[0].sha256 for r, _ in results}) == 1
    assert len(set(disk_hashes)) == 1
    firsts = []
    for _r, g in results:
        ticks = assert_resumed(g, captured)
        firsts.append(ticks[0].n)
    assert len(set(firsts)) == 1

    # The original runs on, unaffected.
    mark = original.serial.mark()
    original.wait_ticks(3, since=mark)
    assert original.serial.mismatches() == []

    # Identity: names, UUIDs, MACs all differ; the clones' NICs are down; own files.
    def ident(name: str) -> tuple[str, str, list[str], list[str]]:
        root = ET.fromstring(libvirt_conn.lookupByName(name).XMLDesc(0))
        macs = [str(m.get("address")) for m in root.iterfind("devices/interface/mac")]
        links = [str(lk.get("state")) for lk in root.iterfind("devices/interface/link")]
        return str(root.findtext("name")), str(root.findtext("uuid")), macs, links

    orig = ident(original.name)
    clones = [ident(r.domain) for r, _ in results]
    assert orig[3] == []  # negative control: the original's link is up (no <link> element)
    everything = [orig, *clones]
    assert len({x[0] for x in everything}) == 4
    assert len({x[1] for x in everything}) == 4
    assert all(len(x[2]) == 1 for x in everything)
    assert len({x[2][0] for x in everything}) == 4
    assert all(x[3] == ["down"] for x in clones)
    files = {d.path for r, _ in results for d in r.disks} | {
        p for r, _ in results for p in r.serial_logs
    }
    assert len(files) == 6
    for r, _ in results:
        domains.remove(r.domain)


def test_clones_without_a_name_take_the_next_free_one(
    libvirt_conn: libvirt.virConnect,
    original: guestlib.Guest,
    repo_path: str,
    captured: Captured,
    domains: Domains,
) -> None:
    """``clone`` without --name: DOMAIN-clone-<8 digits of the archive id>, then -2 while a
    domain holds that name, -3 while only the files of -2 are left; --replace takes the
    first name again (the search's negative control)."""
    d = domains.workdir()
    base = f"{original.name}-clone-{captured.id[:8]}"
    domains.names += [base, f"{base}-2", f"{base}-3"]
    first = restore(opts(repo_path, captured, disk_dir=d, clone=True, paused=True))
    assert first.domain == base
    cmd = [*VMARCHIVE, "clone", captured.id, "--repo", repo_path, "--disk-dir", str(d)]
    proc = subprocess.run(
        [*cmd, "--paused", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    second = json.loads(proc.stdout)["domain"]
    assert second == f"{base}-2"
    assert libvirt_conn.lookupByName(base).isActive()  # the first clone is untouched
    domains.remove(second)  # its files stay: the name stays taken
    assert glob.glob(f"{d}/{glob.escape(second)}-*")
    third = restore(opts(repo_path, captured, disk_dir=d, clone=True, paused=True))
    assert third.domain == f"{base}-3"
    again = restore(opts(repo_path, captured, disk_dir=d, clone=True, paused=True, replace=True))
    assert again.domain == base and again.uuid != first.uuid
    for name in (base, third.domain):
        domains.remove(name)


# --- refused archives: nothing may be left behind ---------------------------------------------


def copy_repo(repo_path: str, domains: Domains) -> str:
    dst = domains.workdir() / "repo"
    shutil.copytree(repo_path, dst)
    return str(dst)


def late_ram_chunk(repo: Repository, archive_id: str) -> tuple[bytes, Any]:
    """A stored chunk of the last part of pc.ram whose pack holds no disk chunk."""
    a = repo.load_archive(archive_id)

    def where(cid: bytes) -> Any:
        loc = repo.index.get(cid)
        assert loc is not None, cid.hex()
        return loc

    disk_packs = {where(c).pack_id for s in a.streams if s.kind == "disk" for c in s.chunk_ids()}
    ram = a.stream("ram:pc.ram")
    for cid in reversed(list(ram.chunk_ids())):
        loc = where(cid)
        if loc.pack_id not in disk_packs:
            return cid, loc
    raise AssertionError("every RAM pack also holds a disk chunk")


def pack_file(repo_path: str, pack_id: str) -> pathlib.Path:
    return pathlib.Path(repo_path) / "data" / pack_id[:2] / pack_id


def damage_blob(repo_path: str, loc: Any) -> None:
    """Flip one byte in the middle of the stored blob at ``loc`` (a chunk Location)."""
    p = pack_file(repo_path, loc.pack_id)
    data = bytearray(p.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def damaged_copy(
    repo_path: str,
    captured: Captured,
    domains: Domains,
    pick: Callable[[Repository, str], tuple[bytes, Any]],
) -> str:
    """A copy of the repository with the blob of the chunk ``pick`` names damaged."""
    bad = copy_repo(repo_path, domains)
    with Repository.open(bad) as repo:
        _cid, loc = pick(repo, captured.id)
    damage_blob(bad, loc)
    return bad


def refused_restore(
    conn: libvirt.virConnect,
    bad: str,
    captured: Captured,
    domains: Domains,
    name: str,
    match: str | None = None,
) -> pathlib.Path:
    """Restore from ``bad`` as a clone ``name``: DamageError, and nothing left behind.
    Returns the disk directory it used."""
    d = domains.workdir()
    domains.names.append(name)
    with pytest.raises(DamageError, match=match):
        restore(opts(bad, captured, name=name, disk_dir=d, clone=True))
    no_leftovers(conn, name, d)
    return d


def test_damaged_chunk_is_refused_before_the_guest_starts(
    libvirt_conn: libvirt.virConnect, repo_path: str, captured: Captured, domains: Domains
) -> None:
    bad = damaged_copy(repo_path, captured, domains, late_ram_chunk)
    name = "vmatest-damaged"
    d = refused_restore(libvirt_conn, bad, captured, domains, name)
    # The CLI says it in one line, with the damage exit code.
    proc = subprocess.run(
        [*VMARCHIVE, "clone", captured.id, "--name", name, "--repo", bad, "--disk-dir", str(d)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 4
    assert len(proc.stderr.strip().splitlines()) == 1
    assert re.search(r"chunk|blob|pack", proc.stderr)
    no_leftovers(libvirt_conn, name, d)
    # Negative control: the undamaged repository restores into the same place.
    r = restore(opts(repo_path, captured, name=name, disk_dir=d, clone=True))
    assert libvirt_conn.lookupByName(name).isActive()
    assert console(r).path.parent == d
    domains.remove(name)


def test_missing_disk_directory_is_refused_in_one_line(
    libvirt_conn: libvirt.virConnect, repo_path: str, captured: Captured, domains: Domains
) -> None:
    """A mistyped --disk-dir (or an export's output directory) is a usage error, said in
    one line before anything is done, and not created."""
    d = domains.workdir()
    missing = d / "not-there"
    name = "vmatest-nodir"
    for args, what in (
        (["restore", captured.id[:12], "--name", name, "--disk-dir", str(missing)], "disk"),
        (["export-save", captured.id[:12], "-o", str(missing / "guest.save")], "disk"),
        # the disks elsewhere: the image's own directory is checked before they are written
        (
            ["export-save", captured.id[:12], "-o", str(missing / "g.save"), "--disk-dir", str(d)],
            "output",
        ),
    ):
        proc = subprocess.run(
            [*VMARCHIVE, *args, "--repo", repo_path], capture_output=True, text=True
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"vmarchive: {what} directory {missing} does not exist"
    assert not missing.exists() and not list(d.iterdir())
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
    # Negative control: the same export into a directory that exists goes through.
    proc = subprocess.run(
        [*VMARCHIVE, "export-save", captured.id[:12], "-o", str(d / "guest.save"), "-r", repo_path],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (d / "guest.save").stat().st_size > 0


def test_missing_pack_is_refused_before_anything_is_written(
    libvirt_conn: libvirt.virConnect, repo_path: str, captured: Captured, domains: Domains
) -> None:
    bad = copy_repo(repo_path, domains)
    with Repository.open(bad) as repo:
        _cid, loc = late_ram_chunk(repo, captured.id)
    pack_file(bad, loc.pack_id).unlink()
    refused_restore(libvirt_conn, bad, captured, domains, "vmatest-nopack", match="pack")


def late_disk_chunk(repo: Repository, archive_id: str) -> tuple[bytes, Any]:
    """A stored chunk of the last part of the disk that no other stream references
    (so only the disk half of a restore reads it)."""
    a = repo.load_archive(archive_id)
    others = {c for s in a.streams if s.kind != "disk" for c in s.chunk_ids()}
    disk = next(s for s in a.streams if s.kind == "disk")
    for cid in reversed(list(disk.chunk_ids())):
        if cid not in others:
            return cid, repo.index.get(cid)
    raise AssertionError("every disk chunk is also a RAM chunk")


def test_damaged_disk_chunk_aborts_the_concurrent_restore(
    libvirt_conn: libvirt.virConnect, repo_path: str, captured: Captured, domains: Domains
) -> None:
    """The disks are filled while the memory stream flows: damage found by the disk half
    cuts the stream before its end, so the guest never starts and nothing is left."""
    bad = damaged_copy(repo_path, captured, domains, late_disk_chunk)
    name = "vmatest-damaged-disk"
    d = refused_restore(libvirt_conn, bad, captured, domains, name)
    # Negative control: the undamaged repository restores into the same place.
    r = restore(opts(repo_path, captured, name=name, disk_dir=d, clone=True, paused=True))
    assert libvirt_conn.lookupByName(name).isActive() and r.paused
    domains.remove(name)


def _domain_state(conn: libvirt.virConnect, name: str) -> int | None:
    try:
        return int(conn.lookupByName(name).state()[0])
    except libvirt.libvirtError:
        return None


def _poll(check: Any, what: str, timeout: float = 120.0) -> None:
    """Poll until ``check()``; a hang guard, not a timing assertion."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.05)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "negative-control-ungated"])
def test_guest_does_not_run_before_its_disks_are_complete(
    libvirt_conn: libvirt.virConnect,
    repo_path: str,
    captured: Captured,
    domains: Domains,
    monkeypatch: pytest.MonkeyPatch,
    gated: bool,
) -> None:
    """Hold the disk half before it writes a byte: QEMU has started and read the stream up
    to its withheld end, yet the guest is not running.  Without the gate (negative
    control) the same held disks let the guest run -- the check can fail."""
    import threading

    from vmarchive.ops import restore as R

    at_gate = threading.Event()
    go = threading.Event()
    fill = R._DiskFile.fill
    wait = R._DiskFiller.wait

    def held_fill(self: Any, *a: Any, **k: Any) -> int:
        assert go.wait(120)
        return fill(self, *a, **k)

    def noted_wait(self: Any) -> None:
        at_gate.set()
        wait(self)

    monkeypatch.setattr(R._DiskFile, "fill", held_fill)
    monkeypatch.setattr(R._DiskFiller, "wait", noted_wait)
    if not gated:
        monkeypatch.setattr(R, "_stream_hold", lambda plan: 0)
    d = domains.workdir()
    name = f"vmatest-gate-{int(gated)}"
    domains.names.append(name)
    out: list[Any] = []
    t = threading.Thread(
        target=lambda: out.append(
            restore(opts(repo_path, captured, name=name, disk_dir=d, clone=True))
        )
    )
    t.start()
    try:
        assert at_gate.wait(120)  # the whole stream but its end went out
        _poll(lambda: _domain_state(libvirt_conn, name) is not None, "incoming QEMU")
        assert list(d.glob("*.qcow2"))  # the images exist (structure only, no data yet)
        if gated:
            assert _domain_state(libvirt_conn, name) != libvirt.VIR_DOMAIN_RUNNING
        else:
            running = libvirt.VIR_DOMAIN_RUNNING
            _poll(lambda: _domain_state(libvirt_conn, name) == running, "ungated guest running")
    finally:
        go.set()
        t.join(300)
    assert out and out[0].domain == name
    assert _domain_state(libvirt_conn, name) == libvirt.VIR_DOMAIN_RUNNING
    domains.remove(name)


def forge(
    repo_path: str,
    archive_id: str,
    *,
    disk_attrs: dict[str, Any] | None = None,
    meta: dict[str, str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """A new archive sharing every chunk of ``archive_id`` with some fields changed."""
    with Repository.open(repo_path) as repo:
        a = repo.load_archive(archive_id)
        with repo.writer() as w:
            for s in a.streams:
                if meta and s.name in meta:
                    data = meta[s.name].encode()
                    sw = w.stream(s.name, s.kind, len(data), attrs=s.attrs)
                    sw.write(0, data)
                    sw.close()
                    continue
                attrs = dict(s.attrs)
                if s.kind == "disk" and disk_attrs:
                    attrs.update(disk_attrs)
                sw = w.stream(s.name, s.kind, s.size, chunk_size=s.chunk_size, attrs=attrs)
                for i in range(s.slots):
                    cid = s.chunk_id(i)
                    if cid != bytes(16):
                        sw.set_chunk(i, cid)
                sw.close()
            return str(w.commit({**a.metadata, **(metadata or {})}))


@pytest.mark.parametrize(
    "forgery",
    [
        {"disk_attrs": {"target": "../../../tmp/vmatest-escape"}},
        {"disk_attrs": {"target": "/tmp/vmatest-escape"}},
        {"disk_attrs": {"target": "vda/../../x"}},
        {"metadata": {"domain": "../../tmp/vmatest-escape"}},
    ],
    ids=["dotdot", "absolute", "nested", "domain-name"],
)
def test_forged_manifest_is_refused(
    libvirt_conn: libvirt.virConnect,
    repo_path: str,
    captured: Captured,
    domains: Domains,
    forgery: dict[str, Any],
) -> None:
    bad = copy_repo(repo_path, domains)
    aid = forge(bad, captured.id, **forgery)
    d = domains.workdir()
    with pytest.raises((FormatError, UsageError)):
        restore(RestoreOptions(archive=aid, repo=bad, disk_dir=d))
    assert list(d.iterdir()) == []
    assert not glob.glob("/tmp/vmatest-escape*")
    assert not (d.parent / "x").exists()


def _xml_with(xml: str, old: str, new: str) -> str:
    assert old in xml
    return xml.replace(old, new)


def test_target_that_cannot_run_the_guest_is_refused(
    libvirt_conn: libvirt.virConnect, repo_path: str, captured: Captured, domains: Domains
) -> None:
    with Repository.open(repo_path) as repo:
        a = repo.load_archive(captured.id)
        live = repo.open_stream(a, "domain-live.xml").read_all().decode()
        mig = repo.open_stream(a, "domain.xml").read_all().decode()
    bad = copy_repo(repo_path, domains)
    cpu = forge(
        bad,
        captured.id,
        meta={
            "domain-live.xml": _xml_with(
                live, "</cpu>", "<feature policy='require' name='avx512f'/></cpu>"
            )
        },
    )
    machine = forge(
        bad,
        captured.id,
        meta={"domain.xml": _xml_with(mig, "machine='pc-i440fx-7.2'", "machine='pc-i440fx-99.0'")},
    )
    d = domains.workdir()
    name = "vmatest-cpu"
    domains.names.append(name)
    with pytest.raises(HostPreconditionError, match="CPU"):
        restore(RestoreOptions(archive=cpu, repo=bad, name=name, disk_dir=d, clone=True))
    no_leftovers(libvirt_conn, name, d)
    with pytest.raises(HostPreconditionError, match="machine type"):
        restore(RestoreOptions(archive=machine, repo=bad, name=name, disk_dir=d, clone=True))
    no_leftovers(libvirt_conn, name, d)


# --- the acceptance run: destroy the original, resume it ---------------------------------------


def test_restore_resumes_the_destroyed_original(
    libvirt_conn: libvirt.virConnect,
    original: guestlib.Guest,
    repo_path: str,
    captured: Captured,
    domains: Domains,
) -> None:
    uuid = original.dom.UUIDString()
    original.destroy()
    d = domains.workdir()
    r = restore(opts(repo_path, captured, disk_dir=d))
    assert r.domain == original.name and not r.paused
    assert r.uuid == uuid
    assert r.clock_skew_s is not None and r.clock_skew_s > 0
    g = restored_guest(libvirt_conn, r, d)
    ticks = assert_resumed(g, captured)
    # The disk follows the counter: pause, read the tick block of the rebuilt image.
    g.dom.suspend()
    try:
        last = g.last_tick()
        tb = g.read_tick_block()
        assert tb is not None and tb.boot_id == captured.boot_id
        # Paused between a tick's write and its line (the RAM churn runs in between) the
        # disk holds one tick more than printed, as test_testbed allows; seen in CI.
        assert tb.counter in (last.n, last.n + 1) and last.n >= ticks[-1].n, (tb, last)
    finally:
        g.dom.resume()

    # Without --replace nothing is clobbered; with it, the domain is replaced.
    with pytest.raises(AlreadyExistsError):
        restore(opts(repo_path, captured, disk_dir=d))
    assert libvirt_conn.lookupByName(r.domain).isActive()
    # The CLI: --replace, --json with at least domain and duration_s.
    proc = subprocess.run(
        [
            *VMARCHIVE,
            *("restore", captured.id[:12], "--repo", repo_path, "--disk-dir", str(d)),
            *("--replace", "--json"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["domain"] == r.domain and out["duration_s"] > 0
    r2 = replace(r, serial_logs=out["serial_logs"], disks=r.disks)
    assert_resumed(restored_guest(libvirt_conn, r2, d), captured)


def test_guest_on_huge_pages_resumes_on_ordinary_ram_with_no_hugepages(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str], domains: Domains
) -> None:
    """Restore-as-resume on a host without huge pages: the archived XML asks for them, the
    restore says what to do, and --no-hugepages resumes the same boot on ordinary RAM."""
    spec = guestlib.GuestSpec(params={"tick_ms": 100, "churn": 8}, hugepages=True)
    repo = str(domains.workdir() / "repo")
    Repository.init(repo, InitOptions()).close()
    with guestlib.huge_pages_reserved(spec.memory_mib + 16):
        g = guestlib.Guest(libvirt_conn, spec, domains.workdir())
        domains.names.append(g.name)
        g.start()
        g.wait_up()
        g.wait_ticks(3)
        r = capture(CaptureOptions(domain=g.name, repo=repo))
        assert g.boot_id is not None
        with Repository.open(repo) as rp:
            cp = counter_in_archive(rp, r.id, g.boot_id)
        captured = Captured(r.id, cp.counter, cp.last_written, g.boot_id, cp.in_check)
        g.cleanup()  # its QEMU log too: a failed restore must remove the one it starts
    pool = probe_hugetlbfs()
    if pool.free * pool.page_kib // 1024 < spec.memory_mib:  # gone, as on a host without them
        out = domains.workdir()
        with pytest.raises(HypervisorError, match=r"huge pages.*--no-hugepages"):
            restore(RestoreOptions(archive=r.id, repo=repo, disk_dir=out))
        no_leftovers(libvirt_conn, g.name, out)
    out = domains.workdir()
    res = restore(RestoreOptions(archive=r.id, repo=repo, disk_dir=out, no_hugepages=True))
    assert "guest RAM on ordinary pages (it was on huge pages)" in res.notes
    pid = int((pathlib.Path("/run/libvirt/qemu") / f"{res.domain}.pid").read_text())
    assert guestlib.huge_page_backed_mib(pid) == 0
    assert_resumed(restored_guest(libvirt_conn, res, out), captured)
    # the same for a save image resumed by plain `virsh restore`
    for drop in (False, True):
        img = domains.workdir() / "guest.save"
        export_save(r.id, repo, img, name=f"{g.name}-x", no_hugepages=drop)
        dumped = save_image_xml(img)
        assert ("<hugepages" in dumped) is not drop, dumped


def test_uefi_guest_gets_a_variable_store_of_its_own(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str], domains: Domains
) -> None:
    """A UEFI guest's variable store (``<nvram>``) is a file its QEMU writes.  A restore
    beside the running original, and an exported save image, name a store of their own
    beside their disks, filled with the store as it was at the instant (QEMU has it as
    flash RAM); they used to name the original's file, which the restored QEMU then wrote
    over with the archived variables while the original's QEMU still used it."""
    spec = guestlib.GuestSpec(params={"tick_ms": 100}, uefi=True)
    repo = str(domains.workdir() / "repo")
    Repository.init(repo, InitOptions()).close()
    g = guestlib.Guest(libvirt_conn, spec, domains.workdir())
    domains.names.append(g.name)
    g.start()
    g.wait_up()
    g.wait_ticks(3)
    store = g.workdir / "nvram.fd"
    assert ET.fromstring(g.dom.XMLDesc(0)).findtext("./os/nvram") == str(store)
    r = capture(CaptureOptions(domain=g.name, repo=repo))
    assert g.boot_id is not None
    with Repository.open(repo) as rp:
        cp = counter_in_archive(rp, r.id, g.boot_id)
        flash = rp.open_stream(rp.load_archive(r.id), "ram:system.flash1").read_all()
    assert len(flash) == store.stat().st_size  # the flash RAM block is the whole store
    captured = Captured(r.id, cp.counter, cp.last_written, g.boot_id, cp.in_check)

    # Restored over a defined domain of the same name (--replace): that domain's own
    # variable store is left as it was, like its disks.
    old_store = domains.workdir() / "replaced-nvram.fd"
    old_store.write_bytes(b"\x5a" * 4096)
    replaced = g.xml.replace(f"<name>{g.name}</name>", f"<name>{g.name}-r</name>", 1)
    replaced = replaced.replace(f">{store}</nvram>", f">{old_store}</nvram>", 1)
    domains.names.append(f"{g.name}-r")
    libvirt_conn.defineXML(replaced)
    out = domains.workdir()
    res = restore(
        RestoreOptions(archive=r.id, repo=repo, disk_dir=out, name=f"{g.name}-r", replace=True)
    )
    assert old_store.read_bytes() == b"\x5a" * 4096
    own = out / f"{res.domain}-nvram.fd"
    assert res.nvram == str(own)
    live = ET.fromstring(libvirt_conn.lookupByName(res.domain).XMLDesc(0))
    assert live.findtext("./os/nvram") == str(own)
    assert_resumed(restored_guest(libvirt_conn, res, out), captured)
    assert own.read_bytes() == flash
    assert g.is_active(), "the original runs on beside its restored copy"

    img = domains.workdir() / "uefi.save"
    ex = export_save(r.id, repo, img, name=f"{g.name}-x")
    assert ex.nvram == str(img.parent / f"{g.name}-x-nvram.fd")
    assert pathlib.Path(ex.nvram).read_bytes() == flash
    assert ET.fromstring(save_image_xml(img)).findtext("./os/nvram") == ex.nvram

    # An opaque stream has no flash image to write: libvirt makes the new store from the
    # firmware's template and the incoming migration fills it (QEMU writes its flash back).
    r2 = capture(CaptureOptions(domain=g.name, repo=repo, parse_memory=False))
    assert r2.memory_format == "opaque"
    res2 = restore(RestoreOptions(archive=r2.id, repo=repo, disk_dir=out, name=f"{g.name}-o"))
    domains.names.append(res2.domain)
    assert any("from the firmware's template" in n for n in res2.notes), res2.notes
    own2 = pathlib.Path(res2.nvram or "")
    assert own2 == out / f"{res2.domain}-nvram.fd"
    restored_guest(libvirt_conn, res2, out).wait_ticks(3)
    template = pathlib.Path(guestlib.OVMF_VARS).read_bytes()
    assert own2.read_bytes() == store.read_bytes() != template


def test_disk_only_archive_restores_as_a_defined_domain_that_boots(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str], domains: Domains
) -> None:
    """A shut-off domain's archive holds its disks, its XML and (UEFI) its variable store:
    it restores as a defined, shut-off domain with disks and store of its own, that boots.
    It used to be refused ("nothing to resume")."""
    spec = guestlib.GuestSpec(params={"tick_ms": 100}, uefi=True)
    repo = str(domains.workdir() / "repo")
    Repository.init(repo, InitOptions()).close()
    g = guestlib.Guest(libvirt_conn, spec, domains.workdir())
    g.create_disks()
    dom = libvirt_conn.defineXML(g.xml)  # persistent: it stays defined when shut off
    domains.names.append(g.name)
    dom.create()  # libvirt makes its variable store; the workload writes its tick block
    g.wait_up()
    g.wait_ticks(2)
    dom.destroy()
    store = g.workdir / "nvram.fd"
    r = capture(CaptureOptions(domain=g.name, repo=repo))
    assert r.kind == "disk-only"
    with Repository.open(repo) as rp:
        a = rp.load_archive(r.id)
        assert rp.open_stream(a, "nvram.fd").read_all() == store.read_bytes()
    with pytest.raises(UsageError, match="holds no memory state"):
        export_save(r.id, repo, domains.workdir() / "x.save")
    with pytest.raises(UsageError, match="holds no memory state"):
        restore(RestoreOptions(archive=r.id, repo=repo, name=f"{g.name}-p", paused=True))

    out = domains.workdir()
    res = restore(RestoreOptions(archive=r.id, repo=repo, disk_dir=out, name=f"{g.name}-d"))
    domains.names.append(res.domain)
    assert (res.state, res.route) == ("shut off", "define")
    d = libvirt_conn.lookupByName(res.domain)
    assert d.isPersistent() and not d.isActive()
    assert res.nvram == str(out / f"{res.domain}-nvram.fd")
    assert pathlib.Path(res.nvram).read_bytes() == store.read_bytes()
    (disk,) = res.disks
    same = subprocess.run(
        ["qemu-img", "compare", str(g.disk_paths[0]), disk.path], capture_output=True, text=True
    )
    assert same.returncode == 0, same.stdout + same.stderr
    d.create()
    booted = restored_guest(libvirt_conn, res, out)
    booted.wait_up()
    assert booted.boot_id not in (None, g.boot_id)  # a fresh boot from the restored disk
    booted.wait_ticks(2)
    assert booted.serial.trouble() == []


def test_negative_control_a_disk_from_another_instant_is_detected(
    libvirt_conn: libvirt.virConnect,
    original: guestlib.Guest,
    repo_path: str,
    captured: Captured,
    domains: Domains,
) -> None:
    """The MISMATCH detector works: a clone whose disk tick block is moved ahead of its
    memory reports it on its first tick.

    Only from an instant outside the workload's check-and-write: one taken after the
    check's read and before the write resumes a guest that overwrites the forged block
    unread (seen once in CI: no MISMATCH in 180 s).  Such an instant shows in the archived
    counter page; the test then takes another capture of the running workload guest."""
    c = captured
    for _ in range(5):
        if c.in_check == 0:
            break
        c = capture_guest(original, repo_path)
    assert c.in_check == 0, f"five captures inside the workload's check-and-write: {c}"
    d = domains.workdir()
    name = "vmatest-negctl"
    domains.names.append(name)
    r = restore(
        opts(
            repo_path,
            c,
            name=name,
            disk_dir=d,
            clone=True,
            paused=True,
            disk_format="raw",
            sync_time=True,
        )
    )
    # The test guest has no agent channel: the skew is reported, the clock not touched.
    assert not r.time_synced and "no guest-agent channel" in r.time_note
    path = pathlib.Path(r.disks[0].path)
    # Holes stay holes: only the archived data is allocated in the rebuilt image.
    assert r.disks[0].bytes_written < r.disks[0].size // 4
    assert path.stat().st_blocks * 512 <= r.disks[0].bytes_written + (1 << 20)
    block = bytearray(guestlib.read_block(path, "raw", guestlib.TICK_OFFSET))
    tb = guestlib.parse_tick_block(bytes(block))
    # Outside the check-and-write, the disk holds exactly what RAM says was written last.
    assert tb is not None and tb.counter == c.last_written, (tb, c)
    ahead = tb.counter + 1000
    block[24:40] = ahead.to_bytes(8, "little") + (ahead ^ ((1 << 64) - 1)).to_bytes(8, "little")
    with path.open("r+b") as f:
        f.seek(guestlib.TICK_OFFSET)
        f.write(block)
    g = restored_guest(libvirt_conn, r, d)
    g.dom.resume()
    mism = g.wait_for("MISMATCH", lambda: g.serial.mismatches())
    assert mism[0].disk == ahead and mism[0].ram == c.last_written
    # ... at the first check after the resume: before any tick line but the captured
    # counter's own (an instant between setting the counter and printing it, as in
    # assert_resumed).
    text = g.serial.text()
    before = re.findall(r"^tick (\d+) ", text[: text.index("MISMATCH")], re.M)
    assert before in ([], [str(c.counter)]), g.serial.tail()
    domains.remove(name)


def test_export_save_restores_with_plain_virsh(
    libvirt_conn: libvirt.virConnect,
    original: guestlib.Guest,
    repo_path: str,
    captured: Captured,
    domains: Domains,
) -> None:
    domains.remove(original.name)  # the image carries the archived UUID
    d = domains.workdir()
    image = d / "guest.save"
    res = export_save(captured.id, repo_path, image)
    assert image.stat().st_size == res.bytes
    with pytest.raises(AlreadyExistsError):
        export_save(captured.id, repo_path, image)
    proc = subprocess.run(
        ["virsh", "-c", guestlib.URI, "restore", str(image)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    log = next(d.glob("*-console0.log"))
    g = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(), d, name=original.name)
    g.serial = guestlib.SerialLog(log)
    assert_resumed(g, captured)
    domains.remove(original.name)
