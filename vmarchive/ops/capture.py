"""Synchronized live capture of a libvirt/QEMU guest: RAM, devices and disks at one instant.

Layer: ops (uses store, hypervisor; never libvirt itself).

Two mechanisms fix the instant (see ``docs`` and QEMU-FACTS for the measurements):

``switchover``
    Precopy migration into a unix socket (the migration channel, see
    :meth:`_Capture._start_channel`) with ``pause-before-switchover``.  At ``pre-switchover``
    (vCPUs stopped, I/O drained) ONE ``transaction`` puts a temporary qcow2 overlay
    (``blockdev-snapshot``) on every disk; ``migrate-continue``; at ``completed``, ``cont``.
    The instant is the end of the memory transfer.  The frozen base nodes are exported
    over NBD and read while the guest runs, then the overlays are committed back
    (active ``block-commit`` + ``job-complete``) so the block graph is exactly what
    libvirt built.  No block job may run at switchover (QEMU fails the migration).

``snapshot``
    ``background-snapshot`` (userfaultfd write-protection): ``migrate`` into a channel
    that holds QEMU after its set-up (the set-up gate, :meth:`_Capture._snapshot_gate`);
    ``stop``; one ``transaction`` starting a copy-before-write fleecing job per disk
    (``blockdev-backup sync=none`` into a temporary qcow2 backed by the disk); the channel
    is drained, QEMU resumes the guest by itself and saves every page as it was at the
    ``stop``.  The fleecing nodes are exported over NBD
    and read concurrently with the memory stream.  Needs userfaultfd for the QEMU user
    (``vm.unprivileged_userfaultfd=1`` under libvirt); ``auto`` uses it only where QEMU
    accepts the capability, else ``switchover``.

A paused guest is captured without an overlay (nothing changes while it is paused: disks
first, then the memory) and stays paused; a shut-off domain gets a disk-only archive.

The capture is the explicit state machine :class:`CaptureState`; every transition is
logged.  Cleanup is certain: :func:`vmarchive.ops.capture_cleanup.clean_domain` runs in
``finally`` from a marker file written before every change, and also at the start of
the next run (after ``kill -9``).

Incrementals: each disk's vmarchive dirty bitmap is frozen and a new one started inside
the same transaction that fixes the instant (the overlay transaction, the fleecing
transaction, or a bitmap-only transaction for a paused guest); only the slots the frozen
bitmap marks dirty are read, the rest refer to the parent's chunks.  When and why a bitmap
is trusted, and why it stays exact across the overlay and its commit: see
:mod:`vmarchive.ops.capture_incr`.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from vmarchive import __version__
from vmarchive.errors import (
    FormatError,
    HostPreconditionError,
    HypervisorError,
    InterruptedError_,
    QMPCommandError,
    StreamError,
    StreamRefusedError,
    UsageError,
    VmarchiveError,
)
from vmarchive.hypervisor.blockinfo import DiskInfo, list_disks, parse_disks
from vmarchive.hypervisor.connection import DEFAULT_URI, Connection, Domain, DomainState
from vmarchive.hypervisor.hugepages import restore_huge_pages
from vmarchive.hypervisor.memmap import collect_memory_map
from vmarchive.hypervisor.qemuproc import qemu_pid, wait_thread_blocked_writing
from vmarchive.hypervisor.qmp import QMP, EventSubscription, pause_us
from vmarchive.ops import capture_parse
from vmarchive.ops.capture_cleanup import (
    PREFIX,
    Made,
    Marker,
    clean_domain,
    cont_guest,
    default_state_dir,
    del_exports,
    domain_lock,
    restore_bitmaps,
    stop_if_tcg,
    vanished_error,
)
from vmarchive.ops.capture_disks import (
    DiskRead,
    DiskThreads,
    empty_qcow2,
    local_nbd,
    read_disk,
)
from vmarchive.ops.capture_dropcache import preflush, reopen_keep_cache
from vmarchive.ops.capture_incr import (
    PERSISTENT_FORMATS,
    Current,
    DiskPlan,
    ParentDisk,
    decide,
    new_bitmap_name,
    node_bitmaps,
    owned,
    qemu_instance,
    read_disk_incremental,
    remove_bitmaps,
    repository_tag,
)
from vmarchive.ops.capture_memory import PipeReader
from vmarchive.ops.capture_watchdog import Watchdog
from vmarchive.ops.disk_process import DiskProcess, ForkedChild, fork_reader
from vmarchive.ops.malloc_tuning import keep_freed_memory
from vmarchive.ops.restore_xml import NVRAM_META_STREAM, nvram_path
from vmarchive.progress import NULL_PROGRESS, Progress
from vmarchive.store import Repository, crashpoint

log = logging.getLogger(__name__)

#: The migration channel's send buffer asked for (the kernel doubles it, and caps the
#: request at net.core.wmem_max: 208 KiB by default, as fast here).
CHANNEL_BUFFER = 1 << 20
#: The set-up gate's check waits this long for QEMU's answer before draining the channel.
GATE_CHECK_S = 2.0
#: QEMU's max-bandwidth when the user sets none: effectively unlimited (bytes/s).
UNLIMITED_BANDWIDTH = 1 << 40


class Mode(enum.StrEnum):
    AUTO = "auto"
    SWITCHOVER = "switchover"
    SNAPSHOT = "snapshot"


class CaptureState(enum.Enum):
    """Where a capture is; :meth:`_Capture.to` logs every transition."""

    START = "start"
    LOCKED = "locked"  # per-domain lock held, leftovers cleaned
    PREPARED = "prepared"  # temporary nodes, migration settings, channel in place
    MIGRATING = "migrating"  # memory stream flowing (precopy or background snapshot)
    SWITCHOVER = "switchover"  # vCPUs stopped, instant being fixed
    INSTANT = "instant"  # RAM and disk views fixed; guest runs again
    READING = "reading"  # disks (and, in snapshot mode, memory) being read
    COMMITTING = "committing"  # publishing the archive
    CLEANING = "cleaning"  # undoing everything in QEMU
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class CaptureOptions:
    """What to capture and how (built by the CLI, or by tests)."""

    domain: str
    repo: str
    uri: str = DEFAULT_URI
    mode: Mode = Mode.AUTO
    tags: tuple[str, ...] = ()
    #: Migration bandwidth cap in MiB/s; None: unlimited.
    bandwidth_mib_s: float | None = None
    #: QEMU's downtime-limit for the switchover (ms).
    downtime_ms: int = 20
    #: Switchover mode: give up precopy after this many passes or seconds.
    max_iterations: int = 50
    max_precopy_s: float = 120.0
    passphrase: str | None = None
    #: Directory for temporary overlay/fleecing images (default: $TMPDIR or /var/tmp).
    work_dir: Path | None = None
    #: Directory for locks and markers (default: /run/vmarchive, $VMARCHIVE_STATE_DIR).
    state_dir: Path | None = None
    #: Switchover mode: let QEMU throttle the vCPUs of a guest that dirties memory faster
    #: than it can be sent (auto-converge), instead of failing after the bounds above.
    auto_converge: bool = False
    #: Switchover mode: reopen the disks' file nodes with drop-cache=false for the capture
    #: (the cache drop at re-activation was most of the pause); restored afterwards.
    keep_cache: bool = True
    #: Parse the migration stream into page images (False: store it opaquely).
    parse_memory: bool = True
    #: TEST ONLY: fix the disk view this many seconds after the memory instant, to prove
    #: the consistency check can fail (the negative control).
    disk_delay_s: float = 0.0
    #: Read every disk in full even when a trustworthy parent exists (tracking re-armed).
    full: bool = False
    #: A live capture's disks are read by a process of its own
    #: (:mod:`vmarchive.ops.disk_process`), which does not compete with the memory for one
    #: interpreter lock; False: on threads of the capture's process.
    disk_process: bool = True
    #: Snapshot mode: afterwards, map the guest RAM's transparent huge pages that QEMU's
    #: write tracking split with one page-table entry again, so that the next capture's
    #: pause does not grow with RAM (:mod:`vmarchive.hypervisor.hugepages`).
    remap_huge_pages: bool = True
    #: TEST ONLY: snapshot mode without the set-up gate's filler (QEMU passes its set-up
    #: and takes the RAM instant before the disks are fixed), to prove the check that the
    #: gate held can fail (the negative control).
    open_gate: bool = False
    #: TEST ONLY: start the new dirty bitmap after the overlay commit instead of inside
    #: the instant's transaction, to prove the incremental checks can fail.
    late_bitmap: bool = False
    #: TEST ONLY: copy a TCG guest live in switchover mode (no stop before the copy), to
    #: show the QEMU 7.2 dirty-tracking bug that the stop works around still exists.
    tcg_live_precopy: bool = False

    def __post_init__(self) -> None:
        for tag in self.tags:
            # Tags are shown in one-line listings and matched by prune --keep-tag: an
            # empty one, or one with a line break, can only be a mistake.
            if not tag.strip() or not tag.isprintable():
                raise UsageError(f"tag {tag!r} is empty or has control characters")


class DiskResult(msgspec.Struct, frozen=True):
    target: str
    copied: bool
    size: int
    bytes_read: int = 0
    bytes_stored: int = 0
    reason: str | None = None  # why not copied
    incremental: bool = False
    bytes_referenced: int = 0
    fallback_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


class CaptureResult(msgspec.Struct, frozen=True):
    id: str
    domain: str
    mode: str
    kind: str
    guest_pause_ms: float | None
    bytes_read: int
    bytes_stored: int
    duration_s: float
    disks: list[DiskResult] = msgspec.field(default_factory=list)
    memory_format: str | None = None
    parent: str | None = None
    #: Snapshot mode: what :func:`restore_huge_pages` did (None: not attempted).
    huge_pages: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = msgspec.structs.asdict(self)
        d["disks"] = [x.to_json() for x in self.disks]
        return d


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def _machine_type(xml: str) -> str | None:
    try:
        el = ET.fromstring(xml).find("./os/type")
    except ET.ParseError:
        return None
    return el.get("machine") if el is not None else None


#: The role of a capture mode's temporary qcow2 nodes, in their names: the switchover
#: mode's overlays, the snapshot mode's fleecing images (the others make none).
_TEMP_ROLE = {"switchover": "ov", "snapshot": "fl"}


def _temp_name(role: str, d: DiskInfo) -> str:
    """The node name (and image file stem) of disk ``d``'s temporary node: ``role`` is
    ``ov`` (switchover overlay) or ``fl`` (snapshot fleecing image)."""
    return f"{PREFIX}{role}-{_node_suffix(d.target)}"


def _node_suffix(target: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in target)[:16]


def capture(
    options: CaptureOptions,
    progress: Progress = NULL_PROGRESS,
    *,
    clock: Callable[[], float] = time.time,
) -> CaptureResult:
    """Capture ``options.domain`` into the repository ``options.repo``.

    Raises:
        RepositoryNotFoundError, LockedError: the repository cannot be used; a capture of
            the same domain is already running.
        ConnectionFailedError, DomainNotFoundError: bad URI or domain.
        HostPreconditionError: ``--mode snapshot`` where QEMU cannot do it.
        HypervisorError, QMPCommandError: QEMU failed (the guest runs on, all is cleaned).
        InterruptedError_: interrupted (KeyboardInterrupt); all is cleaned.

    A disk reader child is forked before anything else (see
    :mod:`vmarchive.ops.disk_process`), and ended here if the capture did not use it.
    """
    # Forked first, while this process has one thread: the connection starts libvirt's
    # event thread, the repository lock its refresh thread.
    forked = fork_reader() if options.disk_process else None
    try:
        repo = Repository.open(options.repo, options.passphrase)
        try:
            with Connection.open(options.uri) as conn:
                dom = conn.lookup(options.domain)
                return _Capture(options, conn, dom, repo, progress, clock, forked).run()
        finally:
            repo.close()
    finally:
        if forked is not None:
            forked.dismiss()  # unless a capture's DiskProcess took it (and waited for it)


def capture_domain(
    options: CaptureOptions,
    conn: Connection,
    dom: Domain,
    repo: Repository,
    progress: Progress = NULL_PROGRESS,
    *,
    clock: Callable[[], float] = time.time,
) -> CaptureResult:
    """:func:`capture` of ``dom`` with a connection and a repository the caller holds open
    (``options.domain`` and ``options.repo`` are not looked at); raises as it does."""
    return _Capture(options, conn, dom, repo, progress, clock).run()


class _Capture:
    def __init__(
        self,
        options: CaptureOptions,
        conn: Connection,
        dom: Domain,
        repo: Repository,
        progress: Progress,
        clock: Callable[[], float],
        forked: ForkedChild | None = None,
    ) -> None:
        self.o = options
        self.conn = conn
        self.dom = dom
        self.repo = repo
        self.progress = progress
        self.clock = clock
        self.state = CaptureState.START
        self.marker: Marker | None = None
        self.qmp: QMP | None = None
        self.meta: dict[str, Any] = {}
        #: QEMU's block answers from the leftover sweep (see clean_domain)
        self.block_state: dict[str, Any] = {}
        self.t_start = clock()
        self.t_instant: float | None = None
        self.events: EventSubscription | None = None
        self.work: Path | None = None
        self.watchdog: Watchdog | None = None
        self.plans: dict[str, DiskPlan] = {}
        #: the domain's newest archive, loaded when planning (None: none, or not yet)
        self.parent_archive: Any = None
        #: the clean-up of QEMU running while the capture commits (see _release_qemu)
        self.release: _Background | None = None
        #: what this attempt made in QEMU, for the release (see capture_cleanup.Made)
        self.made = Made()
        #: QEMU's migration capabilities before the capture, when the mode probe asked
        self.caps_before: dict[str, bool] | None = None
        #: the migration capabilities as QEMU has them now, as far as known (None: unknown)
        self.caps_now: dict[str, bool] | None = None
        #: the huge-page remap running beside the commit (see _live_capture)
        self.remap: _Background | None = None
        #: the disk reader process of the attempt under way (:meth:`_disk_readers`)
        self.readers: DiskProcess | None = None
        #: a disk reader child forked before the capture (:func:`fork_reader`), if any
        self.forked = forked

    # -- state machine -------------------------------------------------------------------
    def to(self, state: CaptureState, note: str = "") -> None:
        log.info(
            "capture %s: %s -> %s%s",
            self.dom.name,
            self.state.value,
            state.value,
            f" ({note})" if note else "",
        )
        self.state = state
        crashpoint.hit(f"capture-{state.value}")

    def run(self) -> CaptureResult:
        keep_freed_memory()  # the stream's buffers are reused, not faulted in afresh
        state_dir = self.o.state_dir or default_state_dir()
        watchdog: Watchdog | None = None
        try:
            with domain_lock(state_dir, self.dom.uuid, self.dom.name) as marker_path:
                dstate = self.dom.state()
                self.qmp = QMP(self.dom) if dstate.is_active else None
                if self.qmp is not None:
                    watchdog = Watchdog.start(state_dir, self.dom.uuid, self.dom.name, self.o.uri)
                    self.watchdog = watchdog
                leftover = Marker.load(marker_path)
                if leftover is not None:
                    log.warning(
                        "cleaning up after an interrupted capture of %s (pid %s)",
                        self.dom.name,
                        leftover.pid,
                    )
                if (leftover is not None or self.qmp is not None) and not clean_domain(
                    self.qmp, leftover, block_state=self.block_state
                ):
                    raise HypervisorError(
                        f"leftovers of an earlier capture of {self.dom.name!r} could not be "
                        "removed (see the log); refusing to capture",
                        domain=self.dom.name,
                    )
                self.to(CaptureState.LOCKED)
                self.marker = Marker(
                    path=marker_path,
                    domain=self.dom.name,
                    uuid=self.dom.uuid,
                    was_running=dstate == DomainState.RUNNING,
                )
                try:
                    if self.qmp is None:
                        return self._disk_only()
                    return self._live(dstate)
                except KeyboardInterrupt as e:
                    self.to(CaptureState.FAILED, "interrupted")
                    raise InterruptedError_(
                        "capture interrupted; the guest was left as it was"
                    ) from e
                except BaseException as e:
                    self.to(CaptureState.FAILED, str(e) or type(e).__name__)
                    # Only a domain that ran can have stopped under the capture.
                    gone = vanished_error(self.dom, e) if self.qmp is not None else None
                    if gone is not None:
                        raise gone from e
                    raise
        finally:
            if watchdog is not None:
                watchdog.release()

    # -- common pieces -------------------------------------------------------------------
    def _base_metadata(self, kind: str, live_xml: str) -> dict[str, Any]:
        versions = self.conn.versions()
        return {
            "kind": kind,
            "domain": self.dom.name,
            "uuid": self.dom.uuid,
            "host": socket.gethostname(),
            "tags": list(self.o.tags),
            "parent": None,
            "machine": _machine_type(live_xml),
            "versions": {
                "vmarchive": __version__,
                "libvirt": versions.libvirt,
                "qemu": versions.qemu,
            },
        }

    def _xml_streams(
        self,
        w: Any,
        live_xml: str,
        migratable_xml: str,
        extra: Mapping[str, str | bytes] | None = None,
    ) -> None:
        texts = {"domain.xml": migratable_xml, "domain-live.xml": live_xml, **(extra or {})}
        self._meta_streams(w, texts)

    @staticmethod
    def _meta_streams(w: Any, texts: Mapping[str, str | bytes]) -> None:
        """Each of ``texts`` as a meta stream of that name."""
        for name, text in texts.items():
            data = text.encode() if isinstance(text, str) else text
            sw = w.stream(name, "meta", len(data))
            if data:
                sw.write(0, data)
            sw.close()

    @staticmethod
    def _nvram_file(xml: str) -> dict[str, str | bytes]:
        """A shut-off UEFI domain's variable store file, as a meta stream to archive (a
        running one's is flash RAM, in the memory state).  None to archive when the domain
        has none, or never started (libvirt makes the file at the first start)."""
        root = ET.fromstring(xml)
        path = nvram_path(root)
        if path is None:
            return {}
        try:
            with open(path, "rb") as f:
                return {NVRAM_META_STREAM: f.read()}
        except OSError as e:
            log.info("UEFI variable store %s not archived: %s", path, e)
            return {}

    @staticmethod
    def _memory_map(qmp: QMP) -> dict[str, str]:
        """QEMU's flat memory map and RAM blocks (what memory exports need), as text."""
        out: dict[str, str] = {}
        for name, cmd in (("mtree.txt", "info mtree -f"), ("ramblock.txt", "info ramblock")):
            try:
                out[name] = qmp.hmp(cmd)
            except HypervisorError as e:
                log.warning("cannot record %r: %s", cmd, e)
        return out

    def _disk_stream(self, w: Any, d: DiskInfo, size: int) -> Any:
        attrs = {
            "target": d.target,
            "format": d.format or d.driver,
            "source": d.source,
            "source_type": d.source_type,
            "virtual_size": size,
            "device": d.device,
            "bus": d.bus,
            "readonly": d.readonly,
        }
        return w.stream(f"disk:{d.target}", "disk", size, attrs=attrs)

    @staticmethod
    def _copy_disk(d: DiskInfo) -> str | None:
        """None when the disk is to be copied, else why not."""
        if not d.has_medium and d.source is None:
            return "no medium"
        if d.removable:
            return "removable media are recorded, not copied"
        if d.readonly:
            return "read-only disks are recorded, not copied"
        return None

    # -- shut-off domain -----------------------------------------------------------------
    def _disk_only(self) -> CaptureResult:
        xml = self.dom.xml()
        mig_xml = self.dom.xml(migratable=True)
        meta = self._base_metadata("disk-only", xml)
        results: list[DiskResult] = []
        with self.repo.writer() as w:
            self._xml_streams(w, xml, mig_xml, self._nvram_file(xml))
            for xd in parse_disks(xml):
                d = DiskInfo(
                    target=xd.target,
                    device=xd.device,
                    bus=xd.bus,
                    source_type=xd.source_type,
                    source=xd.source,
                    format=xd.format,
                    readonly=xd.readonly,
                    removable=xd.device in ("cdrom", "floppy"),
                    qdev=None,
                    node_name=None,
                    driver=xd.format,
                    file_node=None,
                    file_driver=None,
                    filename=xd.source,
                    virtual_size=None,
                    is_block_device=xd.source_type == "block",
                    is_network=xd.source_type == "network",
                )
                why = self._copy_disk(d)
                if why is None and (d.source is None or d.source_type not in ("file", "block")):
                    why = f"{d.source_type} disks of a shut-off domain cannot be read"
                if why is not None:
                    results.append(DiskResult(d.target, False, 0, reason=why))
                    continue
                assert d.source is not None
                self.to(CaptureState.READING, d.target)
                with local_nbd(d.source, d.format, export=d.target) as sock:
                    from vmarchive.hypervisor.nbd import NBDClient

                    with NBDClient.connect(sock, d.target, meta_contexts=()) as c:
                        size = c.size
                    sw = self._disk_stream(w, d, size)
                    r = read_disk(sock, d.target, sw, d.target, self.progress)
                    st = sw.close()
                results.append(DiskResult(d.target, True, size, r.bytes_read, st.bytes_new))
            t = self.clock()
            meta.update(
                {
                    "time": _now_iso(t),
                    "mode": "disk-only",
                    "guest_pause_ms": None,
                    "capture": {
                        "start": _now_iso(self.t_start),
                        "instant": None,
                        "end": _now_iso(t),
                    },
                    "disks": [r.to_json() for r in results],
                }
            )
            self.to(CaptureState.COMMITTING)
            aid = w.commit(meta)
        self.to(CaptureState.DONE, aid)
        return CaptureResult(
            id=aid,
            domain=self.dom.name,
            mode="disk-only",
            kind="disk-only",
            guest_pause_ms=None,
            bytes_read=sum(r.bytes_read for r in results),
            bytes_stored=sum(r.bytes_stored for r in results),
            duration_s=self.clock() - self.t_start,
            disks=results,
        )

    # -- live domain ---------------------------------------------------------------------
    def _live(self, dstate: DomainState) -> CaptureResult:
        qmp = self.qmp
        assert qmp is not None and self.marker is not None
        live_xml = self.dom.xml()
        mig_xml = self.dom.xml(migratable=True)
        # The leftover sweep has just seen QEMU's block devices (unless it changed them).
        disks = list_disks(qmp, live_xml, known=self.block_state)
        copy = [d for d in disks if self._copy_disk(d) is None]
        mode = self._choose_mode(qmp, dstate)
        parse, refused = self.o.parse_memory, None
        while True:
            try:
                return self._attempt(qmp, mode, disks, copy, live_xml, mig_xml, parse, refused)
            except StreamError as e:
                # Refused by the allow-list, or (a parser bug) judged inconsistent: never
                # lose the capture, take it again with the stream stored opaquely.
                if not parse:
                    raise
                log.warning("migration stream not parsed (%s); capturing it opaquely", e)
                parse, refused = False, str(e)
                self.marker = Marker(
                    path=self.marker.path,
                    domain=self.dom.name,
                    uuid=self.dom.uuid,
                    was_running=self.marker.was_running,
                )

    def _attempt(
        self,
        qmp: QMP,
        mode: str,
        disks: list[DiskInfo],
        copy: list[DiskInfo],
        live_xml: str,
        mig_xml: str,
        parse: bool,
        refused: str | None,
    ) -> CaptureResult:
        marker = self.marker
        assert marker is not None
        # Our QMP calls and QEMU's events must not wait up to 5 ms (CPython's default switch
        # interval) for the GIL while the stream threads hash pages: that time is guest pause.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.0005))
        try:
            return self._attempt_inner(qmp, mode, disks, copy, live_xml, mig_xml, parse, refused)
        finally:
            sys.setswitchinterval(switch)

    def _attempt_inner(
        self,
        qmp: QMP,
        mode: str,
        disks: list[DiskInfo],
        copy: list[DiskInfo],
        live_xml: str,
        mig_xml: str,
        parse: bool,
        refused: str | None,
    ) -> CaptureResult:
        marker = self.marker
        assert marker is not None
        self.work = Path(tempfile.mkdtemp(prefix="vmarchive-", dir=self.o.work_dir))
        marker.files.append(str(self.work))
        try:
            with (
                qmp.subscribe({"STOP", "RESUME", "MIGRATION", "MIGRATION_PASS"}) as ev,
                self.repo.writer() as w,
            ):
                self.events = ev
                if not (marker.saved_capabilities or marker.saved_parameters):
                    self._save_migration_settings(qmp, marker)  # unless _choose_mode did
                # The marker names the temporary images (_temp_node) before they exist.
                role = _TEMP_ROLE.get(mode)
                if role is not None:
                    for d in copy:
                        marker.files.insert(0, str(self._temp_image(role, d)))
                marker.save()
                self.made = Made()
                try:
                    memory = capture_parse.make_consumer(
                        w, parse, refused, snapshot=mode == "snapshot"
                    )
                    result = self._live_capture(
                        qmp, marker, w, mode, disks, copy, live_xml, mig_xml, memory
                    )
                finally:
                    readers, self.readers = self.readers, None
                    if readers is not None:  # joined by now, unless the capture failed
                        readers.cancel()
                        readers.join()
                    remap, self.remap = self.remap, None
                    if remap is not None:
                        remap.result()  # not beside a retried attempt's snapshot (bounded)
                    self.to(CaptureState.CLEANING)
                    self.caps_now = None  # the clean-up puts the saved settings back
                    self.block_state = {}  # and may change bitmaps: a retry asks again
                    early, self.release = self.release, None
                    if early is not None and early.result():
                        # QEMU is clean; only the bitmaps wait for the commit's outcome
                        done = restore_bitmaps(qmp, marker)
                    else:
                        done = clean_domain(qmp, marker, keep_marker=True)
                    if not done:
                        log.warning(
                            "cleanup of %s was incomplete; the next run retries", self.dom.name
                        )
                    else:
                        marker.remove()
                    if self.o.late_bitmap:
                        for p in self.plans.values():
                            qmp.execute("transaction", {"actions": p.actions()[:1]})
                self._retire_bitmaps(qmp, mode)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(self.work)
        self.to(CaptureState.DONE, result.id)
        # The whole command's time: the round trip, the commit and the clean-up included.
        return msgspec.structs.replace(result, duration_s=self.clock() - self.t_start)

    def _choose_mode(self, qmp: QMP, dstate: DomainState) -> str:
        if dstate != DomainState.RUNNING:
            if qmp.execute("query-status").get("status") == "postmigrate":
                # QEMU 7.2 refuses to migrate a guest stopped by a completed migration,
                # and nothing but `cont` brings it out of that state.
                raise UsageError(
                    f"domain {self.dom.name!r} is still paused from an earlier capture; "
                    "QEMU cannot capture it again until it has been resumed",
                    domain=self.dom.name,
                )
            return "paused"
        if self.o.mode == Mode.SWITCHOVER:
            return "switchover"
        with contextlib.suppress(HypervisorError):  # then the probe asks and says why
            self.caps_before = migration_capabilities(qmp)
        caps = self.caps_before
        probe = caps is not None and caps.get("background-snapshot") is False
        if probe:
            # The probe's setting is kept for the capture (one round trip where setting,
            # undoing and setting again took three), so the marker names the settings to
            # put back before QEMU's change: the watchdog or the next run restores them
            # should this process die before its own clean-up.
            assert self.marker is not None
            self._save_migration_settings(qmp, self.marker)
            self.marker.save()
        ok, why = snapshot_supported(qmp, caps, keep=probe)
        if ok and probe:
            crashpoint.hit("capture-probed")
        elif probe and self.marker is not None:
            self.marker.remove()  # refused: QEMU unchanged, nothing for a watchdog to undo
        if caps is not None:
            self.caps_now = {**caps, "background-snapshot": True} if ok and probe else dict(caps)
        if self.o.mode == Mode.SNAPSHOT and not ok:
            raise HostPreconditionError(
                f"snapshot mode does not work for {self.dom.name!r}: {why} "
                "(see `vmarchive doctor`; --mode switchover works everywhere)",
                domain=self.dom.name,
            )
        if ok:
            return "snapshot"
        log.info("snapshot mode unavailable (%s); using switchover", why)
        return "switchover"

    def _save_migration_settings(self, qmp: QMP, marker: Marker) -> None:
        # _choose_mode's answer from before its probe changed anything (one round trip
        # less).
        caps = self.caps_before
        if caps is None:
            caps = migration_capabilities(qmp)
        params = qmp.execute("query-migrate-parameters")
        marker.saved_capabilities = {
            k: caps[k]
            for k in ("pause-before-switchover", "background-snapshot", "auto-converge")
            if k in caps
        }
        marker.saved_parameters = {
            k: params[k] for k in ("max-bandwidth", "downtime-limit") if k in params
        }

    def _set_migration(self, qmp: QMP, mode: str) -> None:
        caps = {
            "pause-before-switchover": mode == "switchover",
            "background-snapshot": mode == "snapshot",
            "auto-converge": mode == "switchover" and self.o.auto_converge,
        }
        now = self.caps_now
        if now is None or any(now.get(k) is not v for k, v in caps.items()):
            qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
            )
            self.caps_now = {**(now or {}), **caps}
        bw = (
            UNLIMITED_BANDWIDTH
            if self.o.bandwidth_mib_s is None
            else max(1, int(self.o.bandwidth_mib_s * 1024 * 1024))
        )
        qmp.execute(
            "migrate-set-parameters", {"max-bandwidth": bw, "downtime-limit": self.o.downtime_ms}
        )

    def _temp_image(self, role: str, d: DiskInfo) -> Path:
        assert self.work is not None
        return self.work / f"{_temp_name(role, d)}.qcow2"

    def _temp_node(self, qmp: QMP, role: str, d: DiskInfo, backing: str | None) -> str:
        """A temporary qcow2 node (a new image in the work dir, passed to QEMU as an fd)."""
        name = _temp_name(role, d)
        img = self._temp_image(role, d)
        empty_qcow2(img, int(d.virtual_size or 0))
        fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
        try:
            fdset = qmp.add_fd(fd, opaque=name)
        finally:
            os.close(fd)
        self.made.fdsets.append(fdset)
        qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": name,
                "backing": backing,
                "file": {
                    "driver": "file",
                    "node-name": f"{name}-f",
                    "filename": f"/dev/fdset/{fdset}",
                    # Skip the page-cache drop on (in)activation: it was most of the pause.
                    "drop-cache": False,
                },
            },
        )
        self.made.nodes.append(name)
        return name

    @contextlib.contextmanager
    def _nbd_server(self, qmp: QMP, marker: Marker) -> Iterator[str]:
        """Start QEMU's NBD server on a unix socket we own (passed as a listening fd)."""
        assert self.work is not None
        path = str(self.work / "nbd.sock")
        marker.files.insert(0, path)
        marker.nbd_server = True
        marker.save()
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ls.bind(path)
            ls.listen(16)
            with qmp.passed_fd(PREFIX + "nbd", ls.fileno(), consumed=True):
                qmp.execute(
                    "nbd-server-start", {"addr": {"type": "fd", "data": {"str": PREFIX + "nbd"}}}
                )
            yield path
        finally:
            ls.close()

    def _export(self, qmp: QMP, d: DiskInfo, node: str, bitmap: str | None = None) -> str:
        # QEMU looks for an exported bitmap on the node and down its backing chain: the
        # fleecing node's backing child is the disk's format node, where ours live.
        args: dict[str, Any] = {
            "type": "nbd",
            "id": f"{PREFIX}exp-{_node_suffix(d.target)}",
            "node-name": node,
            "name": d.target,
            "writable": False,
        }
        if bitmap is not None:
            args["bitmaps"] = [bitmap]
        qmp.execute("block-export-add", args)
        return d.target

    # -- incrementals --------------------------------------------------------------------
    def _parent(self) -> tuple[Any, dict[str, str]]:
        """The newest archive of this domain (by uuid), loaded, and every bitmap name
        recorded by an archive of this domain -> that archive's id."""
        newest = None
        known: dict[str, str] = {}
        for s in self.repo.list_archives(uuid=self.dom.uuid):
            newest = s
            tracking = s.metadata.get("tracking") or {}
            if isinstance(tracking, dict):
                for t in tracking.values():
                    if isinstance(t, dict) and t.get("bitmap"):
                        known[str(t["bitmap"])] = s.id
        if newest is None:
            return None, known
        self.parent_archive = self.repo.load_archive(newest.id)
        return self.parent_archive, known

    def _plan_disks(
        self, qmp: QMP, copy: list[DiskInfo], sinks: dict[str, Any]
    ) -> dict[str, DiskPlan]:
        parent, known = self._parent()
        tag = repository_tag(self.repo.codecs.config.repository_id)
        # The sweep's answer still holds for the bitmaps: nothing of ours touched them
        # since (a temporary node was added at most).
        bitmaps = node_bitmaps(qmp, self.block_state.get("query-named-block-nodes"))
        host = socket.gethostname()
        instance = qemu_instance(self.dom.name)
        plans: dict[str, DiskPlan] = {}
        for d in copy:
            assert d.node_name is not None and d.virtual_size is not None
            pdisk: ParentDisk | None = None
            if parent is not None:
                tracking = (parent.metadata.get("tracking") or {}).get(d.target)
                stream = next((s for s in parent.streams if s.name == f"disk:{d.target}"), None)
                if isinstance(tracking, dict) and stream is not None:
                    pdisk = ParentDisk(
                        archive=parent.id,
                        host=str(parent.metadata.get("host", "")),
                        tracking=tracking,
                        table=stream.table,
                        chunk_size=stream.chunk_size,
                        size=stream.size,
                    )
                elif parent is not None:
                    pdisk = ParentDisk(
                        parent.id, str(parent.metadata.get("host", "")), {}, b"", 0, 0
                    )
            now = Current(
                target=d.target,
                source=d.source,
                virtual_size=d.virtual_size,
                host=host,
                chunk_size=int(sinks[d.target].chunk_size),
                instance=instance,
            )
            mine = bitmaps.get(d.node_name, [])
            why = decide(pdisk, now, mine, known, full=self.o.full, tag=tag)
            since = None if why is not None else str(pdisk.tracking["bitmap"]) if pdisk else None
            plan = DiskPlan(
                target=d.target,
                node=d.node_name,
                new_bitmap=new_bitmap_name(tag),
                persistent=(d.driver or d.format) in PERSISTENT_FORMATS,
                since_bitmap=since,
                parent=pdisk if since is not None else None,
                fallback_reason=why,
                stale=tuple(b.name for b in mine if owned(b.name, tag) and b.name != since),
                dirty_bytes=next((b.count for b in mine if b.name == since), 0),
            )
            if why is not None:
                log.info("disk %s: full read: %s", d.target, why)
            plans[d.target] = plan
        return plans

    def _retire_bitmaps(self, qmp: QMP, mode: str) -> None:
        """After a committed archive: only the bitmap it started stays on each disk.

        Not while a paused guest sits in ``postmigrate``: its nodes are inactive, QEMU 7.2
        has written a qcow2 disk's persistent bitmaps into the image and let go of them,
        and refuses their removal ("not found"; they come back when the guest runs).  The
        next capture of the running guest removes them (they are frozen, never trusted).
        A background snapshot (``mode`` snapshot) never leaves QEMU there: no need to ask.
        """
        old = {
            p.node: list(p.stale) + ([p.since_bitmap] if p.since_bitmap else [])
            for p in self.plans.values()
        }
        if not any(old.values()):
            return
        if mode != "snapshot":
            status = str(qmp.execute("query-status").get("status"))
            if status in ("postmigrate", "finish-migrate", "inmigrate"):
                log.info("old dirty bitmaps kept until the guest runs again (%s)", status)
                return
        for node, names in old.items():
            remove_bitmaps(qmp, node, names)

    def _start_channel(self, qmp: QMP, consumer: Any, gate: bool = False) -> PipeReader:
        """The migration channel, handed to QEMU, and its reader.

        A unix stream socket pair rather than a pipe: QEMU sends the same stream either
        way, but a pipe's reader frees a page for every 4 KiB QEMU wrote (perf: most of
        the reading thread's time was the kernel copying and freeing pipe pages).  QEMU's
        background snapshot of the bench guest's RAM (329 MiB) into a reader that only
        drains it, alternating: 104-119 ms through a 1 MiB pipe, the reader's thread
        88-104 ms of CPU; 73-85 ms through the socket, the reader 33-37 ms.

        ``gate``: fill the channel until QEMU's next write must wait, and do not start the
        reader, so QEMU's first write blocks (the set-up gate, see
        :meth:`_snapshot_gate`); the reader skips the filler once started.  (``open_gate``,
        a test option, leaves the filler out: QEMU then blocks only once the channel is
        full of its RAM pages.)
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        filler = 0
        try:
            with contextlib.suppress(OSError):
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BUFFER)
            if gate and not self.o.open_gate:
                # Until a send finds no room: then any write of QEMU's (whole or partial)
                # waits for the reader.  Smaller pieces to the end (the buffer counts
                # each send's overhead too).
                theirs.setblocking(False)
                for piece in (bytes(64 << 10), bytes(4096), b"\0"):
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            filler += theirs.send(piece)
                theirs.setblocking(True)
            qmp.getfd(PREFIX + "mig", theirs.fileno())
            r = ours.detach()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self.watchdog is not None:
            self.watchdog.hold_stream(r)
        reader = PipeReader(r, consumer, self.progress.task("memory", None), skip=filler)
        if not gate:
            reader.start()
        return reader

    def _snapshot_gate(self, pid: int | None) -> bool:
        """Wait until QEMU's background snapshot has done its set-up and waits on the channel.

        QEMU 7.2's ``bg_snapshot`` thread first read-touches every page of guest RAM
        (``ram_write_tracking_prepare``, time grows with RAM: up to ~50 ms for 2 GiB
        here), then writes the stream header, then takes the big lock, stops the vCPUs,
        saves the device state, write-protects RAM and resumes the guest.  Stopping the guest before
        ``migrate`` put all of that set-up into the pause.  Instead, ``migrate`` is issued
        while the guest runs, into a channel filled until nothing more fits
        (:meth:`_start_channel`): QEMU's header write blocks after the set-up, *before* the
        thread stops anything.  Then the guest is stopped and the disks fixed, and only
        then is the channel drained; QEMU's stop finds the guest already stopped, so RAM and
        disks hold the same instant, and the pause no longer includes the set-up.

        Whether the thread has got to the channel is read from /proc (it sleeps in the
        socket's send); returns False if that cannot be seen (the pause then includes the
        rest of the set-up, as before; nothing else changes).  Either way the capture checks
        that QEMU is still in ``setup`` with the guest stopped before it drains the channel:
        a thread still in ``setup`` has not stopped or resumed anything yet.
        """
        if pid is None:
            return False
        t = time.perf_counter()
        blocked = wait_thread_blocked_writing(pid)
        log.debug(
            "QEMU's snapshot set-up %s after %.1f ms",
            "done" if blocked else "not seen done",
            (time.perf_counter() - t) * 1000,
        )
        return blocked

    def _check_gate_held(self, qmp: QMP, reader: PipeReader) -> None:
        """Raise unless QEMU's snapshot is still in ``setup`` (it never got past the gate).

        A QEMU that did get past it has write-protected guest RAM and waits on the full
        channel; its main loop can then block on a protected page, and with it this very
        ``query-migrate``.  So if the answer takes longer than GATE_CHECK_S the channel is
        drained: QEMU answers, and a status other than ``setup`` fails the capture as it
        should (a gate that held only costs a failed capture if the answer is that slow).
        """
        drain = threading.Timer(GATE_CHECK_S, reader.ensure_started)
        drain.daemon = True
        drain.start()
        try:
            st = qmp.execute("query-migrate")
        finally:
            drain.cancel()
        status = str(st.get("status"))
        if status != "setup" or reader.ident is not None:
            raise HypervisorError(
                f"QEMU's background snapshot of {self.dom.name} did not wait at the set-up "
                f"gate (status {status!r}): RAM and disks would not hold the same instant; "
                "nothing was stored",
                domain=self.dom.name,
            )

    def _migrate(self, qmp: QMP, marker: Marker) -> None:
        if not marker.migration_started:
            marker.migration_started = True
            marker.save()
        t = time.perf_counter()
        qmp.execute("migrate", {"uri": f"fd:{PREFIX}mig"})
        log.debug("migrate took %.1f ms", (time.perf_counter() - t) * 1000)
        self.to(CaptureState.MIGRATING)

    def _wait_migration(self, qmp: QMP, reader: PipeReader, want: set[str]) -> str:
        """Wait until the migration reaches a state in ``want`` and return it.

        Driven by QEMU's MIGRATION events (polling through libvirt added ~20 ms to the
        pause); ``query-migrate`` is polled every 0.25 s as a safety net and to enforce
        the precopy bounds.
        """
        t0 = time.monotonic()
        raised = False
        next_poll = 0.0
        ev = self.events
        while True:
            now = time.monotonic()
            if now >= next_poll or ev is None:
                next_poll = now + 0.25
                st: dict[str, Any] = qmp.execute("query-migrate")
                status = str(st.get("status"))
                if status in want:
                    return status
                if status in ("failed", "cancelled", "none"):
                    raise HypervisorError(
                        f"migration of {self.dom.name} {status}: "
                        f"{st.get('error-desc', 'no detail')}",
                        domain=self.dom.name,
                    )
                elapsed = now - t0
                passes = int((st.get("ram") or {}).get("dirty-sync-count", 0))
                if (
                    "pre-switchover" in want
                    and not raised
                    and (passes > self.o.max_iterations // 2 or elapsed > self.o.max_precopy_s / 2)
                ):
                    # Not converging: accept a longer pause rather than never finishing.
                    log.warning(
                        "precopy not converging (%d passes); raising downtime-limit", passes
                    )
                    qmp.execute("migrate-set-parameters", {"downtime-limit": 300})
                    raised = True
                if passes > self.o.max_iterations or elapsed > self.o.max_precopy_s:
                    raise HypervisorError(
                        f"memory of {self.dom.name} did not converge ({passes} passes, "
                        f"{elapsed:.0f} s); try --mode snapshot or a lower write load",
                        domain=self.dom.name,
                    )
            if reader.error is not None:
                raise reader.error
            if ev is None:
                time.sleep(0.002)
                continue
            e = ev.get(timeout=0.05)
            if e is not None and e.name == "MIGRATION":
                status = str(e.data.get("status"))
                if status in want:
                    return status
                if status in ("failed", "cancelled"):
                    next_poll = 0.0

    def _disk_readers(self, w: Any, mode: str, copy: list[DiskInfo]) -> DiskProcess | None:
        """The disk reader process (:mod:`vmarchive.ops.disk_process`) of a live capture
        whose disk reads pay for it (:func:`reads_pay_for_a_process`); the disks of a
        paused guest are read before its memory is sent: on threads.  None: on threads."""
        forked, self.forked = self.forked, None  # for this attempt only
        plans = [self.plans[d.target] for d in copy]
        if (
            not self.o.disk_process
            or mode == "paused"
            or not reads_pay_for_a_process(plans, forked=forked is not None)
        ):
            if forked is not None:
                forked.dismiss()
            return None
        try:
            readers = DiskProcess.spawn(self.o.repo, w, self.progress, forked)
            how = "forked" if readers.pid == getattr(forked, "pid", None) else "spawned"
            log.debug("disks read by a process of their own (pid %d, %s)", readers.pid, how)
            return readers
        except OSError as e:
            log.debug("disk reader process not started (%s): disks read on threads", e)
            return None

    def _live_capture(
        self,
        qmp: QMP,
        marker: Marker,
        w: Any,
        mode: str,
        disks: list[DiskInfo],
        copy: list[DiskInfo],
        live_xml: str,
        mig_xml: str,
        memory: capture_parse.MemoryConsumer,
    ) -> CaptureResult:
        meta = self._base_metadata("full", live_xml)
        self._xml_streams(w, live_xml, mig_xml)

        def record_memory_map() -> None:
            # After the memory was stored, beside its round trip and the disk reads: three
            # round trips (two HMP, query-cpus-fast) less before the instant, and none
            # while QEMU sends the RAM (they slowed that by as much; the map is as good
            # read after the instant, see collect_memory_map).  The parsed map
            # (memory_map, vcpus, arch) is what export-memory reads; the raw texts stay
            # as a fallback.  A map we cannot read must not lose the capture.
            texts = self._memory_map(qmp)
            self._meta_streams(w, texts)
            try:
                meta.update(
                    collect_memory_map(qmp, texts.get("mtree.txt"), texts.get("ramblock.txt"))
                )
            except (HypervisorError, FormatError) as map_err:
                log.warning("memory map not recorded: %s", map_err)

        threads: DiskThreads | DiskProcess = DiskThreads()
        disk_sinks: dict[str, Any] = {}
        export_node: dict[str, str] = {}

        # -- prepare: temporary nodes and migration settings
        overlays: dict[str, str] = {}
        if mode == "switchover":
            for d in copy:
                assert d.node_name is not None
                ov = self._temp_node(qmp, _TEMP_ROLE[mode], d, None)
                overlays[d.target] = ov
                marker.overlays[ov] = d.node_name
                export_node[d.target] = d.node_name
        elif mode == "snapshot":
            for d in copy:
                assert d.node_name is not None
                export_node[d.target] = self._temp_node(qmp, _TEMP_ROLE[mode], d, d.node_name)
        else:
            export_node = {d.target: str(d.node_name) for d in copy}
        marker.mode = mode
        marker.save()
        if mode == "switchover" and self.o.keep_cache:
            done = reopen_keep_cache(qmp, self.dom.name, disks, marker.reopened, marker.save)
            log.debug("reopened without cache drop: %s", done)
        self._set_migration(qmp, mode)
        for d in copy:
            assert d.virtual_size is not None
            disk_sinks[d.target] = self._disk_stream(w, d, d.virtual_size)
        self.plans = self._plan_disks(qmp, copy, disk_sinks)  # finds the parent archive
        started = self._disk_readers(w, mode, copy)
        if started is not None:
            self.readers = threads = started  # stopped in _attempt_inner whatever happens
        capture_parse.vouch(memory, None if self.o.full else self.parent_archive)
        marker.bitmaps = [[p.node, p.new_bitmap, p.since_bitmap] for p in self.plans.values()]
        self.to(CaptureState.PREPARED, mode)

        def fix_disks() -> None:
            actions: list[dict[str, Any]] = []
            for d in copy:
                plan = self.plans[d.target]
                if self.o.late_bitmap:
                    actions += plan.actions()[1:]
                else:
                    actions += plan.actions()
                if mode == "switchover":
                    actions.append(
                        {
                            "type": "blockdev-snapshot",
                            "data": {"node": d.node_name, "overlay": overlays[d.target]},
                        }
                    )
                elif mode == "snapshot":
                    actions.append(
                        {
                            "type": "blockdev-backup",
                            "data": {
                                "job-id": f"{PREFIX}fleece-{_node_suffix(d.target)}",
                                "device": d.node_name,
                                "target": export_node[d.target],
                                "sync": "none",
                            },
                        }
                    )
            if actions:
                t = time.perf_counter()
                qmp.execute("transaction", {"actions": actions})
                self.made.jobs += [
                    a["data"]["job-id"] for a in actions if a["type"] == "blockdev-backup"
                ]
                log.debug("transaction took %.1f ms", (time.perf_counter() - t) * 1000)

        def start_disk_reads(sock: str) -> None:
            for d in copy:
                plan = self.plans[d.target]
                try:
                    exp = self._export(qmp, d, export_node[d.target], plan.since_bitmap)
                except QMPCommandError as e:
                    if plan.since_bitmap is None:
                        raise
                    # Never lose the capture over the bitmap: read this disk in full
                    # (the new bitmap is already recording, so tracking is re-armed).
                    log.warning("disk %s: cannot export bitmap, reading in full: %s", d.target, e)
                    plan = msgspec.structs.replace(
                        plan,
                        since_bitmap=None,
                        parent=None,
                        fallback_reason=f"QEMU could not export bitmap {plan.since_bitmap}: {e}",
                    )
                    self.plans[d.target] = plan
                    exp = self._export(qmp, d, export_node[d.target], None)
                sink = disk_sinks[d.target]
                since = plan.incremental_read
                if isinstance(threads, DiskProcess):
                    threads.start(
                        d.target,
                        sink,
                        socket=sock,
                        export=exp,
                        bitmap=None if since is None else since[0],
                        parent_table=None if since is None else since[1],
                    )
                    continue
                if since is not None:
                    fn = functools.partial(
                        read_disk_incremental,
                        sock,
                        exp,
                        sink,
                        d.target,
                        self.progress,
                        *since,
                        zero_id=w.zero_id,
                        parent_chunk=w.read_chunk,
                    )
                else:
                    fn = functools.partial(read_disk, sock, exp, sink, d.target, self.progress)
                threads.start(d.target, fn)
            if isinstance(threads, DiskProcess):
                threads.end_input()

        reader: PipeReader | None = None
        roundtrip: capture_parse.RoundTrip | None = None
        mig: dict[str, Any] = {}
        pid: int | None = None  # QEMU's process (snapshot mode)
        try:
            with self._nbd_server(qmp, marker) as sock:
                if mode == "paused":
                    # Nothing changes while paused: the disks first (a completed migration
                    # leaves them inactive), then the memory.
                    fix_disks()  # the bitmaps only: nothing changes while paused
                    self.t_instant = self.clock()
                    self.to(CaptureState.INSTANT, "guest paused")
                    start_disk_reads(sock)
                    self.to(CaptureState.READING)
                    threads.join()
                    threads.raise_first()
                    # The migration inactivates the nodes, which saves and releases their
                    # persistent bitmaps: none may still be held by an export then.
                    del_exports(qmp, [f"{PREFIX}exp-{_node_suffix(d.target)}" for d in copy])
                    reader = self._start_channel(qmp, memory)
                    self._migrate(qmp, marker)
                    self._wait_migration(qmp, reader, {"completed"})
                elif mode == "switchover":
                    preflush(disks)
                    if not self.o.tcg_live_precopy:
                        stop_if_tcg(qmp)  # TCG precopy misses writes: copy a stopped guest
                    reader = self._start_channel(qmp, memory)
                    self._migrate(qmp, marker)
                    self._wait_migration(qmp, reader, {"pre-switchover"})
                    reader.hold()
                    self.to(CaptureState.SWITCHOVER)
                    if self.o.disk_delay_s <= 0:
                        fix_disks()
                    crashpoint.hit("capture-disks-fixed")
                    qmp.execute("migrate-continue", {"state": "pre-switchover"})
                    self._wait_migration(qmp, reader, {"completed"})
                    cont_guest(qmp)
                    reader.go()
                    self.t_instant = self.clock()
                    self.to(CaptureState.INSTANT)
                    if self.o.disk_delay_s > 0:
                        time.sleep(self.o.disk_delay_s)
                        fix_disks()
                    start_disk_reads(sock)
                    self.to(CaptureState.READING)
                else:  # snapshot
                    preflush(disks)
                    pid = qemu_pid(qmp, name=self.dom.name)  # libvirt's pid file, or QMP
                    reader = self._start_channel(qmp, memory, gate=True)
                    self._migrate(qmp, marker)  # the guest runs through QEMU's set-up
                    gate_seen = self._snapshot_gate(pid)
                    if gate_seen:
                        self._check_gate_held(qmp, reader)
                    t = time.perf_counter()
                    qmp.execute("stop")
                    log.debug("stop took %.1f ms", (time.perf_counter() - t) * 1000)
                    self.to(CaptureState.SWITCHOVER)
                    if self.o.disk_delay_s <= 0:
                        fix_disks()
                    crashpoint.hit("capture-disks-fixed")
                    if not gate_seen:
                        self._check_gate_held(qmp, reader)
                    reader.ensure_started()  # opens the gate: QEMU takes the instant, resumes
                    self.t_instant = self.clock()
                    self.to(CaptureState.INSTANT)
                    if self.o.disk_delay_s > 0:
                        time.sleep(self.o.disk_delay_s)
                        fix_disks()
                    start_disk_reads(sock)
                    self.to(CaptureState.READING)
                    self._wait_migration(qmp, reader, {"completed"})
                mig = qmp.execute("query-migrate")
                reader.join()
                if reader.error is not None:
                    raise reader.error
                log.debug("memory stored at +%.2f s", self.clock() - self.t_start)
                # --full reads everything again: the memory's round trip included
                vouch = None if self.o.full else self.parent_archive
                roundtrip = capture_parse.RoundTrip(w, memory, vouch)
                record_memory_map()
                threads.join()
                log.debug("disks read at +%.2f s", self.clock() - self.t_start)
                threads.raise_first()
        except BaseException:
            threads.cancel()
            threads.join()
            if roundtrip is not None:
                roundtrip.join()  # it reads from the writer that is about to be aborted
            if reader is not None:
                reader.ensure_started()  # a gated snapshot waits for it to drain the channel
                reader.go()
            if reader is not None and reader.is_alive():
                if mode != "snapshot":
                    with contextlib.suppress(HypervisorError):
                        qmp.execute("migrate_cancel")
                # A background snapshot is never cancelled (see capture_cleanup): the
                # reader drains it to its end.
                reader.join(600 if mode == "snapshot" else 30)
            if reader is None or not reader.is_alive():
                capture_parse.abandon(memory)  # its parser has ended: nothing waits long
            raise
        finally:
            if self.watchdog is not None and (reader is None or not reader.is_alive()):
                self.watchdog.drop_stream()

        # QEMU's part is over: the migration completed and every disk was read.  What the
        # capture changed in QEMU is undone on a thread while the memory's round trip and
        # the commit run (seven monitor round trips in a snapshot-mode capture, mostly
        # waiting on libvirt); the dirty bitmaps wait for the commit, in _attempt_inner's
        # clean-up.
        over = mig.get("status") == "completed"  # as _wait_migration saw: never asked again
        self.release = _Background("capture-release", _release_qemu, qmp, marker, over, self.made)
        remap: _Background | None = None
        if mode == "snapshot" and self.o.remap_huge_pages:
            # QEMU lifts its write protection in the migration's clean-up, which its main
            # loop ran before answering the query-migrate above; pages still protected
            # would only be skipped (their page-map entries differ), never harmed.
            remap = self.remap = _Background("huge-page-remap", restore_huge_pages, pid)

        # -- results
        t_end = self.clock()
        pause = pause_us(self.events.history) if self.events is not None else None
        pause_ms = None if pause is None else pause / 1000.0
        if self.events is not None and log.isEnabledFor(logging.DEBUG):
            t0 = self.events.history[0].timestamp if self.events.history else 0.0
            for e in self.events.history:
                log.debug("event +%.1f ms %s %s", (e.timestamp - t0) * 1000, e.name, e.data)
        stop_ts = [
            e.timestamp for e in (self.events.history if self.events else []) if e.name == "STOP"
        ]
        instant = stop_ts[-1] if stop_ts else self.t_instant
        mem_info = memory.summary()
        disk_results: list[DiskResult] = []
        for d in disks:
            why = self._copy_disk(d)
            if why is not None:
                disk_results.append(DiskResult(d.target, False, d.virtual_size or 0, reason=why))
                continue
            st = disk_sinks[d.target].close()
            r: DiskRead = threads.results[d.target]
            plan = self.plans[d.target]
            disk_results.append(
                DiskResult(
                    d.target,
                    True,
                    r.size,
                    r.bytes_read,
                    # stored here, or by the disk reader process (r.bytes_stored)
                    st.bytes_new + r.bytes_stored,
                    incremental=plan.incremental,
                    bytes_referenced=r.bytes_referenced,
                    fallback_reason=plan.fallback_reason,
                )
            )
        parent_id = next(
            (p.parent.archive for p in self.plans.values() if p.parent is not None), None
        )
        meta["parent"] = parent_id
        meta["tracking"] = {
            d.target: self.plans[d.target].tracking(
                str(meta["host"]),
                self.dom.uuid,
                d.source,
                int(d.virtual_size or 0),
                d.driver or d.format,
                qemu_instance(self.dom.name),
            )
            for d in copy
        }
        assert roundtrip is not None
        # Everything is written: its packs go out while the round trip may still run
        # (it reads only what this capture stored anew), so the commit after it writes
        # only the index and the manifest.
        try:
            w.flush()
        except BaseException:
            roundtrip.join()  # it reads from the writer that is about to be aborted
            raise
        roundtrip_result = roundtrip.result()  # before the streams it reads are closed
        mem_stored = memory.close_streams()
        meta.update(
            {
                "time": _now_iso(instant or t_end),
                "mode": mode,
                "guest_pause_ms": pause_ms,
                "capture": {
                    "start": _now_iso(self.t_start),
                    "instant": _now_iso(instant) if instant else None,
                    "end": _now_iso(t_end),
                },
                "migration": _migration_stats(mig),
                "memory": mem_info,
                "disks": [x.to_json() for x in disk_results],
                "disk_delay_s": self.o.disk_delay_s or None,
            }
        )
        meta["memory"]["roundtrip"] = roundtrip_result
        self.to(CaptureState.COMMITTING)
        aid = str(w.commit(meta))
        marker.bitmaps = []  # the archive names them now: the cleanup keeps them
        assert reader is not None
        huge = None if remap is None else remap.result().to_json()
        return CaptureResult(
            id=aid,
            domain=self.dom.name,
            mode=mode,
            kind="full",
            guest_pause_ms=pause_ms,
            bytes_read=reader.bytes_read + sum(x.bytes_read for x in disk_results),
            bytes_stored=mem_stored + sum(x.bytes_stored for x in disk_results),
            duration_s=t_end - self.t_start,
            disks=disk_results,
            memory_format=str(mem_info.get("format")),
            parent=parent_id,
            huge_pages=huge,
        )


#: Bytes of incremental reads from which a capture reads its disks in a process of its own.
#: Beside the memory, on threads of one process, reading and storing a disk cost ~1 s per
#: GiB more than in a process of its own (scripts/bench_split.py: 516 MiB of disk added
#: 0.5-0.9 s to the memory's 1.4 s on threads, 0.1-0.2 s in two processes); a spawned
#: process's start-up is ~0.2 s here, so it pays from ~200 MiB.
PROCESS_MIN_READ = 256 << 20
#: The same for a child forked already (:func:`~vmarchive.ops.disk_process.fork_reader`):
#: any read.  Incremental captures of the bench guest with 1 % of its disk rewritten took
#: 0.67 s with it, 0.74 s on threads (medians of 12, alternating); with nothing but the
#: guest's tick block to read, 0.48 s and 0.50 s.
FORKED_MIN_READ = 1


def reads_pay_for_a_process(plans: Iterable[DiskPlan], *, forked: bool = False) -> bool:
    """Whether the disk reads of a live capture planned as ``plans`` go to a process of
    their own: when a disk is read in full (a first capture, a fallback, ``--full``), or
    the incremental reads (the bytes the frozen bitmaps mark) add up to at least
    :data:`PROCESS_MIN_READ` (:data:`FORKED_MIN_READ` with a forked child waiting).  A
    second capture of the idle bench guest (nothing to read) took 0.53 s on threads and
    0.69 s with a spawned process (medians of 5)."""
    dirty = 0
    for p in plans:
        if p.incremental_read is None:
            return True
        dirty += p.dirty_bytes
    return dirty >= (FORKED_MIN_READ if forked else PROCESS_MIN_READ)


class _Background:
    """``fn(*args)`` on a daemon thread from now on; :meth:`result` waits for its value.
    For work that never raises (it reports its own failures)."""

    def __init__(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self._value: Any = None
        self._thread = threading.Thread(
            target=lambda: setattr(self, "_value", fn(*args)), name=name, daemon=True
        )
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        return self._value


def _release_qemu(qmp: QMP, marker: Marker, migration_over: bool, made: Made) -> bool:
    """:func:`clean_domain` of a capture whose QEMU part is over (migration completed,
    every disk read), run beside what needs no QEMU (the memory's round trip check and
    the commit).  The dirty bitmaps are left for the capture to settle after its commit
    (``bitmaps=False``); the marker stays.  True when everything else was undone;
    otherwise the caller runs the whole clean-up again (each step is idempotent).  A
    killed capture's watchdog does the same whatever this got to.

    The named fds are not closed (``named_fds=False``): QEMU took both, ``migrate
    fd:NAME`` the migration's and ``nbd-server-start`` the NBD socket (it removes a named
    fd it uses from the monitor's list), and the migration completed and the disks were
    read through that server.  Closing them failed twice per capture, and the first
    error reply imported qemu.qmp (asyncio, ssl: ~50 ms of CPU) beside the round trip
    and the commit.  ``migration_over``: the capture's last ``query-migrate`` said
    ``completed``; the clean-up does not ask twice more.  ``made``: what the capture
    made, undone without being looked for first (see :class:`Made`)."""
    try:
        return clean_domain(
            qmp,
            marker,
            keep_marker=True,
            bitmaps=False,
            named_fds=False,
            migration_over=migration_over,
            made=made,
        )
    except Exception:  # a bug must not be lost, nor kill the capture: the caller redoes it
        log.warning("cleanup on its thread failed; redoing it", exc_info=True)
        return False


def _migration_stats(st: dict[str, Any]) -> dict[str, Any]:
    ram = st.get("ram") or {}
    keep = (
        "transferred",
        "total",
        "duplicate",
        "normal",
        "dirty-sync-count",
        "mbps",
        "pages-per-second",
    )
    return {
        "status": st.get("status"),
        "total_time_ms": st.get("total-time"),
        "downtime_ms": st.get("downtime"),
        "setup_time_ms": st.get("setup-time"),
        "ram": {k: ram[k] for k in keep if k in ram},
    }


def migration_capabilities(qmp: QMP) -> dict[str, bool]:
    """QEMU's migration capabilities, name -> state.  Raises: like :meth:`QMP.execute`."""
    return {
        str(c["capability"]): bool(c["state"]) for c in qmp.execute("query-migrate-capabilities")
    }


def snapshot_supported(
    qmp: QMP, caps: Mapping[str, bool] | None = None, *, keep: bool = False
) -> tuple[bool, str]:
    """Whether QEMU accepts ``background-snapshot`` for this domain (probe, then undo).

    QEMU checks userfaultfd write-protection when the capability is set, so setting it is
    the exact test.  Never changes host settings.  ``caps``: QEMU's capabilities when the
    caller has asked already (:func:`migration_capabilities`).  ``keep``: a probe that
    succeeded leaves the capability set (the caller captures in snapshot mode and has
    recorded how to put it back).
    """
    if caps is None:
        try:
            caps = migration_capabilities(qmp)
        except HypervisorError as e:
            return False, str(e)
    if "background-snapshot" not in caps:
        return False, "this QEMU has no background-snapshot capability"
    if caps.get("background-snapshot"):
        return True, ""
    try:
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": True}]},
        )
    except QMPCommandError as e:
        return False, str(e.fields.get("desc") or e)
    if keep:
        return True, ""
    with contextlib.suppress(HypervisorError):
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "background-snapshot", "state": False}]},
        )
    return True, ""


__all__ = [
    "DEFAULT_URI",
    "CaptureOptions",
    "CaptureResult",
    "CaptureState",
    "DiskResult",
    "Mode",
    "StreamRefusedError",
    "UsageError",
    "VmarchiveError",
    "capture",
    "snapshot_supported",
]
