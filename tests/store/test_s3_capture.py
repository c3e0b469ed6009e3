"""Live captures of real libvirt guests into ``s3://`` repositories on Ceph.

* The gateway stopped in the middle of a capture: the capture fails with one clear storage
  error, the guest keeps running, no partial archive is listed, the repository verifies
  and the next capture succeeds.
* Two hosts, one repository (issue 9's acceptance): a capture on each of two libvirtd
  instances at once while gc runs in a third process, a full verify, and a restore from S3
  onto the second libvirtd.
"""

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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import libvirt
import pytest
from s3helpers import Ceph

from vmarchive.errors import BackendError
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.ops.restore import RestoreOptions, restore
from vmarchive.progress import Task
from vmarchive.store import InitOptions, Repository
from vmarchive.store.s3 import UNREACHABLE_WAIT_ENV

pytestmark = [pytest.mark.s3, pytest.mark.libvirt]

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

sys.path.insert(0, str(ROOT / "tests" / "integration"))
# The second libvirtd ("another host") and the resume checks of the restore tests.
from test_restore import Captured, assert_resumed, counter_in_archive  # noqa: E402
from test_restore_remote import POOL, second_libvirtd, unix_uri  # noqa: E402, F401


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
    monkeypatch.setenv(UNREACHABLE_WAIT_ENV, "0")  # without waiting for it to come back
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
def guest2(
    second_libvirtd: tuple[str, pathlib.Path],  # noqa: F811  (the imported fixture)
    guest_build: dict[str, str],
) -> Iterator[tuple[guestlib.Guest, str]]:
    """A guest on the second libvirtd (the second host), with the URI a program on that
    host reaches its libvirtd by."""
    uri = unix_uri(second_libvirtd[1])
    conn = libvirt.open(uri)
    wd = guestlib.make_workdir()
    g = guestlib.Guest(conn, guestlib.GuestSpec(memory_mib=128, params={"tick_ms": 100}), wd)
    try:
        g.start()
        g.wait_up()
        g.wait_ticks(3)
        yield g, uri
    finally:
        g.cleanup()
        conn.close()
        shutil.rmtree(wd, ignore_errors=True)


def _cli_capture(location: str, domain: str, uri: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            str(ROOT / ".venv" / "bin" / "vmarchive"),
            "capture",
            domain,
            "--repo",
            location,
            "--connect",
            uri,
            "--json",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _capture_retrying(location: str, domain: str, uri: str) -> str:
    """Capture through the CLI, as a host would; again while gc holds the repository."""
    for _ in range(20):
        p = _cli_capture(location, domain, uri)
        out, err = p.communicate(timeout=300)
        if p.returncode == 0:
            return str(json.loads(out)["id"])
        assert p.returncode == 3 and "locked" in err, (p.returncode, err)
        time.sleep(0.5)
    raise AssertionError("gc held the repository for too long")


def test_two_hosts_one_s3_repository(
    ceph: Ceph,
    guest: guestlib.Guest,
    guest2: tuple[guestlib.Guest, str],
    second_libvirtd: tuple[str, pathlib.Path],  # noqa: F811  (the imported fixture)
) -> None:
    """Issue 9's acceptance: both hosts (the default libvirtd and the second one, each with
    a guest) capture at the same time through the CLI into one s3:// repository while a
    third process runs gc; ``verify --full`` is clean; the first host's archive is restored
    from S3 onto the second libvirtd (its TCP URI only) and resumes at the captured instant
    while the original runs on."""
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
        hosts = ((guest, guestlib.URI), guest2)
        ids = list(pool.map(lambda h: _capture_retrying(location, h[0].name, h[1]), hosts))
    out, err = gc.communicate(timeout=300)
    assert gc.returncode == 0 and int(out) >= 1, err

    with Repository.open(location) as repo:
        assert {a.id for a in repo.list_archives()} == set(ids)
        report = repo.verify(full=True)
        assert report.ok, report.problems
        assert guest.boot_id is not None
        cp = counter_in_archive(repo, ids[0], guest.boot_id)

    uri, pool_dir = second_libvirtd
    r = restore(RestoreOptions(archive=ids[0], repo=location, uri=uri, pool=POOL))
    remote = libvirt.open(uri)
    try:
        assert r.route == "pool" and r.domain == guest.name
        there = guestlib.Guest(remote, guestlib.GuestSpec(), pool_dir, name=guest.name)
        there.serial = guestlib.SerialLog(pathlib.Path(r.serial_logs[0]))
        assert_resumed(
            there, Captured(ids[0], cp.counter, cp.last_written, guest.boot_id, cp.in_check)
        )
        guest.wait_ticks(2, since=guest.serial.mark())  # the original runs on, here
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            remote.lookupByName(guest.name).destroy()
        remote.close()
