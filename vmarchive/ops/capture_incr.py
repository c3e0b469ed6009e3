"""Incremental disk captures: vmarchive's QEMU dirty bitmaps and the decision to trust them (ops).

Every copied disk carries one *recording* dirty bitmap named ``vmarchive-<generation>``
on its format node (the node the guest device uses), persistent in qcow2 images (raw
images cannot store bitmaps: there it lives only as long as the QEMU process).  The
archive that started it records its name in ``metadata["tracking"][target]``.

At the next capture, inside the ONE ``transaction`` that fixes the instant, the recording
bitmap is disabled (frozen: it now holds exactly the writes between the parent's instant
and this one) and a new recording bitmap is added.  The disk is then read through an NBD
export of the point-in-time node that also exports the frozen bitmap
(``qemu:dirty-bitmap:NAME``); only slots it marks dirty are read, the others
``set_chunk`` the parent's chunk ids.  The new archive's table therefore lists every chunk
it needs: forgetting any other archive never breaks it.

Why the bitmaps stay exact across the switchover mode's overlay and commit (verified
against QEMU 7.2 by ``tests/integration/test_capture_incremental.py``, which compares
every generation with the seeded writer's model of the disk, and by the negative control
there that starts the new bitmap only after the commit):

* Both bitmaps live on the disk's *format* node, i.e. *under* the temporary overlay.  The
  transaction that adds the overlay also freezes the old bitmap and starts the new one,
  while the vCPUs are stopped and I/O is drained: no guest write can fall between them.
* While the overlay is on top the guest writes only into the overlay; the base (format)
  node is not written, so neither bitmap changes and the frozen image read over NBD is
  exactly the instant.
* ``block-commit`` copies the overlay's data into the base *through the base node*; QEMU
  marks every enabled bitmap of a node for every write that reaches it, whoever issues
  it (guest or block job).  So the new bitmap records every write the guest made during
  the overlay's life (a superset at worst: commit copies whole overlay clusters), and
  after the pivot the guest writes the base directly again.
* Inactivation at migration completion stores persistent bitmaps into the qcow2 file and
  ``cont`` loads them again; nothing writes in between (the guest is stopped).

In snapshot mode the frozen bitmap is found by the NBD export below the fleecing node
(its backing child is the disk's format node); copy-before-write keeps the fleecing view
at the instant while the guest keeps writing into the disk, recorded by the new bitmap.

Whenever the bitmap cannot be trusted :func:`decide` returns a reason: the capture reads
the disk in full (still deduplicated), records the reason, and re-arms tracking with the
new bitmap.  After a committed archive every other bitmap of the disk that this repository
manages is removed.

Bitmap names carry the repository's tag (``vmarchive-<tag>-<generation>``, see
:func:`owned`): a capture never trusts, nor removes, a bitmap another repository started,
so each repository that captures the domain keeps its own bitmap recording since its own
latest archive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from vmarchive.errors import HostPreconditionError, HypervisorError, InterruptedError_
from vmarchive.hypervisor.blockinfo import parse_disks
from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.nbd import (
    BASE_ALLOCATION,
    NBDClient,
    data_ranges,
    dirty_bitmap_context,
)
from vmarchive.hypervisor.qemuproc import LIBVIRT_RUN_DIR, libvirt_pid
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops.capture_cleanup import default_state_dir, domain_lock
from vmarchive.ops.capture_disks import DiskRead, read_pieces
from vmarchive.progress import Progress

log = logging.getLogger(__name__)

BITMAP_PREFIX = "vmarchive-"
#: Format drivers whose images can store a persistent bitmap.
PERSISTENT_FORMATS = frozenset({"qcow2"})
#: ``vmarchive-<repository tag>-<generation>``; untagged names (``vmarchive-<generation>``)
#: were started by archives written before bitmaps carried their repository's tag.
_TAGGED = re.compile(re.escape(BITMAP_PREFIX) + r"([0-9a-f]{8})-[0-9a-f]{16}")


def repository_tag(repository_id: bytes) -> str:
    """The tag of a repository's bitmaps: the first 4 bytes of its id, in hex."""
    return repository_id[:4].hex()


def new_bitmap_name(tag: str, rng: Callable[[int], str] = secrets.token_hex) -> str:
    return f"{BITMAP_PREFIX}{tag}-{rng(8)}"


def owned(name: str, tag: str | None) -> bool:
    """Whether a capture into the repository tagged ``tag`` manages bitmap ``name``: one of
    vmarchive's not tagged for another repository.  Untagged names are any repository's
    (they predate the tags); ``tag`` None: every vmarchive bitmap.

    Each repository keeps a bitmap of its own on the disks it tracks: a domain captured
    into two repositories (a local one and an offsite one) stays incremental in both,
    where one capture retiring the other's bitmap made every capture a full read."""
    if not name.startswith(BITMAP_PREFIX):
        return False
    theirs = _tag_of(name)
    return tag is None or theirs is None or theirs == tag


def _tag_of(name: str) -> str | None:
    """The repository tag in bitmap ``name``; None when it has none (untagged, or not
    named the way vmarchive names its bitmaps)."""
    m = _TAGGED.fullmatch(name)
    return None if m is None else m.group(1)


def releases(name: str, only: Collection[str] | None, tag: str | None) -> bool:
    """Whether :func:`untrack` with ``only`` and ``tag`` removes bitmap ``name``."""
    return only is None or name in only or (tag is not None and _tag_of(name) == tag)


def _stray(name: str, tag: str | None) -> str:
    """Why ``name`` (owned, named by no archive of this repository) cannot be trusted."""
    if tag is not None and _tag_of(name) is not None:
        return f"{name} was started by an archive not in this repository (forgotten)"
    return (
        f"{name} was started by an archive not in this repository (forgotten, or the "
        "domain captured into another repository)"
    )


class BitmapState(msgspec.Struct, frozen=True):
    """One dirty bitmap as QEMU reports it (``dirty-bitmaps`` of a block node)."""

    name: str
    recording: bool
    busy: bool
    persistent: bool
    inconsistent: bool
    granularity: int
    count: int

    @classmethod
    def from_qmp(cls, d: Mapping[str, Any]) -> BitmapState:
        return cls(
            name=str(d.get("name", "")),
            recording=bool(d.get("recording", False)),
            busy=bool(d.get("busy", False)),
            persistent=bool(d.get("persistent", False)),
            inconsistent=bool(d.get("inconsistent", False)),
            granularity=int(d.get("granularity", 0)),
            count=int(d.get("count", 0)),
        )


def node_bitmaps(
    qmp: QMP, named: list[dict[str, Any]] | None = None
) -> dict[str, list[BitmapState]]:
    """node-name -> its dirty bitmaps (every named node).  ``named``: QEMU's answer to
    ``query-named-block-nodes`` (flat) when the caller has just had it."""
    out: dict[str, list[BitmapState]] = {}
    if named is None:
        named = qmp.execute("query-named-block-nodes", {"flat": True})
    for n in named:
        name = str(n.get("node-name", ""))
        out[name] = [BitmapState.from_qmp(b) for b in n.get("dirty-bitmaps") or []]
    return out


class ParentDisk(msgspec.Struct, frozen=True):
    """What the parent archive says about one disk."""

    archive: str
    host: str
    tracking: Mapping[str, Any]  # the parent's metadata["tracking"][target]
    table: bytes
    chunk_size: int
    size: int


class Current(msgspec.Struct, frozen=True):
    """The disk as it is now."""

    target: str
    source: str | None
    virtual_size: int
    host: str
    chunk_size: int
    #: the QEMU process (see :func:`qemu_instance`); None when unknown
    instance: str | None = None


def qemu_instance(domain: str, run_dir: Path = LIBVIRT_RUN_DIR) -> str | None:
    """``pid:start time`` of the domain's QEMU process (changes when QEMU restarts)."""
    pid = libvirt_pid(domain, run_dir)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, ValueError, IndexError):
        return None


def decide(
    parent: ParentDisk | None,
    now: Current,
    bitmaps: Iterable[BitmapState],
    known: Mapping[str, str],
    *,
    full: bool = False,
    tag: str | None = None,
) -> str | None:
    """None when the parent's bitmap can be trusted for ``now``, else why not (one line).

    ``known`` maps every bitmap name recorded by an archive of this domain in the
    repository to that archive's id (to tell "parent forgotten" from "removed").  ``tag``:
    the repository's (:func:`repository_tag`); bitmaps tagged for another repository do
    not count (:func:`owned`).
    """
    ours = {b.name: b for b in bitmaps if owned(b.name, tag)}
    if full:
        return "full read requested (--full)"
    if parent is None:
        stray = [n for n in ours if n not in known]
        if stray:
            return f"bitmap {_stray(stray[0], tag)}"
        return "no earlier archive of this disk to be incremental against"
    t = parent.tracking
    name = str(t.get("bitmap") or "")
    if not name:
        return f"parent archive {parent.archive[:12]} has no dirty tracking for this disk"
    if parent.host != now.host:
        return (
            f"domain was captured on host {parent.host!r}, now on {now.host!r} "
            "(migrated or restored elsewhere)"
        )
    if int(t.get("virtual_size", -1)) != now.virtual_size or parent.size != now.virtual_size:
        return (
            f"disk resized ({int(t.get('virtual_size', parent.size))} -> {now.virtual_size} bytes)"
        )
    if t.get("source") != now.source:
        return f"disk replaced (source {t.get('source')!r} -> {now.source!r})"
    if parent.chunk_size != now.chunk_size:
        return "parent archive used another chunk size"
    b = ours.get(name)
    if b is None:
        newer = [n for n in ours if n not in known]
        if newer:
            return f"bitmap {name} is gone and {_stray(newer[0], tag)}"
        restarted = now.instance is None or t.get("qemu") != now.instance
        if not t.get("persistent", False) and restarted:
            return (
                f"bitmap {name} is gone (non-persistent bitmap of a "
                f"{t.get('format') or 'raw'} disk: QEMU was restarted)"
            )
        return f"bitmap {name} is missing (removed by another tool or the image replaced)"
    if b.inconsistent:
        return f"bitmap {name} is marked inconsistent (QEMU stopped without saving it)"
    if not b.recording:
        return f"bitmap {name} is not recording (left frozen by an interrupted capture)"
    if b.busy:
        return f"bitmap {name} is in use by another job"
    if b.granularity <= 0 or b.persistent != bool(t.get("persistent", False)):
        return f"bitmap {name} does not match what the parent archive recorded"
    # Other bitmaps of ours (a capture killed after its commit left the frozen one) do
    # not matter: this one has recorded every write since the parent's instant.
    return None


class DiskPlan(msgspec.Struct, frozen=True):
    """How one disk is captured: the bitmap to start, and the frozen one to read with."""

    target: str
    node: str
    new_bitmap: str
    persistent: bool
    #: the parent's bitmap, frozen at the instant and read; None: full read.
    since_bitmap: str | None
    parent: ParentDisk | None
    fallback_reason: str | None
    #: names of our other bitmaps on the node (removed after a committed archive).
    stale: tuple[str, ...]
    #: bytes ``since_bitmap`` marked dirty when the capture was planned (QEMU's count;
    #: it grows until the instant): about what an incremental read will read.
    dirty_bytes: int = 0

    @property
    def incremental_read(self) -> tuple[str, bytes] | None:
        """What an incremental read of the disk needs: the frozen bitmap and the parent's
        slot table; None: the disk is read in full.  Planning sets both or neither."""
        if self.since_bitmap is None or self.parent is None:
            return None
        return self.since_bitmap, self.parent.table

    @property
    def incremental(self) -> bool:
        return self.incremental_read is not None

    def actions(self) -> list[dict[str, Any]]:
        """The transaction actions that freeze the old bitmap and start the new one."""
        acts: list[dict[str, Any]] = [
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": self.node,
                    "name": self.new_bitmap,
                    "persistent": self.persistent,
                },
            }
        ]
        if self.since_bitmap is not None:
            acts.append(
                {
                    "type": "block-dirty-bitmap-disable",
                    "data": {"node": self.node, "name": self.since_bitmap},
                }
            )
        return acts

    def tracking(
        self,
        host: str,
        uuid: str,
        source: str | None,
        size: int,
        fmt: str | None,
        instance: str | None = None,
    ) -> dict[str, Any]:
        return {
            "qemu": instance,
            "bitmap": self.new_bitmap,
            "persistent": self.persistent,
            "node": self.node,
            "host": host,
            "uuid": uuid,
            "source": source,
            "virtual_size": size,
            "format": fmt,
            "since_bitmap": self.since_bitmap,
        }


def remove_bitmaps(qmp: QMP, node: str, names: Iterable[str]) -> bool:
    """Remove our ``names`` from ``node``; failures are logged (the next capture retries)."""
    ok = True
    for n in names:
        if not n.startswith(BITMAP_PREFIX):
            continue
        try:
            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": n})
        except HypervisorError as e:
            log.warning("cannot remove bitmap %s from %s: %s", n, node, e)
            ok = False
    return ok


def read_disk_incremental(
    address: str,
    export: str,
    sink: Any,
    target: str,
    progress: Progress,
    bitmap: str,
    parent_table: bytes,
    *,
    zero_id: bytes,
    parent_chunk: Callable[[bytes], bytes] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    connect_timeout: float = 60.0,
) -> DiskRead:
    """Read only what the frozen ``bitmap`` marks dirty; clean slots refer to the parent's
    chunks (``parent_table``: same size and chunk size).

    A slot dirty only in part (the bitmap's granularity is finer than a chunk) is read
    only there and completed from the parent's chunk (``parent_chunk`` reads it from
    the repository; without it the whole slot is read from the disk).

    Raises:
        NBDError: the export failed (or does not export ``bitmap``).
        InterruptedError_: ``cancelled`` became true.
        ChunkMissingError, DamageError: a parent chunk cannot be read.
    """
    ctx = dirty_bitmap_context(bitmap)
    t0 = time.perf_counter()
    with NBDClient.connect(
        address, export, meta_contexts=(BASE_ALLOCATION, ctx), timeout=connect_timeout
    ) as c:
        size = c.size
        cs = int(sink.chunk_size)
        nslots = -(-size // cs)
        if len(parent_table) != 16 * nslots:
            raise HypervisorError(f"disk {target}: parent slot table does not fit the disk")
        # slot -> dirty (offset, length) runs inside it
        dirty: dict[int, list[tuple[int, int]]] = {}
        for e in c.extents(ctx):
            if not e.dirty:
                continue
            pos = e.offset
            while pos < e.end:
                i = pos // cs
                stop = min(e.end, (i + 1) * cs, size)
                dirty.setdefault(i, []).append((pos, stop - pos))
                pos = stop
        data_slots: set[int] = set()
        for off, n in data_ranges(c.extents(BASE_ALLOCATION), cs, size=size):
            data_slots.update(range(off // cs, -(-(off + n) // cs)))

        def slot_len(i: int) -> int:
            return min(cs, size - i * cs)

        # what to read from the disk: whole slots, or only their dirty runs
        plan: list[tuple[int, list[tuple[int, int]]]] = []
        for i in sorted(dirty):
            if i not in data_slots:
                continue  # all zero now: stays a hole
            runs = dirty[i]
            if parent_chunk is None or sum(n for _o, n in runs) >= slot_len(i):
                runs = [(i * cs, slot_len(i))]
            plan.append((i, runs))
        res = DiskRead(target=target, size=size)
        res.dirty_slots = len(dirty)
        task = progress.task(f"disk {target}", total=sum(n for _i, runs in plan for _o, n in runs))
        t_extents = time.perf_counter() - t0
        t_parent = 0.0
        partial = [
            (i, parent_table[16 * i : 16 * i + 16])
            for i, runs in plan
            if not (len(runs) == 1 and runs[0] == (i * cs, slot_len(i)))
        ]
        parents = _Prefetch(parent_chunk, partial, zero_id, slot_len)
        t_store = 0.0
        try:
            clean = [i for i in range(nslots) if i not in dirty]
            held = sink.set_chunks(parent_table, clean)
            res.bytes_referenced = held * cs
            if clean and clean[-1] == nslots - 1 and parent_table[-16:] != zero_id:
                res.bytes_referenced -= cs - slot_len(nslots - 1)  # the short last slot
            t_refs = time.perf_counter() - t0 - t_extents
            pieces = (r for _i, runs in plan for r in runs)
            with contextlib.closing(read_pieces(c, pieces)) as results:
                for i, runs in plan:
                    buf: bytearray | memoryview
                    if len(runs) == 1 and runs[0] == (i * cs, slot_len(i)):
                        _off, buf = next(results)
                    else:
                        tp = time.perf_counter()
                        buf = bytearray(parents.next(i))
                        t_parent += time.perf_counter() - tp
                        for off, part in (next(results) for _r in runs):
                            buf[off - i * cs : off - i * cs + len(part)] = part
                    if cancelled():
                        raise InterruptedError_(f"reading disk {target} cancelled")
                    n = sum(k for _o, k in runs)
                    ts = time.perf_counter()
                    sink.write_chunk(i, buf, handed_over=True)  # a buffer of its own
                    t_store += time.perf_counter() - ts
                    res.bytes_read += n
                    task.advance(n)
        finally:
            parents.close()
            task.close()
        log.debug(
            "disk %s: %d of %d slots dirty, %d bytes read, %d referenced in %.2f s "
            "(extents %.2f s, references %.2f s, waited %.2f s for the %d parent chunks of "
            "partial slots, storing %.2f s, the rest is NBD reads)",
            target,
            len(dirty),
            nslots,
            res.bytes_read,
            res.bytes_referenced,
            time.perf_counter() - t0,
            t_extents,
            t_refs,
            t_parent,
            len(partial),
            t_store,
        )
        return res


class _Prefetch:
    """The parent chunks of partly dirty slots, read ahead on a few threads in slot order.

    Reading them one by one on the disk's thread was most of an incremental read's time
    (each is a repository read: a pread, or an HTTP range request for s3://, then
    decompression and id verification); ahead of need, they overlap with the NBD reads
    and with each other.  At most ``WINDOW`` chunks are held.

    Eight readers, not four: on a local repository these reads come from the device (packs
    are written around the page cache), which serves more of them at once.  An 8 GiB disk
    with 1 % rewritten in 64 KiB extents (1285 partial slots): the disk's thread waited
    0.25-0.38 s for them against 0.44-0.55 s, the capture 1.19 s median against 1.32 s
    (6 alternating pairs).
    """

    READERS = 8
    WINDOW = 32

    def __init__(
        self,
        read: Callable[[bytes], bytes] | None,
        slots: list[tuple[int, bytes]],
        zero_id: bytes,
        slot_len: Callable[[int], int],
    ) -> None:
        self._read = read
        self._todo = iter(slots)
        self._zero_id = zero_id
        self._slot_len = slot_len
        self._pending: deque[tuple[int, Future[bytes]]] = deque()
        self._pool = (
            ThreadPoolExecutor(self.READERS, thread_name_prefix="vmarchive-parent")
            if slots
            else None
        )
        self._fill()

    def _load(self, i: int, cid: bytes) -> bytes:
        if cid == self._zero_id:
            return bytes(self._slot_len(i))
        assert self._read is not None
        return self._read(cid)

    def _fill(self) -> None:
        assert self._pool is not None or not self._pending
        while self._pool is not None and len(self._pending) < self.WINDOW:
            nxt = next(self._todo, None)
            if nxt is None:
                return
            self._pending.append((nxt[0], self._pool.submit(self._load, *nxt)))

    def next(self, slot: int) -> bytes:
        """The parent chunk of ``slot`` (the slots come in the order given).

        Raises what the read raised: ChunkMissingError, DamageError, BackendError.
        """
        i, fut = self._pending.popleft()
        assert i == slot, (i, slot)
        self._fill()
        return fut.result()

    def close(self) -> None:
        for _i, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class UntrackResult(msgspec.Struct, frozen=True):
    domain: str
    #: (node name or image path, bitmap name) removed
    removed: list[tuple[str, str]]
    #: our bitmaps found but not removed (not in ``only``)
    left: list[tuple[str, str]] = msgspec.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "removed": [list(x) for x in self.removed],
            "left": [list(x) for x in self.left],
        }


def untrack(
    domain: str,
    uri: str,
    state_dir: Path | None = None,
    only: Collection[str] | None = None,
    tag: str | None = None,
) -> UntrackResult:
    """Remove every ``vmarchive-*`` dirty bitmap from ``domain``'s disks (or only those
    named in ``only`` and, with ``tag``, those tagged for that repository: its strays, left
    by captures interrupted before their archive named them; the others are listed in
    ``left``).

    A running domain: through QMP, under the per-domain capture lock (never during a
    capture).  A shut-off domain: from its qcow2 images with ``qemu-img bitmap --remove``.
    The next capture then reads every disk in full and starts tracking again.

    Raises:
        ConnectionFailedError, DomainNotFoundError, LockedError, HypervisorError.
    """
    removed: list[tuple[str, str]] = []
    left: list[tuple[str, str]] = []

    def wanted(where: str, name: str) -> bool:
        if releases(name, only, tag):
            return True
        left.append((where, name))
        return False

    with Connection.open(uri) as conn:
        dom = conn.lookup(domain)
        with domain_lock(state_dir or default_state_dir(), dom.uuid, dom.name):
            if dom.is_active():
                qmp = QMP(dom)
                for node, bms in node_bitmaps(qmp).items():
                    names = [b.name for b in bms if b.name.startswith(BITMAP_PREFIX)]
                    for n in names:
                        if wanted(node, n):
                            qmp.execute("block-dirty-bitmap-remove", {"node": node, "name": n})
                            removed.append((node, n))
            else:
                for d in parse_disks(dom.xml()):
                    if d.format != "qcow2" or d.source is None or d.source_type != "file":
                        continue
                    for n in _image_bitmaps(d.source):
                        if wanted(d.source, n):
                            _run_qemu_img(["bitmap", "--remove", "-f", "qcow2", d.source, n])
                            removed.append((d.source, n))
    return UntrackResult(dom.name, removed, left)


def _run_qemu_img(args: list[str]) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HostPreconditionError("qemu-img is needed to edit the bitmaps of an image")
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise HypervisorError(f"qemu-img {' '.join(args[:2])} failed: {r.stderr.strip()}")
    return r.stdout


def _image_bitmaps(path: str) -> list[str]:
    info = json.loads(_run_qemu_img(["info", "-U", "--output=json", "-f", "qcow2", path]))
    data = (info.get("format-specific") or {}).get("data") or {}
    return [
        str(b["name"])
        for b in data.get("bitmaps") or []
        if str(b.get("name", "")).startswith(BITMAP_PREFIX)
    ]
