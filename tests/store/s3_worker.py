"""A separate process acting on an S3 repository, for the many-writer and fault tests.

Usage::

    s3_worker.py write LOCATION SEED      store crash_writer.content(SEED); retry while gc
                                          holds the exclusive lock; print the archive id
    s3_worker.py gc LOCATION ROUNDS       run gc (default grace) ROUNDS times, skipping a
                                          round while writers hold the repository, then
                                          until one has run (up to 120 s); print how many
    s3_worker.py big LOCATION MIB         store MiB of random data as one archive

The endpoint and credentials come from the environment (as for any user).  Failures end
the process with status 1 and one line on stderr, as the CLI would print it.
"""

from __future__ import annotations

import os
import sys
import time

from crash_writer import content

from vmarchive.errors import LockedError, VmarchiveError
from vmarchive.store import GcOptions, Repository, WriterOptions
from vmarchive.store.s3 import S3Backend, S3Options


def open_repo(location: str) -> Repository:
    # Few attempts: a stopped gateway should fail the process within seconds.
    opts = S3Options.from_env(max_attempts=3, connect_timeout=2, read_timeout=10)
    return Repository.open(location, backend=S3Backend.from_location(location, opts))


def write(location: str, seed: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            repo = open_repo(location)
            with repo.writer(options=WriterOptions(index_flush_entries=16)) as w:
                for name, data in content(seed).items():
                    sw = w.stream(name, "disk", len(data))
                    sw.write(0, data)
                    sw.close()
                aid = w.commit(
                    {"time": f"2026-03-01T00:00:{seed:02d}Z", "domain": f"vm{seed}", "kind": "full"}
                )
            print(aid)
            return
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def gc(location: str, rounds: int) -> None:
    done = 0
    deadline = time.monotonic() + 120
    attempt = 0
    # Writers that start first may hold the repository through every round (a capture
    # started faster than this process did): then gc runs once they let go.
    while attempt < rounds or (done == 0 and time.monotonic() < deadline):
        attempt += 1
        try:
            open_repo(location).gc(GcOptions())
            done += 1
        except LockedError:
            time.sleep(0.05)
    print(done)


def big(location: str, mib: int) -> None:
    repo = open_repo(location)
    size = mib << 20
    with repo.writer() as w:
        sw = w.stream("disk/vda", "disk", size)
        step = 4 << 20
        for off in range(0, size, step):
            sw.write(off, os.urandom(min(step, size - off)))
        sw.close()
        print(w.commit({"time": "2026-03-02T00:00:00Z", "domain": "big", "kind": "full"}))


def main() -> None:
    cmd, location, arg = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        {"write": write, "gc": gc, "big": big}[cmd](location, arg)
    except VmarchiveError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
