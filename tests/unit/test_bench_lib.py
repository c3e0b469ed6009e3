"""The benchmark harness's peak RSS counts a command's helper processes (vmarchive's
watchdog, for one), not only the largest of them as wait4() reports it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]

# A parent holding 96 MiB while its child holds 128 MiB, both touched, for a while.  The
# harness runs in a small process of its own: a child forked from a large one (this test
# run) starts with that process's pages, which wait4() then reports as the child's peak.
_MEASURE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_lib
child = "b = bytearray(128 << 20); import time; time.sleep(1.5)"
parent = (
    "import subprocess, sys\\n"
    f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\\n"
    "a = bytearray(96 << 20)\\n"
    "p.wait()\\n"
)
r = bench_lib.run([sys.executable, "-c", parent], sync=False)
print(json.dumps({"peak": r.peak_rss, "single": r.single_rss}))
"""


def test_peak_rss_sums_the_process_tree() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ROOT / "scripts")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    r = json.loads(out)
    assert r["peak"] >= (96 + 128) * MiB
    # control: the largest single process, all wait4() knows, stays below the sum
    assert 128 * MiB <= r["single"] < (96 + 128) * MiB


_EXIT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import bench_lib
if sys.argv[2] == "no-pidfd":
    del os.pidfd_open  # as on Linux < 5.3
r = bench_lib.run([sys.executable, "-c", "pass"], sync=False, poll=3.0)
print(json.dumps({"wall": r.wall_s}))
"""


def _wall(how: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _EXIT, str(ROOT / "scripts"), how],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)["wall"])


def test_wall_time_ends_when_the_process_does_not_at_the_next_sample() -> None:
    # A command that ends at once, sampled every 3 s: its wall time is its own, not 3 s.
    assert _wall("pidfd") < 2.0
    # control: without a pidfd the harness can only sleep to the next sample
    assert _wall("no-pidfd") >= 3.0
