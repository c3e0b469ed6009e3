"""A live capture of a real libvirt guest into an ``s3://`` repository on Ceph, and the
gateway stopped in the middle of one: the capture fails with one clear storage error, the
guest keeps running, no partial archive is listed, the repository verifies and the next
capture succeeds."""

from __future__ import annotations

import pathlib
import sys
import threading

import pytest
from conftest import Ceph

from vmarchive.errors import BackendError
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.progress import Task
from vmarchive.store import InitOptions, Repository

pytestmark = [pytest.mark.s3, pytest.mark.libvirt]

ROOT = pathlib.Path(__file__).resolve().parents[2]
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
