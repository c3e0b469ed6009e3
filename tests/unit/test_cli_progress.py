"""Progress bars only where someone watches them."""

from __future__ import annotations

import io
import sys

import pytest

from vmarchive.cli.capture import TqdmProgress, progress_bars
from vmarchive.progress import NULL_PROGRESS


class _Stderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_no_bars_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # cron, a log file, a pipe: the bars' carriage returns would only clutter the log
    monkeypatch.setattr(sys, "stderr", _Stderr(tty=False))
    assert progress_bars(False) is NULL_PROGRESS
    assert progress_bars(False, "web01 ") is NULL_PROGRESS


def test_bars_on_a_terminal_unless_asked_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # the control: on a terminal there are bars, and --json / --no-progress still turn them off
    monkeypatch.setattr(sys, "stderr", _Stderr(tty=True))
    assert isinstance(progress_bars(False), TqdmProgress)
    assert progress_bars(True) is NULL_PROGRESS
