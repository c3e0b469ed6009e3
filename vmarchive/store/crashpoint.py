"""Numbered crash points for the crash tests (store layer).

The writer calls :func:`hit` at each step of its write ordering.  When the environment
variable ``VMARCHIVE_CRASH_AT`` is ``"<name>:<n>"`` the process kills itself with SIGKILL
at the ``n``-th time (1-based) it reaches point ``name`` — a real, uncatchable death at a
precise instant, so tests can prove that a crash anywhere leaves a valid repository.
Unset (always, outside tests) it costs one dict lookup.

``VMARCHIVE_HOLD_AT`` = ``"<name>[,<name>...]:<dir>"`` instead *holds* the process at
each point ``name`` (every time it is reached): it creates ``<dir>/<name>.reached``, then
waits until ``<dir>/<name>.release`` exists (at most ``VMARCHIVE_HOLD_TIMEOUT`` seconds, default 120) and goes on.  Tests use it
to look at the guest at an exact step, e.g. dump its RAM while a capture keeps it paused.
"""

from __future__ import annotations

import os
import signal
import threading
import time

_ENV = "VMARCHIVE_CRASH_AT"
_HOLD_ENV = "VMARCHIVE_HOLD_AT"
_counts: dict[str, int] = {}
_mutex = threading.Lock()


def hit(name: str) -> None:
    """Die (or hold) here if the environment asks for it."""
    hold = os.environ.get(_HOLD_ENV)
    if hold:
        _hold(name, hold)
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


def _hold(name: str, spec: str) -> None:
    targets, _, where = spec.rpartition(":")
    if name not in targets.split(",") or not where:
        return
    with open(os.path.join(where, f"{name}.reached"), "w"):
        pass
    deadline = time.monotonic() + float(os.environ.get("VMARCHIVE_HOLD_TIMEOUT", "120"))
    release = os.path.join(where, f"{name}.release")
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.01)
