"""Repository use cases (ops layer): open, init, list, info, stats, verify, forget, prune, gc.

Thin on purpose: each function opens the repository named by a :class:`RepoRef`, calls
one store operation and returns the store's typed result.  The CLI renders results; other
ops (capture, restore) open repositories the same way through :func:`open_repo`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import (
    Archive,
    ArchiveSummary,
    GcOptions,
    GcResult,
    InitOptions,
    PrunePolicy,
    PruneResult,
    RebuildResult,
    Repository,
    RepoStats,
    VerifyReport,
)


@dataclass(frozen=True)
class RepoRef:
    """Where a repository is and how to get its passphrase (asked only when encrypted)."""

    location: str
    passphrase: str | Callable[[], str] | None = field(default=None, repr=False)


def open_repo(ref: RepoRef) -> Repository:
    """Raises RepositoryNotFoundError, WrongKeyError, UnsupportedVersionError, BackendError."""
    return Repository.open(ref.location, ref.passphrase)


def init_repo(location: str, options: InitOptions) -> Repository:
    """Raises AlreadyExistsError, UsageError, BackendError."""
    return Repository.init(location, options)


def list_archives(
    ref: RepoRef, domain: str | None = None, tags: Sequence[str] = ()
) -> list[ArchiveSummary]:
    """Oldest first; only ``domain``'s (name or UUID) and those with every tag in ``tags``."""
    return [
        a
        for a in open_repo(ref).list_archives()
        if (domain is None or a.of_domain(domain)) and all(t in a.tags for t in tags)
    ]


def archive_info(ref: RepoRef, name: str) -> Archive:
    """Raises NotFoundError, AmbiguousError, DamageError."""
    return open_repo(ref).load_archive(name)


def repo_stats(ref: RepoRef) -> RepoStats:
    return open_repo(ref).stats()


def verify(
    ref: RepoRef, names: Sequence[str] | None, full: bool, progress: Progress = NULL_PROGRESS
) -> VerifyReport:
    """Damage is reported in the result; raises NotFoundError/AmbiguousError for bad names."""
    return open_repo(ref).verify(names or None, full=full, progress=progress)


def forget(ref: RepoRef, names: Sequence[str]) -> list[str]:
    """Raises NotFoundError, AmbiguousError, LockedError."""
    return open_repo(ref).forget(names)


def prune(ref: RepoRef, policy: PrunePolicy, dry_run: bool) -> PruneResult:
    """Raises UsageError (empty policy), LockedError."""
    return open_repo(ref).prune(policy, dry_run=dry_run)


def gc(ref: RepoRef, options: GcOptions, progress: Progress = NULL_PROGRESS) -> GcResult:
    """Raises LockedError, DamageError (unreadable manifest or index: nothing deleted)."""
    return open_repo(ref).gc(options, progress=progress)


def rebuild_index(ref: RepoRef, dry_run: bool) -> RebuildResult:
    """Raises LockedError, BackendError."""
    return open_repo(ref).rebuild_index(dry_run=dry_run)
