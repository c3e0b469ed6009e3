"""A gc process for the crash tests (usage: crash_gc.py REPO); see crashpoint.py."""

from __future__ import annotations

import sys

from vmarchive.store import GcOptions, Repository

if __name__ == "__main__":
    print(Repository.open(sys.argv[1]).gc(GcOptions(grace=0, repack_below=0.9)))
