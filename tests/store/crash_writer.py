"""A writer process for the crash tests: stores one archive, maybe dying on the way.

Usage: crash_writer.py REPO SEED.  VMARCHIVE_CRASH_AT=<point>:<n> makes it SIGKILL itself
(see vmarchive/store/crashpoint.py).  Prints the archive id when it gets to the end.
"""

from __future__ import annotations

import random
import sys

from vmarchive.store import Repository, WriterOptions


def content(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        "disk/vda": rng.randbytes(40 * 4096) + bytes(8 * 4096) + rng.randbytes(30 * 4096 + 5),
        "ram/pc.ram": rng.randbytes(4096) * 12 + rng.randbytes(20 * 4096),
        "domain.xml": b"<domain type='kvm'/>",
    }


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    repo = Repository.open(path)
    with repo.writer(options=WriterOptions(index_flush_entries=16)) as w:
        for name, data in content(seed).items():
            sw = w.stream(name, "disk", len(data))
            sw.write(0, data)
            sw.close()
        aid = w.commit(
            {"time": f"2026-02-01T00:00:{seed:02d}Z", "domain": f"vm{seed}", "kind": "full"}
        )
    print(aid)


if __name__ == "__main__":
    main()
