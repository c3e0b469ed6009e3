"""Helpers shared by the store tests: small repositories and archives without QEMU."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from vmarchive.format.crypto import ScryptParams
from vmarchive.store import InitOptions, Repository
from vmarchive.store.backend import Backend

CHUNK = 4096
PACK = 64 * 1024
PASSPHRASE = "correct horse battery staple"


def small_options(*, encrypted: bool = False, id_algorithm: str = "xxh3-128-keyed") -> InitOptions:
    """4 KiB chunks and 64 KiB packs, so small inputs exercise many chunks and packs."""
    return InitOptions(
        encryption="aes-256-gcm" if encrypted else "none",
        passphrase=PASSPHRASE if encrypted else None,
        id_algorithm=id_algorithm,
        memory_chunk_size=CHUNK,
        disk_chunk_size=CHUNK,
        stream_chunk_size=CHUNK,
        pack_size=PACK,
        scrypt=ScryptParams(log2_n=10, r=8, p=1),
    )


def make_repo(
    path: pathlib.Path, *, encrypted: bool = False, backend: Backend | None = None, **kw: str
) -> Repository:
    return Repository.init(str(path), small_options(encrypted=encrypted, **kw), backend=backend)


def write_archive(
    repo: Repository,
    streams: Mapping[str, bytes],
    *,
    domain: str = "vm1",
    time: str = "2026-01-01T00:00:00Z",
    kind: str = "disk",
    extra: Mapping[str, object] | None = None,
) -> str:
    """Store ``streams`` (name -> bytes) as one archive (``extra``: more metadata); return
    its id."""
    with repo.writer() as w:
        for name, data in streams.items():
            sw = w.stream(name, kind, len(data))
            sw.write(0, data)
            sw.close()
        return w.commit({"time": time, "domain": domain, "kind": "full", **(extra or {})})


def read_archive(repo: Repository, archive_id: str) -> dict[str, bytes]:
    a = repo.load_archive(archive_id)
    return {s.name: repo.open_stream(a, s.name).read_all() for s in a.streams}


def pack_keys(repo: Repository) -> list[str]:
    return sorted(o.key for o in repo.backend.list("data/"))
