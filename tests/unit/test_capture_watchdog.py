"""Watchdog.release: who waits for the watchdog process, and when."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmarchive.ops.capture_watchdog import Watchdog

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
    wd = Watchdog(tmp_path, UUID, "guest", "test:///default")
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
