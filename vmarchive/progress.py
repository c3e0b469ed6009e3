"""Progress reporting protocol (bottom layer).

The core never prints. Long operations accept a :class:`Progress` and report through
it; the CLI renders it with tqdm, tests pass :data:`NULL_PROGRESS` or a recorder.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    """One measurable piece of work (a disk, the memory stream, a verify pass)."""

    def advance(self, n: int) -> None: ...

    def set_total(self, total: int | None) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, name: str, total: int | None = None, unit: str = "B") -> Task: ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        pass

    def close(self) -> None:
        pass


class _NullProgress:
    def task(self, name: str, total: int | None = None, unit: str = "B") -> Task:
        return _NullTask()


NULL_PROGRESS: Progress = _NullProgress()
