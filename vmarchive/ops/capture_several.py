"""Capture several domains, or every running one, in one command (ops layer).

A host's guests are captured one after the other by one process: one libvirt connection,
one open repository (its chunk index loaded once), the interpreter started once.  One at a
time on purpose: a capture keeps the host's cores busy (parsing, hashing, compressing), so
two at once would only stretch both, and each guest's pause stays its own.

A domain that fails does not stop the others: its error is reported and the next one is
captured (each capture leaves its guest running and the repository valid whatever
happens).  An interrupt (Ctrl-C) stops after the capture it interrupted has cleaned
up; the domains not reached are listed as skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import msgspec

from vmarchive.errors import InterruptedError_, UsageError, VmarchiveError
from vmarchive.hypervisor.connection import Connection, Domain
from vmarchive.ops.capture import CaptureOptions, CaptureResult, capture_domain
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import Repository

log = logging.getLogger(__name__)

T = TypeVar("T")


class CaptureFailure(msgspec.Struct, frozen=True):
    """A domain whose capture failed; ``exit_code`` is the one its error alone would give."""

    domain: str
    message: str
    exit_code: int

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "error": self.message, "exit_code": self.exit_code}


Outcome = CaptureResult | CaptureFailure


class SeveralResult(msgspec.Struct, frozen=True):
    """What a several-domain capture did, in the order the domains were taken."""

    outcomes: list[Outcome] = msgspec.field(default_factory=list)
    #: domains not attempted because an interrupt stopped the run
    skipped: list[str] = msgspec.field(default_factory=list)
    interrupted: bool = False

    @property
    def captures(self) -> list[CaptureResult]:
        return [o for o in self.outcomes if isinstance(o, CaptureResult)]

    @property
    def failures(self) -> list[CaptureFailure]:
        return [o for o in self.outcomes if isinstance(o, CaptureFailure)]

    @property
    def exit_code(self) -> int:
        """6 when interrupted, else the first failure's code, else 0."""
        if self.interrupted:
            return InterruptedError_.exit_code
        return self.failures[0].exit_code if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "captures": [c.to_json() for c in self.captures],
            "failures": [f.to_json() for f in self.failures],
            "skipped": list(self.skipped),
            "interrupted": self.interrupted,
        }


def run_each(
    items: Sequence[T],
    name_of: Callable[[T], str],
    one: Callable[[T], CaptureResult],
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
) -> SeveralResult:
    """Run ``one`` on each item in turn; a failure is recorded and the next item runs, an
    interrupt records the item it hit and stops.  ``on_outcome`` sees each outcome as it
    comes (the CLI prints it then)."""
    outcomes: list[Outcome] = []
    for i, item in enumerate(items):
        name = name_of(item)
        stop = False
        out: Outcome
        try:
            out = one(item)
        except (InterruptedError_, KeyboardInterrupt) as e:
            msg = e.message if isinstance(e, InterruptedError_) else "interrupted"
            out, stop = CaptureFailure(name, msg, InterruptedError_.exit_code), True
        except VmarchiveError as e:
            out = CaptureFailure(name, e.message, e.exit_code)
        except Exception as e:  # a bug met by one domain's capture: the others still run
            log.debug("capture of %s failed", name, exc_info=True)
            msg = f"internal error: {type(e).__name__}: {e} (run with --debug for details)"
            out = CaptureFailure(name, msg, 1)
        outcomes.append(out)
        on_outcome(out)
        if stop:
            return SeveralResult(outcomes, [name_of(x) for x in items[i + 1 :]], True)
    return SeveralResult(outcomes)


def check_selection(names: Sequence[str], all_active: bool, exclude: Sequence[str]) -> None:
    """Raises UsageError for names and ``--all`` together, neither, or ``--exclude``
    without ``--all``."""
    if all_active and names:
        raise UsageError("give domain names or --all, not both")
    if not all_active and exclude:
        raise UsageError("--exclude goes with --all")
    if not all_active and not names:
        raise UsageError("name a domain to capture, or give --all")


def select_domains(
    conn: Connection, names: Sequence[str], all_active: bool, exclude: Sequence[str]
) -> list[Domain]:
    """The domains to capture: ``names`` (each looked up, duplicates dropped), or with
    ``all_active`` every running or paused domain, by name, but those in ``exclude``.

    Raises:
        UsageError: see :func:`check_selection`.
        DomainNotFoundError: a named domain does not exist (before anything is captured).
    """
    check_selection(names, all_active, exclude)
    if not all_active:
        out: dict[str, Domain] = {}
        for n in names:
            d = conn.lookup(n)
            out.setdefault(d.uuid, d)
        return list(out.values())
    skip = set(exclude)
    if skip:
        known = {x for d in conn.list_domains() for x in (d.name, d.uuid)}
        for x in sorted(skip - known):
            log.warning("--exclude %s: no such domain", x)
    active = conn.list_domains(active_only=True)
    return sorted(
        (d for d in active if d.name not in skip and d.uuid not in skip), key=lambda d: d.name
    )


def capture_several(
    options: CaptureOptions,
    names: Sequence[str],
    *,
    all_active: bool = False,
    exclude: Sequence[str] = (),
    progress_for: Callable[[str], Progress] = lambda _name: NULL_PROGRESS,
    on_outcome: Callable[[Outcome], None] = lambda _o: None,
    clock: Callable[[], float] = time.time,
) -> SeveralResult:
    """Capture each selected domain (:func:`select_domains`) into ``options.repo`` with
    ``options`` (its ``domain`` is replaced by each one's name), one after the other.

    Raises (before any capture; later errors are outcomes):
        RepositoryNotFoundError, ...: the repository cannot be opened.
        ConnectionFailedError, DomainNotFoundError, UsageError: bad URI, names, options.
    """
    check_selection(names, all_active, exclude)
    repo = Repository.open(options.repo, options.passphrase)
    try:
        with Connection.open(options.uri) as conn:
            doms = select_domains(conn, names, all_active, exclude)

            def one(d: Domain) -> CaptureResult:
                o = dataclasses.replace(options, domain=d.name)
                return capture_domain(o, conn, d, repo, progress_for(d.name), clock=clock)

            return run_each(doms, lambda d: d.name, one, on_outcome)
    finally:
        repo.close()
