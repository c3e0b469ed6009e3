"""A live capture of a real libvirt guest into an ``s3://`` repository on Ceph, and the
gateway stopped in the middle of one: the capture fails with one clear storage error, the
guest keeps running, no partial archive is listed, the repository verifies and the next
capture succeeds."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest
from s3helpers import Ceph

from vmarchive.errors import BackendError
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.ops.restore import RestoreOptions, clone
from vmarchive.progress import Task
from vmarchive.store import InitOptions, Repository

pytestmark = [pytest.mark.s3, pytest.mark.libvirt]

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402


class _StopGatewayTask:
    def __init__(self, trip: _StopGateway) -> None:
        self._trip = trip

    def advance(self, n: int) -> None:
        self._trip.advanced(n)

    def set_total(self, total: int | None) -> None:
        pass

    def close(self) -> None:
        pass


class _StopGateway:
    """A progress sink that stops radosgw once ``after`` bytes were streamed."""

    def __init__(self, ceph: Ceph, after: int) -> None:
        self._ceph = ceph
        self._left = after
        self._lock = threading.Lock()
        self.stopped = False

    def task(self, name: str, total: int | None = None, unit: str = "B") -> Task:
        return _StopGatewayTask(self)

    def advanced(self, n: int) -> None:
        with self._lock:
            self._left -= n
            if self._left > 0 or self.stopped:
                return
            self.stopped = True
        self._ceph.script("stop-rgw")


@pytest.fixture(scope="module")
def guest(module_guest_factory: guestlib.GuestFactory) -> guestlib.Guest:
    g = module_guest_factory(guestlib.GuestSpec(memory_mib=160, params={"tick_ms": 100}))
    g.wait_ticks(3)
    return g


def test_capture_into_s3_and_gateway_stopped_mid_capture(
    ceph: Ceph,
    guest: guestlib.Guest,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if ceph.base is None:
        pytest.skip("an external S3 store cannot be stopped")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # fail within seconds once the gateway is gone
    location = ceph.fresh_location()
    Repository.init(location, InitOptions()).close()
    state = tmp_path / "state"
    state.mkdir()

    def opts() -> CaptureOptions:
        return CaptureOptions(domain=guest.name, repo=location, uri=guestlib.URI, state_dir=state)

    first = capture(opts())
    trip = _StopGateway(ceph, after=8 << 20)
    try:
        with pytest.raises(BackendError) as ei:
            capture(opts(), trip)
    finally:
        ceph.script("start-rgw")
    assert trip.stopped
    assert "\n" not in str(ei.value) and location.split("/")[2] in str(ei.value)

    # The guest ran on through all of it.
    mark = guest.serial.mark()
    guest.wait_for("a tick after the failed capture", lambda: guest.serial.ticks(mark) or None, 60)

    with Repository.open(location) as repo:
        assert [a.id for a in repo.list_archives()] == [first.id]
        report = repo.verify(full=True)
        assert report.ok, report.problems
    again = capture(opts())
    with Repository.open(location) as repo:
        assert {a.id for a in repo.list_archives()} == {first.id, again.id}
        assert repo.verify(full=True).ok


# --- many hosts, one repository ------------------------------------------------------------


@pytest.fixture(scope="module")
def guest2(module_guest_factory: guestlib.GuestFactory) -> guestlib.Guest:
    g = module_guest_factory(guestlib.GuestSpec(memory_mib=128, params={"tick_ms": 100}))
    g.wait_ticks(3)
    return g


def _cli_capture(location: str, domain: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "vmarchive"),
            "capture",
            domain,
            "--repo",
            location,
            "--connect",
            guestlib.URI,
            "--json",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _capture_retrying(location: str, domain: str) -> str:
    """Capture through the CLI, as a host would; again while gc holds the repository."""
    for _ in range(20):
        p = _cli_capture(location, domain)
        out, err = p.communicate(timeout=300)
        if p.returncode == 0:
            return str(json.loads(out)["id"])
        assert p.returncode == 3 and "locked" in err, (p.returncode, err)
        time.sleep(0.5)
    raise AssertionError("gc held the repository for too long")


def test_two_captures_at_once_with_gc_then_restore_from_s3(
    ceph: Ceph,
    guest: guestlib.Guest,
    guest2: guestlib.Guest,
    libvirt_conn: libvirt.virConnect,
) -> None:
    """Two guests captured at the same time into one s3:// repository while a third
    process runs gc; the repository verifies in full; a clone restored from S3 resumes at
    the captured instant (same boot, counter going on, no mismatch).  (One libvirtd here:
    the second host is played by separate processes.)"""
    location = ceph.fresh_location()
    Repository.init(location, InitOptions()).close()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    gc = subprocess.Popen(
        [sys.executable, str(HERE / "s3_worker.py"), "gc", location, "15"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda g: _capture_retrying(location, g.name), (guest, guest2)))
    out, err = gc.communicate(timeout=300)
    assert gc.returncode == 0 and int(out) >= 1, err

    with Repository.open(location) as repo:
        assert {a.id for a in repo.list_archives()} == set(ids)
        report = repo.verify(full=True)
        assert report.ok, report.problems
        boot = guest.boot_id
        assert boot is not None

    disk_dir = guestlib.make_workdir("vmatest-s3clone-")
    name = guestlib.unique_name()
    try:
        r = clone(RestoreOptions(archive=ids[0], repo=location, name=name, disk_dir=disk_dir))
        serial = guestlib.SerialLog(pathlib.Path(r.serial_logs[0]))
        view = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(), disk_dir, name=name)
        view.serial = serial
        ticks = view.wait_ticks(3)
        assert {t.boot_id for t in ticks} == {boot}  # resumed, not rebooted
        assert [t.n for t in ticks] == list(range(ticks[0].n, ticks[0].n + len(ticks)))
        assert serial.mismatches() == [] and serial.boot_ids() == []
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom = libvirt_conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
        shutil.rmtree(disk_dir, ignore_errors=True)
