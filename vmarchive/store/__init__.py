"""Store layer: the deduplicating, content-addressed repository and its storage backends.

``backend`` (object-store shaped interface) <- ``local`` / ``faulty`` backends;
``codecs`` is the one seam onto ``vmarchive.format``; ``chunkindex`` the compact
in-memory index; ``writer`` / ``reader`` stream data in and out; ``locking`` the
shared/exclusive locks; ``maintenance`` verify, stats, forget, prune and gc;
``repository`` ties them together.  The store knows nothing about QEMU or libvirt.
"""

from typing import TYPE_CHECKING, Any

from vmarchive.store.backend import Backend, ObjectInfo, ObjectNotFoundError, open_backend
from vmarchive.store.codecs import InitOptions, StreamInfo
from vmarchive.store.locking import LockContext
from vmarchive.store.reader import Extent, StreamReader
from vmarchive.store.repository import Archive, ArchiveSummary, Repository
from vmarchive.store.writer import ArchiveWriter, StreamStats, StreamWriter, WriterOptions

if TYPE_CHECKING:
    from vmarchive.store.maintenance import (
        GcOptions,
        GcResult,
        PrunePolicy,
        PruneResult,
        RebuildResult,
        RepoStats,
        VerifyReport,
    )

#: Names of ``maintenance`` (verify, stats, forget, prune, gc), imported on first use: a
#: capture never needs them (a restore does: it verifies its archive), and the module is
#: one of the store's largest (~10 ms of a command's start-up).
_MAINTENANCE = frozenset(
    {
        "GcOptions",
        "GcResult",
        "PrunePolicy",
        "PruneResult",
        "RebuildResult",
        "RepoStats",
        "VerifyReport",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MAINTENANCE:
        from vmarchive.store import maintenance

        return getattr(maintenance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Archive",
    "ArchiveSummary",
    "ArchiveWriter",
    "Backend",
    "Extent",
    "GcOptions",
    "GcResult",
    "InitOptions",
    "LockContext",
    "ObjectInfo",
    "ObjectNotFoundError",
    "PrunePolicy",
    "PruneResult",
    "RebuildResult",
    "RepoStats",
    "Repository",
    "StreamInfo",
    "StreamReader",
    "StreamStats",
    "StreamWriter",
    "VerifyReport",
    "WriterOptions",
    "open_backend",
]
