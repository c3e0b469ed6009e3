#!/usr/bin/env python3
"""What listing archives costs as a repository fills up with them (issues 7 and 8 at scale).

Every capture lists the repository's archives to find its parent (the newest archive of
its guest), and ``list`` and ``prune`` list them all.  Summaries come from the local
summary cache (``vmarchive/store/summarycache.py``); this measures what is left: the
listing of ``archives/``, reading the cached entries, and decoding them -- all of them
for ``list``, only the guest's for a capture (``Repository.list_archives(uuid=...)``).

A local repository gets ``--archives`` archives of ``--guests`` guests in turn, each
archive one tiny disk stream and the metadata a capture writes (about 3.4 KB of JSON as
summary: memory, disks, tracking, memory map, migration figures; synthesized here in the
shapes a capture's has).  The cache is filled once; then, ``--rounds`` times, a fresh
process times one listing of every archive and another one listing one guest's (the
process start and the imports are not counted).  Reported: medians and the spread.

Usage: scripts/bench_listing.py [--archives 2000] [--guests 50] [--rounds 6]
                                [--workdir DIR]
(run it with PYTHONPATH pointing at another tree to compare two versions).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def metadata(i: int, guests: int) -> dict[str, Any]:
    """Archive ``i``'s metadata, shaped and sized as a capture's (guest ``i % guests``)."""
    g = i % guests
    uuid = f"0000{g:04x}-aaaa-bbbb-cccc-dddddddddddd"
    t = f"2026-01-{1 + i // 1440 % 28:02d}T{i // 60 % 24:02d}:{i % 60:02d}:00+00:00"
    disks = [
        {
            "target": target,
            "bytes_read": 10551296,
            "bytes_referenced": 1031536640,
            "bytes_stored": 41615360,
            "incremental": True,
            "fallback_reason": None,
            "size": 1073741824,
        }
        for target in ("vda", "vdb")
    ]
    return {
        "time": t,
        "domain": f"guest-{g:03d}",
        "uuid": uuid,
        "kind": "full",
        "host": "bench-host",
        "arch": "x86_64",
        "machine": "pc-q35-7.2",
        "vcpus": 1,
        "mode": "snapshot",
        "guest_pause_ms": 9.3 + i % 7,
        "parent": f"{i - guests:064x}" if i >= guests else None,
        "tags": [],
        "capture": {
            "start": t,
            "instant": t,
            "end": t,
        },
        "disks": disks,
        "disk_delay_s": None,
        "memory": {
            "format": "parsed",
            "refused": None,
            "stream_bytes": 344480583,
            "blocks": [
                {"name": "pc.ram", "size": 536870912, "page_size": 4096},
                {"name": "/rom@etc/acpi/tables", "size": 131072, "page_size": 4096},
                {"name": "pc.bios", "size": 262144, "page_size": 4096},
            ],
            "device_sections": 58,
            "devstate_bytes": 421337,
            "page_records": 84133,
            "zero_records": 47000,
            "resent_pages": 0,
            "unsent_pages": 0,
            "chunks_reopened": 0,
            "roundtrip": {"ok": True, "slots_checked_live": 412, "slots_from_parent": 7780},
        },
        "memory_map": {
            "regions": [
                {"name": f"region-{k}", "start": k << 20, "size": 1 << 20, "block": "pc.ram"}
                for k in range(15)
            ]
        },
        "migration": {"total-time": 212, "downtime": 3, "setup-time": 1, "ram": {"total": 1}},
        "tracking": {
            d["target"]: {
                "bitmap": f"vmarchive-{i:016x}",
                "host": "bench-host",
                "uuid": uuid,
                "source": f"/var/lib/libvirt/images/guest-{g:03d}-{d['target']}.qcow2",
                "size": 1073741824,
                "format": "qcow2",
                "qemu": f"qemu-instance-{g}",
            }
            for d in disks
        },
        "versions": {"vmarchive": "0.1.0", "qemu": "7.2.22", "libvirt": "9.0.0"},
    }


def build(repo_dir: Path, archives: int, guests: int) -> None:
    from vmarchive.store import Repository
    from vmarchive.store.codecs import InitOptions

    repo = Repository.init(str(repo_dir), InitOptions())
    try:
        t = time.perf_counter()
        for i in range(archives):
            with repo.writer() as w:
                sw = w.stream("disk:vda", "disk", 4096)
                sw.write(0, os.urandom(4096))
                sw.close()
                w.commit(metadata(i, guests))
        made = time.perf_counter() - t
        t = time.perf_counter()
        listed = repo.list_archives()  # fills the summary cache
        size = len(json.dumps(listed[-1].to_json()))
        print(
            f"  built {archives} archives in {made:.1f} s; the cache filled in"
            f" {time.perf_counter() - t:.1f} s; a summary is {size} bytes of JSON",
            flush=True,
        )
    finally:
        repo.close()


def child(repo_dir: str, uuid: str) -> None:
    """One process, one listing timed: every archive (``uuid`` empty, as ``list``), or
    those of the guest ``uuid`` (as a capture looking for its parent)."""
    from vmarchive.store import Repository

    with Repository.open(repo_dir) as repo:
        t = time.perf_counter()
        if not uuid:
            listed = repo.list_archives()
        elif "uuid" in inspect.signature(repo.list_archives).parameters:
            listed = repo.list_archives(uuid=uuid)
        else:  # a tree from before list_archives(uuid=...): as its capture did
            listed = [s for s in repo.list_archives() if s.metadata.get("uuid") == uuid]
        took = time.perf_counter() - t
    print(json.dumps({"s": took, "listed": len(listed)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archives", type=int, default=2000)
    ap.add_argument("--guests", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workdir", default=None, help="where the repository goes (default: /var/tmp)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    base = Path(tempfile.mkdtemp(prefix="vmarchive-bench-listing-", dir=a.workdir or "/var/tmp"))
    os.environ["VMARCHIVE_CACHE_DIR"] = str(base / "cache")  # here and in the children
    try:
        repo_dir = base / "repo"
        print(f"{a.archives} archives of {a.guests} guests:", flush=True)
        build(repo_dir, a.archives, a.guests)
        uuid = str(metadata(a.guests // 2, a.guests)["uuid"])
        runs: dict[str, list[dict[str, Any]]] = {"all": [], "guest": []}
        for _ in range(a.rounds):
            for key, arg in (("all", ""), ("guest", uuid)):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(repo_dir), arg],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                runs[key].append(json.loads(out.strip().splitlines()[-1]))
        row: dict[str, Any] = {"archives": a.archives, "guests": a.guests}
        for key, label in (("all", "every archive"), ("guest", "one guest's")):
            times = sorted(r["s"] for r in runs[key])
            row[f"{key}_s"] = statistics.median(times)
            row[f"{key}_listed"] = runs[key][0]["listed"]
            print(
                f"  list {label} ({runs[key][0]['listed']} listed): median"
                f" {1000 * statistics.median(times):.1f} ms,"
                f" {1000 * times[0]:.1f}-{1000 * times[-1]:.1f} ms",
                flush=True,
            )
        print(json.dumps(row))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
