"""The benchmark harness's peak RSS counts a command's helper processes (vmarchive's
watchdog, for one), not only the largest of them as wait4() reports it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def test_peak_rss_sums_the_process_tree() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        bl = importlib.import_module("bench_lib")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    # a parent holding 96 MiB while its child holds 128 MiB, both touched, for a while
    child = "b = bytearray(128 << 20); import time; time.sleep(1.5)"
    parent = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}])\n"
        "a = bytearray(96 << 20)\n"
        "p.wait()\n"
    )
    r = bl.run([sys.executable, "-c", parent], sync=False)
    assert r.peak_rss >= (96 + 128) * MiB
    # control: the largest single process, all wait4() knows, stays below the sum
    assert 128 * MiB <= r.single_rss < (96 + 128) * MiB
