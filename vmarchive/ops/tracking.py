"""Dirty tracking outlives no domain's archives: forget and prune release it (ops).

An archive of a tracked disk names, in ``metadata["tracking"][target]["bitmap"]``, the
QEMU dirty bitmap it started (see :mod:`vmarchive.ops.capture_incr`).  While a domain has
an archive in the repository that bitmap is what makes its next capture incremental.
Once ``forget`` or ``prune`` has removed the *last* archive of a domain whose archives
recorded tracking, the bitmaps only cost the guest write tracking: they are removed from
the domain, found by uuid on the libvirt connection, with the code of ``vmarchive
untrack`` (under the per-domain capture lock).

Only this repository's bitmaps are removed: those its archives of the domain named, and
any other carrying its tag (a capture into it that was interrupted before an archive named
its bitmap); any other ``vmarchive-*`` bitmap (another repository's, or an untagged one
from before bitmaps carried tags) is left and reported.  When the domain cannot be reached
(not on this connection, another host, a capture holding its lock) nothing is removed and
one line says to run ``vmarchive untrack DOMAIN`` where it runs.  A failure here never fails
the forget: the archives are gone either way, and a stray bitmap is never trusted.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from vmarchive.errors import VmarchiveError
from vmarchive.hypervisor import DEFAULT_URI
from vmarchive.ops.repo import RepoRef, open_repo
from vmarchive.store import ArchiveSummary, PrunePolicy, PruneResult

if TYPE_CHECKING:
    # capture_incr brings libvirt and the QMP client: imported only where a forget or a
    # prune has bitmaps to release, so that list, info, verify... start without them.
    from vmarchive.ops.capture_incr import UntrackResult

__all__ = [
    "DEFAULT_URI",
    "ForgetResult",
    "Release",
    "Tracked",
    "forget",
    "prune",
    "release_tracking",
    "released",
    "tracked_domains",
]

log = logging.getLogger(__name__)

Untrack = Callable[[str, str, Path | None, Sequence[str], str | None], "UntrackResult"]


class Tracked(msgspec.Struct, frozen=True):
    """A domain whose archives recorded dirty tracking: what they name."""

    uuid: str
    domain: str
    hosts: frozenset[str]
    bitmaps: frozenset[str]


def tracked_domains(archives: Iterable[ArchiveSummary]) -> dict[str, Tracked]:
    """uuid -> what the archives of that domain recorded (domains without tracking: absent)."""
    acc: dict[str, tuple[str, set[str], set[str]]] = {}
    for a in archives:
        uuid = a.metadata.get("uuid")
        tracking = a.metadata.get("tracking")
        if not isinstance(uuid, str) or not isinstance(tracking, dict):
            continue
        names = {
            str(t["bitmap"]) for t in tracking.values() if isinstance(t, dict) and t.get("bitmap")
        }
        if not names:
            continue
        _dom, hosts, bitmaps = acc.get(uuid, ("", set(), set()))
        hosts.add(str(a.metadata.get("host", "")))
        bitmaps |= names
        acc[uuid] = (a.domain, hosts, bitmaps)  # the last listed archive's name wins
    return {
        u: Tracked(u, dom, frozenset(h), frozenset(b)) for u, (dom, h, b) in sorted(acc.items())
    }


def released(before: Iterable[ArchiveSummary], after: Iterable[ArchiveSummary]) -> list[Tracked]:
    """Tracked domains of ``before`` that have no archive at all in ``after``."""
    remaining = {a.metadata.get("uuid") for a in after}
    return [t for u, t in tracked_domains(before).items() if u not in remaining]


class Release(msgspec.Struct, frozen=True):
    """What happened to one released domain's bitmaps."""

    domain: str
    uuid: str
    #: (node or image, bitmap) removed
    removed: list[tuple[str, str]] = msgspec.field(default_factory=list)
    #: our bitmaps found there but not named by this repository's archives
    left: list[tuple[str, str]] = msgspec.field(default_factory=list)
    #: one line when nothing could be done here (the user runs ``untrack`` there)
    advice: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "uuid": self.uuid,
            "removed": [list(x) for x in self.removed],
            "left": [list(x) for x in self.left],
            "advice": self.advice,
        }

    def lines(self) -> list[str]:
        out = [f"removed {n} from {self.domain} ({w})" for w, n in self.removed]
        if self.left:
            out.append(
                f"{len(self.left)} other vmarchive bitmaps left on {self.domain} (another "
                f"repository's or an interrupted capture's): `vmarchive untrack "
                f"{self.domain}` removes them"
            )
        if self.advice:
            out.append(self.advice)
        return out


def release_tracking(
    domains: Iterable[Tracked],
    uri: str,
    state_dir: Path | None = None,
    untrack_fn: Untrack | None = None,
    repository_id: bytes | None = None,
) -> list[Release]:
    """Remove the named bitmaps of each released domain reachable on ``uri``, and with the
    ``repository_id`` of the repository the archives were in, every other bitmap tagged
    for it (a stray of an interrupted capture: no archive of it is left to trust it);
    other repositories' bitmaps stay (``untrack_fn``:
    :func:`vmarchive.ops.capture_incr.untrack` unless given).

    Never raises for a domain it cannot reach: its :class:`Release` carries the advice.
    """
    todo = list(domains)
    if not todo:
        return []
    from vmarchive.ops.capture_incr import repository_tag, untrack

    if untrack_fn is None:
        untrack_fn = untrack
    tag = None if repository_id is None else repository_tag(repository_id)
    out: list[Release] = []
    here = socket.gethostname()
    for t in todo:
        try:
            r = untrack_fn(t.uuid, uri, state_dir, sorted(t.bitmaps), tag)
        except VmarchiveError as e:
            log.info("cannot release the bitmaps of %s: %s", t.domain, e)
            out.append(Release(t.domain, t.uuid, advice=_advice(t, f"{e}".splitlines()[0])))
            continue
        advice = None
        if not r.removed and t.hosts - {here}:
            # Not found here: it was tracked on another host (migrated or restored there).
            advice = _advice(t, f"no bitmap of its archives on {uri}")
        out.append(Release(t.domain, t.uuid, r.removed, r.left, advice))
    return out


def _advice(t: Tracked, why: str) -> str:
    on = ", ".join(sorted(h for h in t.hosts if h)) or "its host"
    return (
        f"{t.domain}: its last archive is gone but its dirty bitmaps could not be removed "
        f"({why}); run `vmarchive untrack {t.domain}` on {on}"
    )


class ForgetResult(msgspec.Struct, frozen=True):
    forgotten: list[str]
    released: list[Release]


def forget(
    ref: RepoRef, names: Sequence[str], uri: str, state_dir: Path | None = None
) -> ForgetResult:
    """Forget archives; release the tracking of domains left without any archive.

    Raises NotFoundError, AmbiguousError, LockedError (nothing forgotten then).
    """
    repo = open_repo(ref)
    before = repo.list_archives()
    ids = repo.forget(names)
    gone = released(before, repo.list_archives())
    rid = repo.codecs.config.repository_id
    return ForgetResult(ids, release_tracking(gone, uri, state_dir, repository_id=rid))


def prune(
    ref: RepoRef,
    policy: PrunePolicy,
    dry_run: bool,
    uri: str,
    state_dir: Path | None = None,
    domains: Sequence[str] = (),
) -> tuple[PruneResult, list[Release]]:
    """Prune (only ``domains``' archives when given); release the tracking of domains left
    without any archive (not in a dry run).

    Raises UsageError (empty policy), LockedError.
    """
    repo = open_repo(ref)
    before = repo.list_archives()
    result = repo.prune(policy, dry_run=dry_run, domains=domains)
    if dry_run:
        return result, []
    gone = released(before, repo.list_archives())
    rid = repo.codecs.config.repository_id
    return result, release_tracking(gone, uri, state_dir, repository_id=rid)
