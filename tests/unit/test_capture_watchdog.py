"""The capture watchdog: who waits for its process, and when; arming a started one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmarchive.ops import capture_watchdog
from vmarchive.ops.capture_watchdog import Watchdog, log_path, marker_path

UUID = "6f1c2f3a-0000-4000-8000-000000000001"


class _Proc:
    """Stands in for the watchdog's Popen: records the thread that waits for it."""

    def __init__(self) -> None:
        self.waited_on: list[str] = []
        self.reaped = threading.Event()

    def wait(self, timeout: float | None = None) -> int:
        self.waited_on.append(threading.current_thread().name)
        self.reaped.set()
        return 0


@pytest.fixture
def watchdog(tmp_path: Path) -> Iterator[tuple[Watchdog, _Proc]]:
    wd = Watchdog.start(tmp_path, UUID, "guest", "test:///default")
    real = wd._proc
    assert real is not None, "the watchdog process did not start"
    stub = _Proc()
    wd._proc = stub  # type: ignore[assignment]
    yield wd, stub
    real.kill()
    real.wait(10)


def test_release_without_marker_does_not_wait_on_the_caller(
    watchdog: tuple[Watchdog, _Proc],
) -> None:
    wd, proc = watchdog
    wd.release()
    assert proc.reaped.wait(10), "nobody reaps the watchdog"
    assert proc.waited_on == ["watchdog-reaper"]


def test_release_with_marker_waits_for_the_watchdog_cleanup(
    watchdog: tuple[Watchdog, _Proc], tmp_path: Path
) -> None:
    # The capture's own clean-up left its marker: the watchdog cleans up now, and the
    # command must not end before it did.
    (tmp_path / f"{UUID}.json").write_text("{}")
    wd, proc = watchdog
    wd.release()
    assert proc.waited_on == [threading.current_thread().name]


def test_release_is_idempotent(watchdog: tuple[Watchdog, _Proc]) -> None:
    wd, proc = watchdog
    wd.release()
    wd.release()
    assert proc.reaped.wait(10)
    assert proc.waited_on == ["watchdog-reaper"]


def _exit_code(wd: Watchdog) -> int:
    proc = wd._proc
    assert proc is not None
    wd.release()
    return proc.wait(30)


def test_armed_watchdog_cleans_up_after_a_capture_that_left_its_marker(
    tmp_path: Path,
) -> None:
    # The capture died with its marker: the watchdog, told its domain over the socket
    # after it started, cleans up (the domain is unknown to libvirt's test driver, so
    # only the files are left to it) and says so in its log.
    marker_path(tmp_path, UUID).write_text("{}")
    wd = Watchdog()
    assert wd.arm(tmp_path, UUID, "guest", "test:///default")
    assert _exit_code(wd) == 0
    said = log_path(tmp_path, UUID).read_text()
    assert "ended abnormally; cleaning up" in said, said
    assert said.rstrip().endswith("done"), said


def test_unarmed_watchdog_exits_without_acting(tmp_path: Path) -> None:
    # Control for the test above: the same marker, but never told which domain to watch.
    marker_path(tmp_path, UUID).write_text("{}")
    wd = Watchdog()
    assert _exit_code(wd) == 0
    assert not log_path(tmp_path, UUID).exists()
    assert marker_path(tmp_path, UUID).exists()


@pytest.fixture
def no_spare() -> Iterator[None]:
    capture_watchdog._spare = None
    yield
    spare, capture_watchdog._spare = capture_watchdog._spare, None
    if spare is not None:
        spare.release()


def _kill(wd: Watchdog) -> None:
    proc = wd._proc
    assert proc is not None
    proc.kill()
    proc.wait(10)


def test_start_arms_the_prestarted_watchdog(tmp_path: Path, no_spare: None) -> None:
    capture_watchdog.prestart()
    spare = capture_watchdog._spare
    assert spare is not None and spare.alive()
    wd = Watchdog.start(tmp_path, UUID, "guest", "test:///default")
    try:
        assert wd is spare
        assert capture_watchdog._spare is None
        # Control: with no watchdog waiting, start() starts one.
        other = Watchdog.start(tmp_path, UUID, "guest", "test:///default")
        assert other is not spare and other.alive()
        _kill(other)
    finally:
        _kill(wd)


def test_start_replaces_a_prestarted_watchdog_that_died(tmp_path: Path, no_spare: None) -> None:
    capture_watchdog.prestart()
    spare = capture_watchdog._spare
    assert spare is not None
    _kill(spare)
    wd = Watchdog.start(tmp_path, UUID, "guest", "test:///default")
    try:
        assert wd is not spare and wd.alive()
    finally:
        _kill(wd)
