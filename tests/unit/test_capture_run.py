"""What a capture sets up for its process before it touches the domain (pure: the capture
itself runs against QEMU in tests/integration/test_capture.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from vmarchive.errors import LockedError
from vmarchive.ops import capture
from vmarchive.progress import NULL_PROGRESS


def test_a_capture_keeps_freed_memory_before_it_takes_the_domain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream's 1 MiB read buffers are reused only once glibc keeps freed memory
    (tests/unit/test_restore_feed.py shows the thresholds' effect on a real glibc); the
    capture sets them first thing.  The lock refusing the capture stops it right after."""
    calls: list[str] = []

    def tuned() -> bool:
        calls.append("thresholds")
        return True

    def locked(*_a: Any) -> Any:
        calls.append("domain lock")
        raise LockedError("another capture of g runs")

    monkeypatch.setattr(capture, "keep_freed_memory", tuned)
    monkeypatch.setattr(capture, "domain_lock", locked)
    run = capture._Capture(
        capture.CaptureOptions(domain="g", repo="/r"),
        SimpleNamespace(),  # type: ignore[arg-type]
        SimpleNamespace(uuid="u", name="g"),  # type: ignore[arg-type]
        SimpleNamespace(),  # type: ignore[arg-type]
        NULL_PROGRESS,
        lambda: 0.0,
    )
    with pytest.raises(LockedError):
        run.run()
    assert calls == ["thresholds", "domain lock"]
