"""When a dirty bitmap is trusted for an incremental capture (pure decision, no QEMU)."""

from __future__ import annotations

import json
import pathlib
import re
import socket
import threading
import time
from typing import Any

import msgspec
import pytest

import vmarchive.format.migstream as ms
from vmarchive.errors import ChunkMissingError, DomainNotFoundError
from vmarchive.ops.capture import (
    FORKED_MIN_READ,
    PROCESS_MIN_READ,
    DiskResult,
    reads_pay_for_a_process,
)
from vmarchive.ops.capture_incr import (
    BitmapState,
    Current,
    DiskPlan,
    ParentDisk,
    UntrackResult,
    _Prefetch,
    decide,
    new_bitmap_name,
    owned,
    releases,
    repository_tag,
)
from vmarchive.ops.tracking import release_tracking, released
from vmarchive.store import ArchiveSummary

NAME = "vmarchive-00112233aabbccdd"
SIZE = 4 * 1024 * 1024
CS = 256 * 1024


def parent(**tracking: Any) -> ParentDisk:
    t = {"bitmap": NAME, "persistent": True, "virtual_size": SIZE, "source": "/d.qcow2"}
    t.update(tracking)
    return ParentDisk("a" * 64, "host1", t, bytes(16 * (SIZE // CS)), CS, SIZE)


NOW = Current("vdb", "/d.qcow2", SIZE, "host1", CS)
GOOD = BitmapState(NAME, True, False, True, False, 65536, 0)
KNOWN = {NAME: "a" * 64}


def test_trusted() -> None:
    assert decide(parent(), NOW, [GOOD], KNOWN) is None
    # a frozen bitmap left by a capture killed after its commit does not matter
    old = BitmapState("vmarchive-old", False, False, True, False, 65536, 3)
    assert decide(parent(), NOW, [GOOD, old], {**KNOWN, "vmarchive-old": "b" * 64}) is None
    # foreign bitmaps are none of our business
    other = BitmapState("libvirt-checkpoint", True, False, True, False, 65536, 0)
    assert decide(parent(), NOW, [GOOD, other], KNOWN) is None


@pytest.mark.parametrize(
    ("par", "now", "bitmaps", "full", "why"),
    [
        (parent(), NOW, [GOOD], True, "--full"),
        (None, NOW, [], False, "no earlier archive"),
        (
            None,
            NOW,
            [msgspec.structs.replace(GOOD, name="vmarchive-x")],
            False,
            "not in this repository",
        ),
        (parent(bitmap=None), NOW, [GOOD], False, "no dirty tracking"),
        (parent(), msgspec.structs.replace(NOW, host="h2"), [GOOD], False, "elsewhere"),
        (parent(), msgspec.structs.replace(NOW, virtual_size=2 * SIZE), [GOOD], False, "resized"),
        (parent(), msgspec.structs.replace(NOW, source="/other.qcow2"), [GOOD], False, "replaced"),
        (parent(), msgspec.structs.replace(NOW, chunk_size=CS * 2), [GOOD], False, "chunk size"),
        (parent(), NOW, [], False, "is missing"),
        (parent(persistent=False), NOW, [], False, "QEMU was restarted"),
        (
            parent(persistent=False, qemu="7:99"),
            msgspec.structs.replace(NOW, instance="7:99"),
            [],
            False,
            "removed by another tool",
        ),
        (
            parent(),
            NOW,
            [BitmapState("vmarchive-new", True, False, True, False, 65536, 0)],
            False,
            "not in this repository",
        ),
        (parent(), NOW, [msgspec.structs.replace(GOOD, inconsistent=True)], False, "inconsistent"),
        (parent(), NOW, [msgspec.structs.replace(GOOD, recording=False)], False, "interrupted"),
        (parent(), NOW, [msgspec.structs.replace(GOOD, busy=True)], False, "in use"),
        (parent(), NOW, [msgspec.structs.replace(GOOD, persistent=False)], False, "does not match"),
    ],
)
def test_fallbacks(
    par: ParentDisk | None, now: Current, bitmaps: list[BitmapState], full: bool, why: str
) -> None:
    reason = decide(par, now, bitmaps, KNOWN, full=full)
    assert reason is not None and why in reason, reason


TAG = "a1b2c3d4"
MINE = f"vmarchive-{TAG}-00112233aabbccdd"
THEIRS = "vmarchive-99887766-00112233aabbccdd"


def test_bitmap_names_carry_the_repository_tag() -> None:
    assert repository_tag(bytes.fromhex(TAG) + bytes(28)) == TAG
    name = new_bitmap_name(TAG, rng=lambda n: "5e" * n)
    assert name == f"vmarchive-{TAG}-{'5e' * 8}"
    assert owned(name, TAG) and owned(MINE, TAG)
    assert not owned(THEIRS, TAG)  # another repository's
    assert owned(NAME, TAG) and owned(NAME, "99887766")  # untagged: any repository's
    assert not owned("othertool-checkpoint", TAG) and not owned("vmarchive", TAG)
    assert all(owned(n, None) for n in (MINE, THEIRS, NAME))  # no tag: every vmarchive-*
    # only the exact tagged shape is another repository's; anything else is untagged
    assert owned("vmarchive-99887766-short", TAG) and owned("vmarchive-99887766", TAG)


def test_another_repositorys_bitmap_does_not_count() -> None:
    """A domain captured into another repository too keeps that repository's bitmap: it is
    not stray here, and never a reason to read in full."""
    theirs = msgspec.structs.replace(GOOD, name=THEIRS)
    first = decide(None, NOW, [theirs], {}, tag=TAG)
    assert first is not None and "no earlier archive" in first, first
    assert decide(parent(), NOW, [GOOD, theirs], KNOWN, tag=TAG) is None
    gone = decide(parent(), NOW, [theirs], KNOWN, tag=TAG)
    assert gone is not None and "is missing" in gone, gone
    # negative controls: untagged, or without a tag, the same bitmap is stray
    for tag, name in ((None, THEIRS), (TAG, "vmarchive-99887766aabbccdd")):
        bm = msgspec.structs.replace(GOOD, name=name)
        why = decide(None, NOW, [bm], {}, tag=tag)
        assert why is not None and "another repository" in why, why
        why = decide(parent(), NOW, [bm], KNOWN, tag=tag)
        assert why is not None and "is gone and" in why, why


def test_own_tagged_stray_is_a_forgotten_archive() -> None:
    mine = msgspec.structs.replace(GOOD, name=MINE)
    why = decide(None, NOW, [mine], {}, tag=TAG)
    assert why is not None and why.endswith("not in this repository (forgotten)"), why
    why = decide(parent(), NOW, [mine], KNOWN, tag=TAG)
    assert why is not None and f"is gone and {MINE}" in why and "(forgotten)" in why, why
    assert decide(parent(bitmap=MINE), NOW, [mine], {MINE: "a" * 64}, tag=TAG) is None


def test_transaction_actions_freeze_old_and_start_new() -> None:
    p = DiskPlan("vdb", "fmt", "vmarchive-new", True, NAME, parent(), None, ())
    assert p.actions() == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "fmt", "name": "vmarchive-new", "persistent": True},
        },
        {"type": "block-dirty-bitmap-disable", "data": {"node": "fmt", "name": NAME}},
    ]
    full = msgspec.structs.replace(p, since_bitmap=None, parent=None, fallback_reason="x")
    assert [a["type"] for a in full.actions()] == ["block-dirty-bitmap-add"]


# --- forget/prune release the tracking of a domain left without archives -------------------


def summary(aid: str, uuid: str, bitmaps: dict[str, str] | None, host: str = "h1") -> Any:
    meta: dict[str, Any] = {"uuid": uuid, "host": host}
    if bitmaps is not None:
        meta["tracking"] = {t: {"bitmap": b} for t, b in bitmaps.items()}
    return ArchiveSummary(aid, "2026-11-25T00:00:00Z", f"vm-{uuid}", "full", metadata=meta)


def test_disk_reads_go_to_a_process_when_they_pay_for_it() -> None:
    """A disk read in full takes the disk reader process; incremental reads only when
    their bitmaps mark at least PROCESS_MIN_READ bytes; the count is the plans' sum."""

    def inc(dirty: int) -> DiskPlan:
        return DiskPlan("vdb", "n", "vmarchive-1", True, NAME, parent(), None, (), dirty)

    full = DiskPlan("vda", "n", "vmarchive-2", True, None, None, "no parent", ())
    no_parent = DiskPlan("vda", "n", "vmarchive-2", True, NAME, None, None, ())
    # one answer to "is this disk read incrementally?", for the reads and the output
    assert inc(0).incremental_read == (NAME, parent().table) and inc(0).incremental
    for p in (full, no_parent):
        assert p.incremental_read is None and not p.incremental
    assert reads_pay_for_a_process([full])
    assert reads_pay_for_a_process([inc(0), full])
    assert reads_pay_for_a_process([no_parent])  # read in full: nothing to refer to
    assert not reads_pay_for_a_process([])
    assert not reads_pay_for_a_process([inc(0)])
    assert not reads_pay_for_a_process([inc(PROCESS_MIN_READ - 1)])
    assert reads_pay_for_a_process([inc(PROCESS_MIN_READ)])
    half = PROCESS_MIN_READ // 2
    assert reads_pay_for_a_process([inc(half), inc(half)])
    # a forked child waiting: any read pays, nothing to read does not
    assert reads_pay_for_a_process([inc(FORKED_MIN_READ)], forked=True)
    assert not reads_pay_for_a_process([inc(FORKED_MIN_READ)])
    assert not reads_pay_for_a_process([inc(0)], forked=True)


def test_released_only_when_the_last_archive_is_gone() -> None:
    a1 = summary("a1", "u1", {"vda": "vmarchive-1"})
    a2 = summary("a2", "u1", {"vda": "vmarchive-2", "vdb": "vmarchive-3"})
    b1 = summary("b1", "u2", None)  # captured without disk tracking
    before = [a1, a2, b1]
    # negative control: one archive of u1 remains
    assert released(before, [a2, b1]) == []
    assert released(before, [a1]) == []
    (t,) = released(before, [b1])
    assert (t.uuid, t.domain) == ("u1", "vm-u1")
    assert t.bitmaps == {"vmarchive-1", "vmarchive-2", "vmarchive-3"}
    assert released(before, []) == [t]  # u2 recorded no tracking: nothing to release


def _fake_untrack(result: Any) -> Any:
    calls: list[tuple[Any, ...]] = []

    def fn(domain: str, uri: str, state_dir: Any, only: Any, tag: Any) -> Any:
        calls.append((domain, uri, list(only), tag))
        if isinstance(result, Exception):
            raise result
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_release_tracking_removes_named_bitmaps_or_says_what_to_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "h1")
    gone = released([summary("a1", "u1", {"vda": "vmarchive-1"})], [])

    fn = _fake_untrack(
        UntrackResult("vm-u1", [("node-a", "vmarchive-1")], [("node-b", "vmarchive-x")])
    )
    rid = bytes.fromhex(TAG) + bytes(28)
    (r,) = release_tracking(gone, "qemu:///system", untrack_fn=fn, repository_id=rid)
    assert fn.calls == [("u1", "qemu:///system", ["vmarchive-1"], TAG)]
    assert r.removed == [("node-a", "vmarchive-1")] and r.advice is None
    assert any("1 other vmarchive bitmaps left" in line for line in r.lines())
    release_tracking(gone, "qemu:///system", untrack_fn=fn)  # no repository: names only
    assert fn.calls[-1][-1] is None

    fn = _fake_untrack(DomainNotFoundError("no domain with matching uuid 'u1'"))
    (r,) = release_tracking(gone, "qemu:///system", untrack_fn=fn)
    assert r.removed == [] and r.advice is not None
    assert "run `vmarchive untrack vm-u1` on h1" in r.advice and "no domain" in r.advice
    assert r.lines() == [r.advice]

    # found here but none of its bitmaps: tracked on another host
    elsewhere = released([summary("a1", "u1", {"vda": "vmarchive-1"}, host="h2")], [])
    fn = _fake_untrack(UntrackResult("vm-u1", []))
    (r,) = release_tracking(elsewhere, "qemu:///system", untrack_fn=fn)
    assert r.advice is not None and "on h2" in r.advice
    # negative control: same host, nothing there (already removed): nothing to say
    (r,) = release_tracking(gone, "qemu:///system", untrack_fn=fn)
    assert r.advice is None and r.lines() == []


def test_release_removes_the_named_and_the_repositorys_strays_only() -> None:
    """A domain's last archive gone: the bitmaps its archives named go, and any other with
    this repository's tag (an interrupted capture's); another repository's and untagged
    ones stay (they may be another repository's, from before the tags)."""
    named = {MINE}
    assert releases(MINE, named, TAG)
    assert releases(f"vmarchive-{TAG}-0123456789abcdef", named, TAG)  # our stray
    assert not releases(THEIRS, named, TAG)
    assert not releases("vmarchive-0123456789abcdef", named, TAG)
    assert not releases(f"vmarchive-{TAG}-0123456789abcdef", named, None)  # names only
    assert releases(NAME, {NAME}, None)
    assert all(releases(n, None, None) for n in (MINE, THEIRS, NAME))  # untrack: all


# --- formats/FORMAT.md documents what the code writes ---------------------------------------

SPEC = (pathlib.Path(__file__).resolve().parents[2] / "formats" / "FORMAT.md").read_text()


def spec_keys(heading: str) -> list[set[str]]:
    """The backticked first-column keys of each table under ``heading`` (to the next one)."""
    start = SPEC.index(f"#### {heading}")
    end = SPEC.find("\n#", start + 1)
    tables: list[set[str]] = []
    cur: set[str] = set()
    for line in SPEC[start:end].splitlines():
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if m:
            cur.add(m.group(1))
        elif cur:
            tables.append(cur)
            cur = set()
    return tables


def test_spec_lists_every_tracking_key() -> None:
    meta, entry = spec_keys("Dirty tracking")
    assert meta == {"tracking", "parent", "disks"}
    plan = DiskPlan("vdb", "n", "vmarchive-1", True, None, None, "full", ())
    assert entry == set(plan.tracking("h", "u", "/d", 1, "qcow2", "1:2"))
    disks = SPEC[SPEC.index("| `disks` |") :].splitlines()[0]
    documented = set(re.findall(r"`([a-z_]+)`", disks)) - {"disks"}
    assert documented == set(DiskResult("vdb", True, 1).to_json())


def test_spec_lists_every_layout_key() -> None:
    top = spec_keys("Device state layout")[0]
    layout = ms.StreamLayout(
        3,
        b"",
        ms.RamSection(1, 0, 4),
        [ms.RamBlock(0, "pc.ram", 4096)],
        [ms.SectionRecord(4, 2, "timer", 0, 2, 0, 41)],
        b"{}",
    )
    j = layout.to_json()
    assert top == set(j)
    start = SPEC.index("#### Device state layout")
    section = SPEC[start : SPEC.index("\n### ", start)]
    example = json.loads(section[section.index("```json") + 7 : section.index("```\n\n=")])
    assert set(example) == set(j["records"][0])
    for key in (*j["ram_blocks"][0], *j["stats"], *j["ram"]):
        assert f"`{key}`" in section or f'"{key}"' in section, key


# --- parent chunks of partly dirty slots are read ahead, in order, bounded -------------------


def test_prefetch_in_order_bounded_and_zero_ids() -> None:
    zero = bytes(16)
    seen: list[bytes] = []
    lock = threading.Lock()

    def read(cid: bytes) -> bytes:
        with lock:
            seen.append(cid)
        return cid * 4

    slots = [(i, bytes([i + 1]) * 16 if i % 3 else zero) for i in range(50)]
    p = _Prefetch(read, slots, zero, lambda i: 64)
    try:
        # never more than the window read ahead of what was asked for
        time.sleep(0.05)
        with lock:
            assert len(seen) <= _Prefetch.WINDOW
        for i, cid in slots:
            assert p.next(i) == (bytes(64) if cid == zero else cid * 4)
    finally:
        p.close()
    assert sorted(seen) == sorted(c for _i, c in slots if c != zero)


def test_prefetch_raises_the_read_error_at_its_slot() -> None:
    def read(cid: bytes) -> bytes:
        if cid[0] == 3:
            raise ChunkMissingError("gone")
        return cid

    p = _Prefetch(read, [(i, bytes([i]) * 16) for i in range(1, 6)], bytes(16), lambda i: 16)
    try:
        assert p.next(1) and p.next(2)
        with pytest.raises(ChunkMissingError):
            p.next(3)
    finally:
        p.close()
