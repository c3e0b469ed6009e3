"""limit_malloc_arenas: threads started after it share at most two glibc arenas."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Six threads alive at once, each allocating through malloc (objects above pymalloc's
# 512 bytes); glibc gives each new thread an arena of its own up to its limit; then
# malloc_stats() prints one "Arena N:" block per arena to stderr.
PROBE = """
import ctypes, sys, threading
if sys.argv[1] == "limit":
    from vmarchive.cli.app import limit_malloc_arenas
    assert limit_malloc_arenas()
barrier = threading.Barrier(6)
kept = []
def work():
    kept.append([bytes(2000) for _ in range(200)])
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str) -> int:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return sum(1 for line in r.stderr.splitlines() if line.startswith("Arena "))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_threads_share_two_arenas() -> None:
    assert _arenas("default") > 2  # control: glibc's default gives the threads their own
    assert _arenas("limit") <= 2
