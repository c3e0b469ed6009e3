"""Leftovers of a capture: the per-domain lock, the marker file and the QEMU cleanup (ops layer).

A capture changes a running QEMU: migration capabilities and parameters, temporary block
nodes (overlays in switchover mode, fleecing images in snapshot mode), block jobs, an NBD
server with exports, fd sets, temporary image files.  Everything it creates in QEMU is
named with the prefix ``vmarchive-``, and everything else it changes is written to a
marker file *before* the change is made.  :func:`clean_domain` undoes all of it from the
marker and from what QEMU reports, in a safe order.  The same function ends every capture
(in ``finally``) and starts the next one, so a capture killed at any point (``kill -9``)
is cleaned up by the next vmarchive run on that host.

The per-domain lock (``flock`` on ``<state dir>/<uuid>.lock``) also keeps two captures
of the same domain from running at once; the kernel drops it when the process dies, so
a held lock always means a live capture.  The holder unlinks the file before it lets go
(a host that captured thousands of domains keeps no file per domain), so a taker checks
that the file it locked is still the one at the path, and tries again if not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmarchive.errors import (
    DomainNotFoundError,
    HostPreconditionError,
    HypervisorError,
    LockedError,
    QMPCommandError,
)
from vmarchive.hypervisor.connection import Domain
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops.capture_dropcache import restore_options
from vmarchive.ops.capture_watchdog import marker_path
from vmarchive.store import crashpoint

log = logging.getLogger(__name__)

#: Every QEMU object a capture creates (node, job, export, fd name, fd set opaque) starts so.
PREFIX = "vmarchive-"

#: Migration states in which a migration is still running (may be cancelled).
MIGRATION_ACTIVE = frozenset(
    {"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "postcopy-active"}
)

#: Run states in which QEMU's vCPUs stand still.
STOPPED_RUNSTATES = frozenset({"paused", "postmigrate", "finish-migrate", "prelaunch"})
#: How long a cancelled migration may take to end before it is taken for stuck (see
#: _unstick_cancel), and then to end after it was woken (s).
CANCEL_FIRST_WAIT_S = 2.0
CANCEL_WAIT_S = 30.0

DEFAULT_STATE_DIR = "/run/vmarchive"


def default_state_dir() -> Path:
    """Where locks and markers live (``VMARCHIVE_STATE_DIR`` overrides, for tests)."""
    return Path(os.environ.get("VMARCHIVE_STATE_DIR", DEFAULT_STATE_DIR))


@dataclass
class Marker:
    """What a running capture has changed, written to disk before each change."""

    path: Path
    domain: str
    uuid: str
    pid: int = field(default_factory=os.getpid)
    was_running: bool = False
    #: "switchover", "snapshot", "paused": a background snapshot is never cancelled.
    mode: str = ""
    migration_started: bool = False
    nbd_server: bool = False
    #: migration capabilities and parameters as they were before the capture.
    saved_capabilities: dict[str, bool] = field(default_factory=dict)
    saved_parameters: dict[str, Any] = field(default_factory=dict)
    #: overlay node -> the node it was put on (the commit target).
    overlays: dict[str, str] = field(default_factory=dict)
    #: file node -> the options it had before we reopened it with drop-cache=false.
    reopened: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    #: [node, bitmap started, bitmap frozen or None] per disk, from before the instant's
    #: transaction until the archive is committed (then emptied): undone if it never is.
    #: In memory only: after a kill the next capture finds the parent's bitmap frozen,
    #: reads in full and retires both (see capture_incr), as it always did.
    bitmaps: list[list[str | None]] = field(default_factory=list)

    def save(self) -> None:
        """Write the marker atomically (and durably enough for a crash of the process)."""
        data = {k: v for k, v in self.__dict__.items() if k not in ("path", "bitmaps")}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> Marker | None:
        """The marker at ``path``, or None when absent or unreadable (logged)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable capture marker %s", path, exc_info=True)
            return None
        m = cls(path=path, domain=str(data.get("domain", "")), uuid=str(data.get("uuid", "")))
        for k in (
            "pid",
            "mode",
            "was_running",
            "migration_started",
            "nbd_server",
            "saved_capabilities",
            "saved_parameters",
            "overlays",
            "reopened",
            "files",
        ):
            if k in data:
                setattr(m, k, data[k])
        return m

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class Made:
    """What this capture made in QEMU, noted as each was made (in memory only): its
    release after a capture that went well undoes these without asking QEMU for them
    first -- three monitor round trips fewer.  Should any of them not be there as noted,
    that step looks for ours as every clean-up does."""

    #: fleecing backup jobs
    jobs: list[str] = field(default_factory=list)
    #: temporary nodes (their file nodes go with them)
    nodes: list[str] = field(default_factory=list)
    #: fd sets of the temporary images
    fdsets: list[int] = field(default_factory=list)


def _undo_made(what: str, steps: Iterable[Callable[[], object]]) -> bool:
    """Run each step of undoing what :class:`Made` noted; False (logged, not warned: the
    caller then looks) at the first that fails."""
    try:
        for step in steps:
            step()
        return True
    except HypervisorError as e:
        log.debug("cleanup: %s as noted failed (%s); looking for ours", what, e)
        return False


@contextlib.contextmanager
def domain_lock(state_dir: Path, uuid: str, domain: str) -> Iterator[Path]:
    """Hold the per-domain capture lock for the ``with`` body; yields the marker path.

    Raises:
        LockedError: another capture of this domain is running on this host.
        HostPreconditionError: the state directory cannot be made or written.
    """
    lock_path = state_dir / f"{uuid}.lock"
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = _take_lock_file(lock_path, domain)
    except OSError as e:
        raise HostPreconditionError(
            f"cannot use the state directory {state_dir} (locks and capture markers;"
            f" VMARCHIVE_STATE_DIR sets it): {e.strerror or e}"
        ) from e
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield marker_path(state_dir, uuid)
    finally:
        # Unlinked while still held: a taker that opened it meanwhile sees it replaced.
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


def _take_lock_file(lock_path: Path, domain: str) -> int:
    """An fd of ``lock_path`` holding its ``flock``, the file still at the path.

    Raises:
        LockedError: another process holds it.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise LockedError(
                f"a capture of domain {domain!r} is already running (pid {holder})",
                domain=domain,
                pid=holder,
            ) from e
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder unlinked it as we opened it: take the new one


def _try(what: str, fn: Callable[[], object]) -> bool:
    """Run one cleanup step; log and swallow its failure (cleanup must go on)."""
    try:
        fn()
        return True
    except (HypervisorError, OSError) as e:
        log.warning("cleanup: %s failed: %s", what, e)
        return False


def _wait(
    pred: Callable[[], bool], timeout: float, what: str, step: float = 0.01, warn: bool = True
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    if warn:
        log.warning("cleanup: timed out waiting for %s", what)
    return False


def stop_if_tcg(qmp: QMP) -> bool:
    """Stop a TCG guest before a precopy capture; True if it was stopped.

    QEMU 7.2's precopy dirty tracking under TCG misses guest writes: the capture oracle
    (tests/integration/test_capture_oracle.py) found 17-24 kernel pages (timer and
    per-CPU data, rewritten constantly) whose last writes never reached the stream, in
    most switchover captures, though RAM did not change while paused.  Restored guests
    then Oopsed on stale timer lists.  With the vCPUs stopped before ``migrate`` the first
    pass (every page) is final and the stream is exact; the pause lasts one full pass.
    Under KVM the dirty log is the kernel's and is trusted.
    """
    if qmp.execute("query-kvm").get("enabled"):
        return False
    # Info, not a warning: it is expected on every such capture (doctor explains it), and
    # a failing capture must stay one line.
    log.info("TCG guest: precopy misses writes under TCG; pausing it for the whole copy")
    qmp.execute("stop")
    return True


def cont_guest(qmp: QMP, timeout: float = 30.0) -> None:
    """``cont``, retried while QEMU still finalises a completed migration.

    Raises:
        QMPCommandError: QEMU kept refusing for ``timeout`` seconds.
    """
    crashpoint.hit("capture-cont")  # tests hold here: RAM as archived, guest still paused
    deadline = time.monotonic() + timeout
    while True:
        try:
            qmp.execute("cont")
            return
        except QMPCommandError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.002)


def job_ids(qmp: QMP) -> dict[str, dict[str, Any]]:
    return {str(j["id"]): j for j in qmp.execute("query-jobs")}


def commit_overlay(qmp: QMP, overlay: str, base: str, timeout: float = 3600.0) -> None:
    """Merge the active overlay ``overlay`` back into ``base`` and drop it from the graph.

    Uses an active-layer ``block-commit``; once the job is ready, ``job-complete`` pivots
    the guest device back to ``base``, exactly where libvirt put it.

    Raises:
        QMPCommandError, HypervisorError: QEMU refused; the overlay stays (and is found
            again by the next cleanup).
    """
    job = PREFIX + "commit-" + overlay.removeprefix(PREFIX)
    job = job[:64]
    if job not in job_ids(qmp):
        qmp.execute("block-commit", {"job-id": job, "device": overlay, "base-node": base})
    deadline = time.monotonic() + timeout
    completed = False
    while True:
        j = job_ids(qmp).get(job)
        if j is None:
            break
        status = j.get("status")
        if status == "ready" and not completed:
            qmp.execute("job-complete", {"id": job})
            completed = True
        elif status == "concluded":
            if j.get("error"):
                qmp.execute("job-dismiss", {"id": job})
                raise HypervisorError(f"committing {overlay} failed: {j['error']}")
            qmp.execute("job-dismiss", {"id": job})
            break
        if time.monotonic() > deadline:
            raise HypervisorError(f"committing {overlay} did not finish in {timeout:g} s")
        time.sleep(0.01)


def _backing_of(qmp: QMP, node: str) -> str | None:
    """The node name of ``node``'s backing child, from the block graph."""
    try:
        graph = qmp.execute("x-debug-query-block-graph")
    except QMPCommandError:
        return None
    names = {n["id"]: n["name"] for n in graph.get("nodes", [])}
    ids = {v: k for k, v in names.items()}
    for e in graph.get("edges", []):
        if e.get("parent") == ids.get(node) and e.get("name") == "backing":
            return str(names.get(e.get("child"), "")) or None
    return None


def clean_domain(
    qmp: QMP | None,
    marker: Marker | None,
    *,
    keep_marker: bool = False,
    bitmaps: bool = True,
    named_fds: bool = True,
    migration_over: bool = False,
    block_state: dict[str, Any] | None = None,
    made: Made | None = None,
) -> bool:
    """Undo everything a capture (this one or a killed one) changed; True when all went well.

    Order matters: stop the migration first (it holds the disks), let the guest run again
    (``cont`` also re-activates disks a completed migration left inactive), then the NBD
    exports (they hold nodes), block jobs, overlays (committed back, never dropped: the
    guest wrote into them), remaining nodes, fd sets, migration settings, files.
    Never raises for a QEMU problem: each step is logged and the next one still runs.
    ``bitmaps=False`` leaves the marker's dirty bitmaps (:func:`restore_bitmaps`) alone:
    a capture that has not committed yet decides about them afterwards.
    ``named_fds=False`` skips closing the named fds, for a caller that knows QEMU took
    them (each ``closefd`` of a taken fd is a monitor round trip that fails).
    ``migration_over``: the caller saw the migration end (``completed``) just before, so
    it is not asked about again (twice: before cancelling it and before restoring its
    settings); a migration that ended does not start again by itself.
    ``block_state``: when given, with no ``marker``, and the clean-up found no overlay
    and no node of ours, QEMU's answers to ``query-block`` and ``query-named-block-nodes``
    (flat) go there under those names: nothing was changed after them, so a caller about
    to list the disks (:func:`~vmarchive.hypervisor.blockinfo.list_disks`) need not ask
    again.
    ``made``: what the capture calling this made, undone as noted (see :class:`Made`).
    """
    ok = True
    if qmp is not None and qemu_gone(qmp.domain):
        # Destroyed, shut down or crashed: whatever the capture changed died with QEMU.
        log.info("cleanup: %s has no QEMU process any more; nothing to undo there", qmp.domain)
    elif qmp is not None:
        ok = _clean_qemu(qmp, marker, bitmaps, named_fds, migration_over, block_state, made) and ok
    if marker is not None:
        for f in marker.files:
            try:
                if os.path.isdir(f) and not os.path.islink(f):
                    os.rmdir(f)
                else:
                    os.unlink(f)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cleanup: cannot remove %s: %s", f, e)
                ok = False
        if ok and not keep_marker:
            marker.remove()
    return ok


def qemu_gone(dom: Domain) -> bool:
    """True when ``dom`` has no QEMU process any more (or no longer exists).

    False when libvirt cannot tell: then the cleanup must still try.
    """
    try:
        return not dom.is_active()
    except DomainNotFoundError:
        return True
    except HypervisorError:
        return False


def vanished_error(dom: Domain, cause: BaseException) -> HypervisorError | None:
    """The one clear error for a capture that failed because its domain stopped under it
    (destroyed, shut down, crashed), or None when the domain still runs or the failure is
    an interruption (that keeps its own error)."""
    if not isinstance(cause, Exception) or not qemu_gone(dom):
        return None
    return HypervisorError(
        f"domain {dom.name!r} stopped during the capture (destroyed, shut down or crashed); "
        "nothing was archived",
        domain=dom.name,
        cause=str(cause),
    )


def _unstick_cancel(qmp: QMP, active: Callable[[], bool]) -> bool:
    """Free a cancel that hangs in QEMU 7.2's switchover race; True once it is over.

    A ``migrate_cancel`` that lands just after the migration thread stopped the vCPUs for the
    switchover, and before it announced ``pre-switchover``, leaves that thread waiting for a
    ``migrate-continue`` nobody can send (the cancel only wakes a thread already marked as
    paused; QEMU 7.2's migration_maybe_pause) and the state at ``cancelling`` for good, the
    guest stopped and ``cont`` refused ("Migration is not finalized yet").  Seen twice in CI
    runs, in the watchdog's clean-up after a capture killed while migrating.  The waiting
    thread is woken the way QEMU wakes it itself: ``migrate-continue`` naming the state the
    migration is in.  It then sees the cancel and ends the migration.

    Only then: the semaphore outlives the migration, so a post nobody waits for would let the
    next migration run past its pre-switchover pause.  The race's mark is a cancel still
    pending with the vCPUs in ``finish-migrate`` (stopped by the switchover itself); a cancel
    merely slow is not touched.
    """
    try:
        status = str(qmp.execute("query-migrate").get("status", "none"))
        run = str(qmp.execute("query-status").get("status", ""))
        if status == "cancelling" and run == "finish-migrate":
            log.info("cleanup: the cancel is stuck at the switchover; waking the migration")
            qmp.execute("migrate-continue", {"state": "cancelling"})
    except HypervisorError as e:
        log.warning("cleanup: cannot wake the cancelled migration: %s", e)
    return _wait(lambda: not active(), CANCEL_WAIT_S, "migration cancel")


def restore_bitmaps(qmp: QMP, marker: Marker) -> bool:
    """Undo the dirty bitmaps of a capture that published no archive (``marker.bitmaps``,
    see :func:`undo_bitmaps`); True when done or nothing to do.  Never raises for a QEMU
    problem (logged)."""
    if not marker.bitmaps:
        return True
    return _try("restoring dirty bitmaps", lambda: undo_bitmaps(qmp, marker.bitmaps))


def _clean_qemu(
    qmp: QMP,
    marker: Marker | None,
    bitmaps: bool = True,
    named_fds: bool = True,
    migration_over: bool = False,
    block_state: dict[str, Any] | None = None,
    made: Made | None = None,
) -> bool:
    ok = True
    seen: dict[str, Any] = {}  # QEMU's block answers, while nothing of ours was found

    # 1. The migration: only one we started (a libvirt migration is none of our business).
    if marker is not None and marker.migration_started and not migration_over:

        def active() -> bool:
            return str(qmp.execute("query-migrate").get("status", "none")) in MIGRATION_ACTIVE

        try:
            running = active()
            if running and marker.mode == "snapshot":
                # QEMU 7.2 can deadlock when a running background snapshot fails (its main
                # loop faults on a write-protected page while the snapshot thread waits for
                # the main loop's lock): let it finish; whoever holds the pipe drains it.
                log.info("cleanup: waiting for the background snapshot to finish")
                ok = _wait(lambda: not active(), 600.0, "background snapshot", 0.05) and ok
            elif running:
                log.info("cleanup: cancelling migration")
                qmp.execute("migrate_cancel")
                if not _wait(
                    lambda: not active(), CANCEL_FIRST_WAIT_S, "migration cancel", warn=False
                ):
                    ok = _unstick_cancel(qmp, active) and ok
        except HypervisorError as e:
            log.warning("cleanup: migration state unknown: %s", e)
            ok = False

    # 2. Run the guest again if it ran before and is stopped now.  Not asked after a
    # background snapshot seen to complete: QEMU ran the guest again at the end of its
    # set-up, long before.
    snapshot_done = marker is not None and marker.mode == "snapshot" and migration_over
    if marker is not None and marker.was_running and not snapshot_done:
        try:
            st = qmp.execute("query-status")
            if not st.get("running") and st.get("status") in STOPPED_RUNSTATES:
                log.info("cleanup: resuming guest (was %s)", st.get("status"))
                cont_guest(qmp)
        except HypervisorError as e:
            log.warning("cleanup: cannot resume guest: %s", e)
            ok = False

    # 3. NBD exports and the server if it is ours.  Stopping the server closes every NBD
    # export and returns once they are gone (QEMU's nbd-server-stop, since 5.2), so a
    # capture that started the server stops it and need not ask for the exports: three
    # monitor round trips fewer (a query, a deletion, a query to see it gone).  Without
    # a server of ours, ours are looked for and removed one by one.
    stopped = False
    if marker is not None and marker.nbd_server:
        try:
            qmp.execute("nbd-server-stop")
            stopped = True
        except QMPCommandError:
            pass  # not running: no NBD export can be left either, but look
        except HypervisorError as e:
            log.warning("cleanup: nbd-server-stop: %s", e)
            ok = False
    try:
        exports = [] if stopped else qmp.execute("query-block-exports")
    except HypervisorError:
        exports = []
    ours = [str(ex.get("id", "")) for ex in exports if str(ex.get("id", "")).startswith(PREFIX)]
    if ours:
        ok = _try("removing NBD exports", functools.partial(del_exports, qmp, ours)) and ok

    # 4. Our block jobs that are not commits (fleecing backups): cancel.
    as_made = False
    if made is not None and made.jobs:
        # none asked about first: each one is cancelled, then they are waited for
        noted: dict[str, dict[str, Any]] = {jid: {} for jid in made.jobs}
        as_made = _undo_made("cancelling block jobs", [lambda: _cancel_jobs(qmp, noted)])
    try:
        jobs = {} if as_made else job_ids(qmp)
    except HypervisorError:
        jobs = {}
    ours_j = {
        jid: j
        for jid, j in jobs.items()
        if jid.startswith(PREFIX) and not jid.startswith(PREFIX + "commit-")
    }
    if ours_j:
        ok = _try("cancelling block jobs", functools.partial(_cancel_jobs, qmp, ours_j)) and ok

    # 5. Overlays still attached to a guest device: commit them back.  A snapshot-mode
    # capture makes none (its temporary nodes are fleecing targets, attached to nothing).
    blocks: list[dict[str, Any]] = []
    if marker is None or marker.mode != "snapshot" or marker.overlays:
        try:
            blocks = qmp.execute("query-block")
            seen["query-block"] = blocks
        except HypervisorError:
            pass
    for b in blocks:
        node = str((b.get("inserted") or {}).get("node-name", ""))
        if node.startswith(PREFIX):
            seen.clear()
            base = (marker.overlays.get(node) if marker else None) or _backing_of(qmp, node)
            if base is None:
                log.warning("cleanup: overlay %s has no known backing node", node)
                ok = False
                continue
            log.info("cleanup: committing overlay %s into %s", node, base)
            ok = (
                _try(f"committing {node}", functools.partial(commit_overlay, qmp, node, base))
                and ok
            )

    # 6. Our remaining nodes.
    made_nodes = [
        functools.partial(qmp.execute, "blockdev-del", {"node-name": n})
        for n in (made.nodes if made is not None else [])
    ]
    if not (made_nodes and _undo_made("removing nodes", made_nodes)):
        ok = _remove_our_nodes(qmp, marker, seen, block_state) and ok

    # 6b. Dirty bitmaps of a capture that published no archive (see undo_bitmaps).
    if marker is not None and bitmaps:
        ok = restore_bitmaps(qmp, marker) and ok

    # 7. fd sets and named fds.
    made_fdsets = [
        functools.partial(qmp.remove_fd, s) for s in (made.fdsets if made is not None else [])
    ]
    try:
        fdsets = (
            []
            if made_fdsets and _undo_made("removing fd sets", made_fdsets)
            else qmp.execute("query-fdsets")
        )
    except HypervisorError:
        fdsets = []
    for s in fdsets:
        if any(str(f.get("opaque", "")).startswith(PREFIX) for f in s.get("fds", [])):
            ok = (
                _try("removing an fd set", functools.partial(qmp.remove_fd, int(s["fdset-id"])))
                and ok
            )
    # Named fds are passed only once the marker is saved, and a marker is removed only by
    # a clean-up that got here: without one there are none of ours to close.
    for name in ("mig", "nbd") if marker is not None and named_fds else ():
        with contextlib.suppress(HypervisorError):
            qmp.closefd(PREFIX + name)

    # 8. File nodes reopened without cache drop: their original options.
    if marker is not None and marker.reopened:
        ok = restore_options(qmp, marker.reopened) and ok

    # 9. Migration capabilities and parameters as they were.
    if marker is not None and (marker.saved_capabilities or marker.saved_parameters):
        ok = (
            _try(
                "restoring migration settings",
                lambda: restore_migration(qmp, marker, migration_over),
            )
            and ok
        )
    return ok


def _remove_our_nodes(
    qmp: QMP, marker: Marker | None, seen: dict[str, Any], block_state: dict[str, Any] | None
) -> bool:
    """Delete every node of ours QEMU lists (parents before children: retry while
    progress is made).  With nothing of ours found, no marker and ``seen`` holding the
    answer to ``query-block``, QEMU's answers go to ``block_state`` (see clean_domain)."""
    for attempt in range(4):
        try:
            named = qmp.execute("query-named-block-nodes", {"flat": True})
            nodes = [
                str(n["node-name"]) for n in named if str(n.get("node-name", "")).startswith(PREFIX)
            ]
        except HypervisorError:
            return True  # no answer: nothing seen to remove, as for the other queries here
        if not nodes:
            if attempt == 0 and "query-block" in seen and block_state is not None and not marker:
                block_state.update(seen, **{"query-named-block-nodes": named})
            return True
        refused = False
        for n in nodes:
            if n.endswith("-f") and n[:-2] in nodes:
                continue  # a file node made with its parent: it goes with it (and QEMU
                # refuses to delete it alone: "not owned by the monitor")
            try:
                qmp.execute("blockdev-del", {"node-name": n})
            except HypervisorError:
                refused = True  # e.g. a child asked before its parent: asked again
        if not refused:
            return True  # every one deleted, with their file nodes: none left to look for
    log.warning("cleanup: could not remove block nodes %s", nodes)
    return False


def undo_bitmaps(qmp: QMP, bitmaps: list[list[str | None]]) -> None:
    """Put the dirty bitmaps back as they were before a capture that failed (in process).

    The instant's transaction started a new bitmap and froze the parent's one.  Without an
    archive naming the new one, it is removed after its writes are merged into the old
    one, which records again: it then holds every write since the parent's instant, so
    the next capture can still be incremental (and no stray bitmap is left).

    Not on inactive nodes (a guest left in ``postmigrate``): QEMU 7.2 aborts when a
    persistent bitmap is removed there.  They are left; the next capture does not trust a
    frozen bitmap (full read) and retires the stray one after its commit.

    Raises:
        HypervisorError: QEMU refused a step (the marker is kept; the next run retries).
    """
    status = str(qmp.execute("query-status").get("status"))
    if status in ("postmigrate", "finish-migrate", "inmigrate"):
        log.info("cleanup: dirty bitmaps left as they are: the guest is %s", status)
        return
    present = {
        (str(n.get("node-name")), str(b.get("name"))): bool(b.get("recording"))
        for n in qmp.execute("query-named-block-nodes", {"flat": True})
        for b in n.get("dirty-bitmaps") or []
    }
    for node, new, old in bitmaps:
        if node is None or new is None:
            continue
        if old is not None and (node, old) in present:
            if not present[(node, old)]:
                qmp.execute("block-dirty-bitmap-enable", {"node": node, "name": old})
            if (node, new) in present:
                qmp.execute(
                    "block-dirty-bitmap-merge", {"node": node, "target": old, "bitmaps": [new]}
                )
        if (node, new) in present:
            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": new})
            log.info("cleanup: removed dirty bitmap %s of %s (no archive names it)", new, node)


def restore_migration(qmp: QMP, marker: Marker, migration_over: bool = False) -> None:
    """The migration capabilities and parameters ``marker`` saved, set again (QEMU refuses
    them while a migration runs: asked first, unless ``migration_over``)."""
    if not migration_over:
        st = str(qmp.execute("query-migrate").get("status", "none"))
        if st in MIGRATION_ACTIVE:
            raise HypervisorError(f"migration still {st}: cannot restore its settings")
    if marker.saved_capabilities:
        caps = [{"capability": k, "state": v} for k, v in marker.saved_capabilities.items()]
        qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    if marker.saved_parameters:
        qmp.execute("migrate-set-parameters", dict(marker.saved_parameters))


def del_exports(qmp: QMP, eids: list[str]) -> None:
    """Remove the exports ``eids`` (hard: clients are cut) and wait until QEMU dropped
    those it accepted to remove.  Each is asked for even if removing another one failed.

    Raises:
        HypervisorError: QEMU refused one (the first refusal, after trying them all).
    """
    first: HypervisorError | None = None
    left: set[str] = set()
    for eid in eids:
        try:
            qmp.execute("block-export-del", {"id": eid, "mode": "hard"})
            left.add(eid)
        except HypervisorError as e:
            first = first or e
    if left:
        _wait(
            lambda: not left & {str(e.get("id")) for e in qmp.execute("query-block-exports")},
            10.0,
            f"exports {sorted(left)} to go",
        )
    if first is not None:
        raise first


def _cancel_jobs(qmp: QMP, jobs: dict[str, dict[str, Any]]) -> None:
    """Cancel the block jobs ``jobs`` (id -> its query-jobs entry), wait until each is gone
    or concluded, and dismiss the concluded ones.

    Raises:
        HypervisorError: QEMU refused one (the first refusal, after trying them all).
    """
    first: HypervisorError | None = None
    ending: list[str] = []
    for jid, j in jobs.items():
        try:
            if j.get("status") != "concluded":
                qmp.execute("job-cancel", {"id": jid})
            ending.append(jid)
        except HypervisorError as e:
            first = first or e
    now: dict[str, dict[str, Any]] = {}

    def all_ended() -> bool:
        now.clear()
        now.update(job_ids(qmp))
        return all(now.get(jid, {}).get("status", "concluded") == "concluded" for jid in ending)

    if ending:
        _wait(all_ended, 30.0, f"jobs {sorted(ending)} to end")
    for jid in ending:
        if now.get(jid, {}).get("status") == "concluded":
            try:
                qmp.execute("job-dismiss", {"id": jid})
            except HypervisorError as e:
                first = first or e
    if first is not None:
        raise first
