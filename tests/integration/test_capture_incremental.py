"""Incremental captures against a real guest: exact at every generation, self-contained, and
falling back to a full read (with a reason) whenever the dirty bitmap cannot be trusted.

One guest for the module (TCG boots are slow): qcow2 vda (tick block), qcow2 vdb under the
seeded random writer, raw vdc (its bitmap cannot be persistent).

The reference for vdb at an archive's instant is the seeded writer's model: the writer
writes blocks one at a time, so the disk at any instant holds exactly its first K blocks;
K is read from the archived disk (the newest block always survives) and must agree with
the workload counter found in the archived RAM.  A missed dirty block shows up as an older
block (or a zero one) where the model wants the newer one.  vda must be all zeros except
the tick block, whose counter must agree with the RAM counter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import libvirt
import pytest

import vmarchive.ops.capture as capture_mod
from vmarchive.errors import QMPCommandError
from vmarchive.hypervisor.blockinfo import list_disks
from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops.capture import CaptureOptions, CaptureResult, Mode, capture, snapshot_supported
from vmarchive.ops.capture_incr import repository_tag
from vmarchive.ops.export import DiskFormat, ExportDiskOptions, export_disk
from vmarchive.ops.repo import RepoRef
from vmarchive.store import GcOptions, Repository
from vmarchive.store.codecs import InitOptions

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

SEED = guestlib.TWO_DISK_WRITER_SEED
WB = 2  # writer blocks per tick
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def guest(module_guest_factory: guestlib.GuestFactory) -> guestlib.Guest:
    spec = guestlib.GuestSpec(
        memory_mib=128,
        disks=(
            guestlib.DiskSpec(size_mib=16),
            guestlib.DiskSpec(size_mib=32),
            guestlib.DiskSpec(fmt="raw", size_mib=8),
        ),
        params={"tick_ms": 200, "writer": SEED, "writer_blocks": WB},
    )
    g = module_guest_factory(spec)
    g.wait_ticks(2)
    return g


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("incr")
    repo = base / "repo"
    Repository.init(str(repo), InitOptions()).close()
    state = base / "state"
    state.mkdir()
    return {"repo": repo, "state": state, "base": base}


def opts(g: guestlib.Guest, env: dict[str, pathlib.Path], **kw: object) -> CaptureOptions:
    return CaptureOptions(
        domain=g.name,
        repo=str(env["repo"]),
        uri=guestlib.URI,
        state_dir=env["state"],
        parse_memory=True,
        **kw,  # type: ignore[arg-type]
    )


def qmp_of(g: guestlib.Guest) -> tuple[Connection, QMP]:
    c = Connection.open(guestlib.URI)
    return c, QMP(c.lookup(g.name))


def our_bitmaps(g: guestlib.Guest) -> dict[str, list[dict[str, object]]]:
    c, q = qmp_of(g)
    with c:
        out: dict[str, list[dict[str, object]]] = {}
        for b in q.execute("query-block"):
            ins = b.get("inserted") or {}
            dev = str(b.get("qdev") or b.get("device"))
            out[dev] = [
                x for x in ins.get("dirty-bitmaps", []) if str(x["name"]).startswith("vmarchive-")
            ]
        return out


def ram_counter(repo: Repository, aid: str, boot: str) -> guestlib.CounterPage:
    archive = repo.load_archive(aid)
    chunks = (
        data
        for s in archive.streams
        if s.kind == "ram"
        for _off, data in repo.open_stream(archive, s.name).iter_chunks()
    )
    found = guestlib.counter_pages_in(chunks, boot)
    assert len(found) == 1, found
    return found[0]


def export(env: dict[str, pathlib.Path], aid: str, target: str, out: pathlib.Path) -> pathlib.Path:
    export_disk(
        ExportDiskOptions(
            repo=RepoRef(str(env["repo"])),
            archive=aid,
            target=target,
            output=out,
            format=DiskFormat.RAW,
            force=True,
        )
    )
    return out


def qemu_img_identical(a: pathlib.Path, b: pathlib.Path) -> bool:
    p = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True,
        text=True,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.returncode == 0


def writer_reference(data: bytes) -> tuple[int, bytes]:
    """(K, the model's disk after K writer blocks) for an exported vdb image."""
    nblocks = len(data) // guestlib.PAGE
    top = -1
    for b in range(nblocks):
        blk = data[b * guestlib.PAGE : (b + 1) * guestlib.PAGE]
        if blk[:16] == guestlib.WRITER_MAGIC:
            top = max(top, int.from_bytes(blk[24:32], "little"))
    k = top + 1
    ref = bytearray(len(data))
    for b, idx in guestlib.expected_writer_blocks(SEED, k, nblocks).items():
        ref[b * guestlib.PAGE : (b + 1) * guestlib.PAGE] = guestlib.writer_block(SEED, idx)
    return k, bytes(ref)


def vda_reference(data: bytes, boot: str) -> tuple[int, bytes]:
    tick = guestlib.parse_tick_block(data[guestlib.TICK_OFFSET : guestlib.TICK_OFFSET + 40])
    assert tick is not None and tick.boot_id == boot
    ref = bytearray(len(data))
    ref[guestlib.TICK_OFFSET : guestlib.TICK_OFFSET + guestlib.PAGE] = data[
        guestlib.TICK_OFFSET : guestlib.TICK_OFFSET + guestlib.PAGE
    ]
    return tick.counter, bytes(ref)


def check_archive(g: guestlib.Guest, env: dict[str, pathlib.Path], aid: str, tag: str) -> list[str]:
    """Problems of archive ``aid`` against the references at its instant (empty: exact).
    Keeps the references as ``ref-<tag>-<target>.raw`` for later comparisons."""
    assert g.boot_id is not None
    problems: list[str] = []
    with Repository.open(str(env["repo"])) as repo:
        cp = ram_counter(repo, aid, g.boot_id)
    vdb = export(env, aid, "vdb", env["base"] / f"exp-{tag}-vdb.raw")
    k, ref = writer_reference(vdb.read_bytes())
    ref_path = env["base"] / f"ref-{tag}-vdb.raw"
    ref_path.write_bytes(ref)
    if not qemu_img_identical(vdb, ref_path):
        problems.append(f"vdb differs from the writer model after {k} blocks")
    c = cp.counter
    if not (c - 1) * WB <= k <= c * WB:
        problems.append(f"vdb holds {k} writer blocks, RAM counter {c} wants {(c - 1) * WB}..")
    vda = export(env, aid, "vda", env["base"] / f"exp-{tag}-vda.raw")
    n, ref = vda_reference(vda.read_bytes(), g.boot_id)
    ref_path = env["base"] / f"ref-{tag}-vda.raw"
    ref_path.write_bytes(ref)
    if not qemu_img_identical(vda, ref_path):
        problems.append("vda differs from zeros + tick block")
    if n not in (cp.last_written, cp.last_written + 1):
        problems.append(f"vda tick {n} vs RAM {cp.last_written}")
    return problems


def memory_roundtrip(env: dict[str, pathlib.Path], aid: str) -> dict[str, Any]:
    with Repository.open(str(env["repo"])) as repo:
        rt: dict[str, Any] = repo.load_archive(aid).metadata["memory"]["roundtrip"]
    assert rt["ok"], rt
    return rt


def disk(r: CaptureResult, target: str) -> dict[str, Any]:
    (d,) = [x for x in r.disks if x.target == target]
    return d.to_json()


def modes(g: guestlib.Guest) -> list[Mode]:
    c, q = qmp_of(g)
    with c:
        ok, _why = snapshot_supported(q)
    # snapshot first where it works: the first generation, without a parent, then checks
    # its RAM slots as it stores them
    return [Mode.SNAPSHOT, Mode.SWITCHOVER] if ok else [Mode.SWITCHOVER]


# --- tests ----------------------------------------------------------------------------------

GENERATIONS = 10


def test_generations_exact_and_self_contained(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    ms = modes(guest)
    ids: list[str] = []
    for i in range(GENERATIONS):
        guest.wait_ticks(2, since=guest.serial.mark())
        r = capture(opts(guest, env, mode=ms[i % len(ms)]))
        ids.append(r.id)
        vdb = disk(r, "vdb")
        if i == 0:
            assert r.parent is None and not vdb["incremental"]
            assert "no earlier archive" in str(vdb["fallback_reason"])
        else:
            assert r.parent == ids[i - 1], (i, r.parent)
            for t in ("vda", "vdb", "vdc"):
                d = disk(r, t)
                assert d["incremental"] and d["fallback_reason"] is None, d
            assert 0 < int(vdb["bytes_read"]) < int(vdb["size"]) // 2, vdb
            assert int(vdb["bytes_referenced"]) > 0
        # RAM slots unchanged since the parent are vouched for by its round trip; the
        # ticking guest changes some, which are checked: as they are stored in a
        # background snapshot (new chunks, most of them), read back otherwise
        rt = memory_roundtrip(env, r.id)
        if i == 0:
            assert rt["slots_from_parent"] == 0 and rt["parent"] is None, rt
        else:
            assert rt["slots_from_parent"] > 0 and rt["parent"] == ids[i - 1], rt
        assert (rt["slots_checked_live"] > 0) == (r.mode == "snapshot"), (r.mode, rt)
        if i == 0 and r.mode == "snapshot":
            # most of QEMU's pages came in groups of records, which the regenerator
            # writes again byte for byte
            assert rt["slots_checked_by_records"] > rt["slots_checked_live"] // 2, rt
        assert rt["slots_checked"] > 0, rt
        assert check_archive(guest, env, r.id, str(i)) == [], (i, r.mode)
    # The bitmap started by the newest archive is the only one left on each disk.
    for dev, bms in our_bitmaps(guest).items():
        assert len(bms) == 1 and bms[0]["recording"], (dev, bms)

    # Forget the middle five and collect their garbage: the others stay exact.
    with Repository.open(str(env["repo"])) as repo:
        repo.forget(ids[2:7])
        repo.gc(GcOptions(grace=0))
    for i in (0, 1, 7, 8, 9):
        for t in ("vda", "vdb"):
            out = export(env, ids[i], t, env["base"] / f"again-{i}-{t}.raw")
            assert qemu_img_identical(out, env["base"] / f"ref-{i}-{t}.raw"), (i, t)
    with Repository.open(str(env["repo"])) as repo:
        rep = repo.verify(full=True)
        assert rep.ok, rep.problems


def _fallback_then_incremental(
    guest: guestlib.Guest,
    env: dict[str, pathlib.Path],
    targets: tuple[str, ...],
    reason: str,
    **kw: object,
) -> None:
    guest.wait_ticks(1, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER, **kw))
    for t in targets:
        d = disk(r, t)
        assert not d["incremental"] and reason in str(d["fallback_reason"]), d
        assert int(d["bytes_referenced"]) == 0
    assert check_archive(guest, env, r.id, "fb") == []
    with Repository.open(str(env["repo"])) as repo:
        meta = repo.load_archive(r.id).metadata
    assert any(reason in str(x.get("fallback_reason")) for x in meta["disks"])
    guest.wait_ticks(1, since=guest.serial.mark())
    r2 = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert r2.parent == r.id
    for t in ("vda", "vdb", "vdc"):
        d = disk(r2, t)
        assert d["incremental"] and d["fallback_reason"] is None, d
    assert check_archive(guest, env, r2.id, "fb2") == []
    # re-armed: only the bitmap the newest archive started is left on each disk
    for dev, bms in our_bitmaps(guest).items():
        assert len(bms) == 1 and bms[0]["recording"], (dev, bms)


def test_full_forced(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    _fallback_then_incremental(guest, env, ("vda", "vdb", "vdc"), "--full", full=True)
    with Repository.open(str(env["repo"])) as repo:
        forced, after = [a.id for a in repo.list_archives()][-2:]
    # --full reads the memory back whole too; the capture after it takes slots again
    assert memory_roundtrip(env, forced)["slots_from_parent"] == 0
    assert memory_roundtrip(env, after)["slots_from_parent"] > 0


@pytest.mark.parametrize("threshold", [1, 1 << 50], ids=["process", "threads"])
def test_incremental_reads_past_the_threshold_go_to_a_process(
    guest: guestlib.Guest,
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    threshold: int,
) -> None:
    """Incremental reads whose bitmaps mark PROCESS_MIN_READ bytes or more (here: any
    write, or none at all) are read by the disk reader process; the archive is exact either
    way.  The only test of read_disk_incremental in that process: a capture with every
    disk incremental reads on threads unless the writes reach the threshold."""
    monkeypatch.setattr(capture_mod, "PROCESS_MIN_READ", threshold)
    caplog.set_level(logging.DEBUG, logger="vmarchive.ops.capture")
    guest.wait_ticks(2, since=guest.serial.mark())  # vdb's writer dirties it meanwhile
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    for t in ("vda", "vdb", "vdc"):
        d = disk(r, t)
        assert d["incremental"] and d["fallback_reason"] is None, d
    assert int(disk(r, "vdb")["bytes_read"]) > 0
    by_process = any("read by a process of their own" in m for m in caplog.messages)
    assert by_process == (threshold == 1), caplog.messages
    assert check_archive(guest, env, r.id, f"threshold-{threshold}") == []


def test_bitmap_removed_by_another_tool(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    c, q = qmp_of(guest)
    with c:
        (vdb,) = [d for d in list_disks(q, guest.dom.XMLDesc()) if d.target == "vdb"]
        assert vdb.node_name is not None
        (bm,) = our_bitmaps(guest)[str(vdb.qdev)]
        q.execute("block-dirty-bitmap-remove", {"node": vdb.node_name, "name": bm["name"]})
    _fallback_then_incremental(guest, env, ("vdb",), "is missing")


def test_bitmaps_created_by_another_tool(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    """Another tool's bitmaps do not touch ours: still incremental and exact; one named in
    our namespace (not started by an archive) goes with the old ones, any other stays."""
    stray, theirs = "vmarchive-0123456789abcdef", "othertool-checkpoint"
    c, q = qmp_of(guest)
    with c:
        (vdb,) = [d for d in list_disks(q, guest.dom.XMLDesc()) if d.target == "vdb"]
        node = vdb.node_name
        assert node is not None
        for name in (stray, theirs):
            q.execute("block-dirty-bitmap-add", {"node": node, "name": name, "persistent": True})
    try:
        guest.wait_ticks(1, since=guest.serial.mark())
        r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
        d = disk(r, "vdb")
        assert d["incremental"] and d["fallback_reason"] is None, d
        assert check_archive(guest, env, r.id, "others") == []
        (ours,) = our_bitmaps(guest)[str(vdb.qdev)]
        assert ours["name"] != stray and ours["recording"], ours
        c, q = qmp_of(guest)
        with c:
            names = [
                bm["name"]
                for dev in q.execute("query-block")
                for bm in (dev.get("inserted") or {}).get("dirty-bitmaps", [])
            ]
        assert theirs in names and stray not in names, names
    finally:
        c, q = qmp_of(guest)
        with c:
            for name in (stray, theirs):
                with contextlib.suppress(QMPCommandError):
                    q.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


def test_parent_forgotten(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    with Repository.open(str(env["repo"])) as repo:
        newest = repo.list_archives()[-1].id
        repo.forget([newest])
    _fallback_then_incremental(guest, env, ("vda", "vdb", "vdc"), "not in this repository")


def test_interrupted_capture(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    p = subprocess.run(
        [
            *(sys.executable, "-m", "vmarchive", "capture", guest.name),
            *("--repo", str(env["repo"]), "--mode", "switchover", "--json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "VMARCHIVE_STATE_DIR": str(env["state"]),
            "VMARCHIVE_CRASH_AT": "capture-reading:1",
        },
        timeout=300,
    )
    assert p.returncode == -9, p.stderr
    _fallback_then_incremental(guest, env, ("vda", "vdb", "vdc"), "interrupted capture")


def test_host_changed(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setattr(socket, "gethostname", lambda: "elsewhere")
        r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
        assert all("restored elsewhere" in str(d.fallback_reason) for d in r.disks), r.disks
    # back on this host: the archive above (host "elsewhere") is the parent again
    _fallback_then_incremental(guest, env, ("vdb",), "restored elsewhere")


def test_disk_resized(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    guest.dom.blockResize("vdc", 12 * MIB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    guest.wait_ticks(1, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    d = disk(r, "vdc")
    assert not d["incremental"] and "resized" in str(d["fallback_reason"]), d
    assert disk(r, "vdb")["incremental"]
    r2 = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r2.disks), r2.disks


def test_qemu_restart_keeps_persistent_bitmaps_only(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    saved = env["base"] / "save.img"
    guest.save(saved)
    guest.restore(saved)
    saved.unlink()
    guest.wait_ticks(2, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    d = disk(r, "vdc")
    assert not d["incremental"] and "QEMU was restarted" in str(d["fallback_reason"]), d
    # qcow2 bitmaps are persistent: they survived the new QEMU process
    assert disk(r, "vda")["incremental"] and disk(r, "vdb")["incremental"]
    assert check_archive(guest, env, r.id, "restart") == []
    r2 = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r2.disks), r2.disks


def test_paused_guest_incremental(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], caplog: pytest.LogCaptureFixture
) -> None:
    guest.wait_ticks(1, since=guest.serial.mark())
    guest.dom.suspend()
    try:
        with caplog.at_level(logging.INFO, logger="vmarchive"):
            r = capture(opts(guest, env, mode=Mode.AUTO))
        assert r.mode == "paused"
        # The old bitmaps wait for the running guest: on the migrated (inactive) qcow2
        # nodes QEMU has put them away and refuses their removal, one warning per disk.
        warned = [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
        assert not [m for m in warned if "bitmap" in m], warned
        assert "old dirty bitmaps kept until the guest runs again (postmigrate)" in caplog.text
        assert all(x.incremental for x in r.disks), r.disks
        assert check_archive(guest, env, r.id, "paused") == []
    finally:
        guest.dom.resume()
    guest.wait_ticks(2, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r.disks), r.disks
    assert check_archive(guest, env, r.id, "after-paused") == []
    for dev, bms in our_bitmaps(guest).items():
        assert len(bms) == 1 and bms[0]["recording"], (dev, bms)


def test_disk_replaced(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    """virsh blockcopy --pivot onto a new image: the source path changes."""
    new = guest.workdir / "vdc-copy.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(new), "12M"], check=True)
    os.chmod(new, 0o666)
    dest = f"<disk type='file'><driver type='raw'/><source file='{new}'/></disk>"
    guest.dom.blockCopy("vdc", dest, flags=libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT)
    guest.wait_for(
        "blockcopy ready",
        lambda: (
            (lambda i: i and i["cur"] == i["end"] and i["end"] > 0)(guest.dom.blockJobInfo("vdc"))
            or None
        ),
        60,
    )
    guest.dom.blockJobAbort("vdc", libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    guest.wait_ticks(1, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    d = disk(r, "vdc")
    assert not d["incremental"] and "replaced" in str(d["fallback_reason"]), d
    assert disk(r, "vdb")["incremental"]
    r2 = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r2.disks), r2.disks


def test_bitmap_export_refused_reads_in_full(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should QEMU refuse to export the frozen bitmap (e.g. not found below a fleecing node),
    the capture still succeeds with a full read, and the next one is incremental."""
    real = capture_mod._Capture._export

    def refuse(self: Any, qmp: QMP, d: Any, node: str, bitmap: str | None = None) -> str:
        if bitmap is not None and d.target == "vdb":
            raise QMPCommandError("Bitmap not found (test)", command="block-export-add")
        return real(self, qmp, d, node, bitmap)

    with monkeypatch.context() as m:
        m.setattr(capture_mod._Capture, "_export", refuse)
        r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    d = disk(r, "vdb")
    assert not d["incremental"] and "could not export bitmap" in str(d["fallback_reason"]), d
    assert disk(r, "vda")["incremental"]
    assert check_archive(guest, env, r.id, "refused") == []
    r2 = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r2.disks), r2.disks


def test_negative_control_bitmap_started_after_commit(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the new bitmap after the overlay commit (not in the instant's transaction)
    loses the writes made during the overlay's life: the check above must see it.  The
    capture is held while reading until the guest has written (a capture shorter than a
    writer tick could lose nothing, and the control would prove nothing: seen once)."""
    held_at_reading(guest, env, monkeypatch, mode=Mode.SWITCHOVER, late_bitmap=True)
    guest.wait_ticks(2, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert disk(r, "vdb")["incremental"]
    problems = check_archive(guest, env, r.id, "neg")
    assert any("vdb differs" in p for p in problems), problems
    # a forced full read repairs the chain
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER, full=True))
    assert check_archive(guest, env, r.id, "neg-full") == []


# --- snapshot mode (background-snapshot + fleecing): the guest writes during the read ---

READING = "capture-reading"


def _require_snapshot(g: guestlib.Guest) -> None:
    if Mode.SNAPSHOT not in modes(g):
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            uffd = f.read().strip()
        if uffd != "1":
            pytest.skip("snapshot mode needs sysctl vm.unprivileged_userfaultfd=1 (CI sets it)")
        pytest.fail("snapshot mode unavailable although vm.unprivileged_userfaultfd=1")


def held_at_reading(
    g: guestlib.Guest,
    env: dict[str, pathlib.Path],
    monkeypatch: pytest.MonkeyPatch,
    ticks: int = 2,
    mode: Mode = Mode.SNAPSHOT,
    **kw: object,
) -> CaptureResult:
    """A capture held once its disk reads have started, until the guest has ticked
    ``ticks`` more times: the writer writes vdb (and the tick block vda) while the
    fleecing view (snapshot mode) or the overlay (switchover mode) is being read and
    while the new bitmap is the recording one."""
    box: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="vmatest-hold") as d:
        hold = pathlib.Path(d)
        with monkeypatch.context() as m:
            m.setenv("VMARCHIVE_HOLD_AT", f"{READING}:{hold}")

            def run() -> None:
                try:
                    box["r"] = capture(opts(g, env, mode=mode, **kw))
                except BaseException as e:  # re-raised below
                    box["e"] = e

            t = threading.Thread(target=run)
            t.start()
            try:
                while not (hold / f"{READING}.reached").exists() and t.is_alive():
                    time.sleep(0.01)
                reached = (hold / f"{READING}.reached").exists()
                if reached:
                    g.wait_ticks(ticks, since=g.serial.mark())
            finally:
                (hold / f"{READING}.release").touch()
                t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    assert reached, f"the capture never reached {READING}"
    r = box["r"]
    assert isinstance(r, CaptureResult)
    assert r.mode == mode.value, r.mode
    return r


def test_snapshot_mode_generations_exact(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three snapshot-mode generations, each read while the guest writes: every archive is
    the disks at its instant, every generation after the first is incremental, and so is
    the switchover-mode capture that follows."""
    _require_snapshot(guest)
    ids: list[str] = []
    for i in range(4):
        guest.wait_ticks(1, since=guest.serial.mark())
        r = held_at_reading(guest, env, monkeypatch)
        if i > 0:
            assert r.parent == ids[-1], (i, r.parent, ids)
            for t in ("vda", "vdb", "vdc"):
                d = disk(r, t)
                assert d["incremental"] and d["fallback_reason"] is None, (i, d)
            vdb = disk(r, "vdb")
            assert 0 < int(vdb["bytes_read"]) < int(vdb["size"]) // 2, vdb
        ids.append(r.id)
        assert check_archive(guest, env, r.id, f"snap{i}") == [], i
    guest.wait_ticks(1, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert r.parent == ids[-1]
    assert all(x.incremental and x.fallback_reason is None for x in r.disks), r.disks
    assert check_archive(guest, env, r.id, "after-snap") == []
    for dev, bms in our_bitmaps(guest).items():
        assert len(bms) == 1 and bms[0]["recording"], (dev, bms)


def test_snapshot_mode_negative_control_bitmap_started_late(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting the new bitmap only after the capture (not in the instant's transaction)
    loses the writes the guest made while the fleecing view was read: seen by the check."""
    _require_snapshot(guest)
    held_at_reading(guest, env, monkeypatch, late_bitmap=True)
    guest.wait_ticks(1, since=guest.serial.mark())
    r = capture(opts(guest, env, mode=Mode.SNAPSHOT))
    assert disk(r, "vdb")["incremental"]
    problems = check_archive(guest, env, r.id, "snap-neg")
    assert any("vdb differs" in p for p in problems), problems
    r = capture(opts(guest, env, mode=Mode.SNAPSHOT, full=True))
    assert check_archive(guest, env, r.id, "snap-neg-full") == []


def _cli(env: dict[str, pathlib.Path], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmarchive", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "VMARCHIVE_STATE_DIR": str(env["state"])},
        timeout=300,
    )


def test_cli_json_info_and_untrack(guest: guestlib.Guest, env: dict[str, pathlib.Path]) -> None:
    repo = str(env["repo"])
    p = _cli(env, "capture", guest.name, "--repo", repo, "--mode", "switchover", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["parent"]
    for d in out["disks"]:
        keys = ("target", "bytes_read", "bytes_referenced", "bytes_stored", "incremental")
        assert all(k in d for k in keys) and "fallback_reason" in d, d
        assert d["incremental"] is True and d["fallback_reason"] is None
    info = _cli(env, "info", out["id"], "--repo", repo)
    assert (
        info.returncode == 0 and out["parent"] in info.stdout and "bytes_referenced" in info.stdout
    )

    u = _cli(env, "untrack", guest.name)
    assert u.returncode == 0 and u.stdout.count("removed vmarchive-") == 3, u.stdout + u.stderr
    assert all(v == [] for v in our_bitmaps(guest).values())
    p = _cli(env, "capture", guest.name, "--repo", repo, "--mode", "switchover")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("full read because bitmap") == 3, p.stdout
    assert "removed by another tool" in p.stdout
    p = _cli(env, "capture", guest.name, "--repo", repo, "--mode", "switchover", "--json")
    assert all(d["incremental"] for d in json.loads(p.stdout)["disks"]), p.stdout


def started_by(env: dict[str, pathlib.Path], aid: str) -> set[str]:
    """The bitmaps archive ``aid`` started (one per copied disk)."""
    with Repository.open(str(env["repo"])) as repo:
        tracking = repo.load_archive(aid).metadata["tracking"]
    return {str(t["bitmap"]) for t in tracking.values()}


def bitmap_names(g: guestlib.Guest) -> set[str]:
    return {str(b["name"]) for bms in our_bitmaps(g).values() for b in bms}


def test_two_repositories_stay_incremental(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    """One domain captured into two repositories in turn (a local and an offsite one, say):
    each keeps a bitmap of its own on every disk, so each capture after a repository's
    first is incremental against that repository's previous archive, and exact.  Forgetting
    one repository's last archive removes its bitmaps only; the other stays incremental."""
    second = env["base"] / "repo-second"
    Repository.init(str(second), InitOptions()).close()
    env2 = {**env, "repo": second}
    ms = modes(guest)
    # the module's repository, in whatever state the tests before left it
    warm = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    last: dict[pathlib.Path, str | None] = {env["repo"]: warm.id, second: None}
    for i, e in enumerate((env2, env, env2, env)):
        guest.wait_ticks(1, since=guest.serial.mark())
        r = capture(opts(guest, e, mode=ms[i % len(ms)]))
        for t in ("vda", "vdb", "vdc"):
            d = disk(r, t)
            if i == 0:  # the second repository's first: the first's bitmaps are not stray
                assert not d["incremental"], d
                assert "no earlier archive" in str(d["fallback_reason"]), d
            else:
                assert d["incremental"] and d["fallback_reason"] is None, (i, d)
        if i > 0:
            assert r.parent is not None and r.parent == last[e["repo"]], (i, r.parent)
            assert int(disk(r, "vdb")["bytes_read"]) < int(disk(r, "vdb")["size"]) // 2
        last[e["repo"]] = r.id
        assert check_archive(guest, e, r.id, f"two-{i}") == [], (i, r.mode)
        # each repository's newest archive's bitmaps, recording, and nothing else of ours
        newest = {n for x, aid in last.items() if aid for n in started_by({"repo": x}, aid)}
        assert bitmap_names(guest) == newest, i
        assert all(b["recording"] for bms in our_bitmaps(guest).values() for b in bms)

    with Repository.open(str(second)) as repo:
        ids = [a.id for a in repo.list_archives()]
        stray = f"vmarchive-{repository_tag(repo.codecs.config.repository_id)}-0123456789abcdef"
    theirs, mine = started_by(env2, ids[-1]), started_by(env, str(last[env["repo"]]))
    # strays: the second repository's (an interrupted capture's), and an untagged one
    untagged = "vmarchive-0123456789abcdef"
    c, q = qmp_of(guest)
    with c:
        (vdb,) = [d for d in list_disks(q, guest.dom.XMLDesc()) if d.target == "vdb"]
        for name in (stray, untagged):
            args = {"node": vdb.node_name, "name": name, "persistent": True}
            q.execute("block-dirty-bitmap-add", args)
    p = _cli(env2, "forget", *ids, "--repo", str(second), "--json")
    assert p.returncode == 0, p.stderr
    (rel,) = json.loads(p.stdout)["untracked"]
    assert {n for _node, n in rel["removed"]} == theirs | {stray}, rel
    assert {n for _node, n in rel["left"]} == mine | {untagged}, rel  # reported, kept
    assert bitmap_names(guest) == mine | {untagged}, rel
    r = capture(opts(guest, env, mode=Mode.SWITCHOVER))
    assert all(x.incremental for x in r.disks) and r.parent == last[env["repo"]], r.disks
    assert bitmap_names(guest) == started_by(env, r.id)  # untagged: any repository's stray


def test_forget_last_archive_removes_its_bitmaps(
    guest: guestlib.Guest, env: dict[str, pathlib.Path]
) -> None:
    """Forgetting a domain's last archive removes the bitmaps its archives started; with one
    archive left they stay (negative control); unreachable, one line says what to run.  The
    module's repository's bitmaps, another repository's here, stay throughout."""
    with Repository.open(str(env["repo"])) as repo:
        first = started_by(env, repo.list_archives()[-1].id)
    other = env["base"] / "repo-forget"
    Repository.init(str(other), InitOptions()).close()
    env2 = {**env, "repo": other}
    ids = [capture(opts(guest, env2, mode=Mode.SWITCHOVER)).id for _ in range(2)]
    started = started_by(env2, ids[-1])
    assert bitmap_names(guest) == started | first

    p = _cli(env2, "forget", ids[0], "--repo", str(other))
    assert p.returncode == 0 and "removed" not in p.stdout, p.stdout + p.stderr
    assert bitmap_names(guest) == started | first

    p = _cli(env2, "forget", ids[1], "--repo", str(other), "--json")
    assert p.returncode == 0, p.stderr
    (rel,) = json.loads(p.stdout)["untracked"]
    assert {name for _node, name in rel["removed"]} == started and rel["advice"] is None, rel
    assert bitmap_names(guest) == first

    # Not reachable on the given connection (libvirt's test driver knows no such domain).
    aid = capture(opts(guest, env2, mode=Mode.SWITCHOVER)).id
    started = started_by(env2, aid)
    p = _cli(env2, "forget", aid, "--repo", str(other), "--connect", "test:///default")
    assert p.returncode == 0, p.stderr
    assert f"run `vmarchive untrack {guest.name}`" in p.stdout, p.stdout
    assert bitmap_names(guest) == started | first
    assert _cli(env2, "untrack", guest.name).returncode == 0
    assert bitmap_names(guest) == set()


def image_bitmaps(path: pathlib.Path) -> list[str]:
    p = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = (json.loads(p.stdout).get("format-specific") or {}).get("data") or {}
    return [str(b["name"]) for b in data.get("bitmaps") or []]


def test_forget_last_archive_of_a_shut_off_domain(
    two_disk_guest: guestlib.Guest, tmp_path: pathlib.Path
) -> None:
    """Shut off (defined, not running): the bitmaps its archives named are removed from its
    qcow2 images; with one archive left they stay (negative control)."""
    g = two_disk_guest
    env = {"repo": tmp_path / "repo", "state": tmp_path / "state", "base": tmp_path}
    Repository.init(str(env["repo"]), InitOptions()).close()
    env["state"].mkdir()
    ids = [capture(opts(g, env, mode=Mode.SWITCHOVER)).id for _ in range(2)]
    uuid = g.dom.UUIDString()
    g.dom.destroy()  # SIGTERM: QEMU stores the persistent bitmaps in the images as it exits
    g.conn.defineXML(g.xml.replace("</name>", f"</name>\n  <uuid>{uuid}</uuid>", 1))
    try:
        with Repository.open(str(env["repo"])) as repo:
            tracking = repo.load_archive(ids[-1]).metadata["tracking"]
        for i, path in enumerate(g.disk_paths):
            assert image_bitmaps(path) == [tracking[f"vd{'ab'[i]}"]["bitmap"]]

        p = _cli(env, "forget", ids[0], "--repo", str(env["repo"]))
        assert p.returncode == 0 and "removed" not in p.stdout, p.stdout + p.stderr
        assert all(image_bitmaps(path) for path in g.disk_paths)

        p = _cli(env, "forget", ids[1], "--repo", str(env["repo"]))
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("removed vmarchive-") == 2, p.stdout
        assert all(image_bitmaps(path) == [] for path in g.disk_paths)
    finally:
        g.destroy()  # undefines the persistent definition
