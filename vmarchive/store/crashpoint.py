"""Numbered crash points for the crash tests (store layer).

The writer calls :func:`hit` at each step of its write ordering.  When the environment
variable ``VMARCHIVE_CRASH_AT`` is ``"<name>:<n>"`` the process kills itself with SIGKILL
at the ``n``-th time (1-based) it reaches point ``name`` — a real, uncatchable death at a
precise instant, so tests can prove that a crash anywhere leaves a valid repository.
Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_ENV = "VMARCHIVE_CRASH_AT"
_counts: dict[str, int] = {}
_mutex = threading.Lock()


def hit(name: str) -> None:
    """Die here if the environment asks for it."""
    spec = os.environ.get(_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    with _mutex:
        _counts[name] = _counts.get(name, 0) + 1
        count = _counts[name]
    if count == int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)
