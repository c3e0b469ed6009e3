"""When a dirty bitmap is trusted for an incremental capture (pure decision, no QEMU)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from vmarchive.ops.capture_incr import BitmapState, Current, DiskPlan, ParentDisk, decide

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
            [dataclasses.replace(GOOD, name="vmarchive-x")],
            False,
            "not in this repository",
        ),
        (parent(bitmap=None), NOW, [GOOD], False, "no dirty tracking"),
        (parent(), dataclasses.replace(NOW, host="h2"), [GOOD], False, "elsewhere"),
        (parent(), dataclasses.replace(NOW, virtual_size=2 * SIZE), [GOOD], False, "resized"),
        (parent(), dataclasses.replace(NOW, source="/other.qcow2"), [GOOD], False, "replaced"),
        (parent(), dataclasses.replace(NOW, chunk_size=CS * 2), [GOOD], False, "chunk size"),
        (parent(), NOW, [], False, "is missing"),
        (parent(persistent=False), NOW, [], False, "QEMU was restarted"),
        (
            parent(persistent=False, qemu="7:99"),
            dataclasses.replace(NOW, instance="7:99"),
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
        (parent(), NOW, [dataclasses.replace(GOOD, inconsistent=True)], False, "inconsistent"),
        (parent(), NOW, [dataclasses.replace(GOOD, recording=False)], False, "interrupted"),
        (parent(), NOW, [dataclasses.replace(GOOD, busy=True)], False, "in use"),
        (parent(), NOW, [dataclasses.replace(GOOD, persistent=False)], False, "does not match"),
    ],
)
def test_fallbacks(
    par: ParentDisk | None, now: Current, bitmaps: list[BitmapState], full: bool, why: str
) -> None:
    reason = decide(par, now, bitmaps, KNOWN, full=full)
    assert reason is not None and why in reason, reason


def test_transaction_actions_freeze_old_and_start_new() -> None:
    p = DiskPlan("vdb", "fmt", "vmarchive-new", True, NAME, parent(), None, ())
    assert p.actions() == [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": "fmt", "name": "vmarchive-new", "persistent": True},
        },
        {"type": "block-dirty-bitmap-disable", "data": {"node": "fmt", "name": NAME}},
    ]
    full = dataclasses.replace(p, since_bitmap=None, parent=None, fallback_reason="x")
    assert [a["type"] for a in full.actions()] == ["block-dirty-bitmap-add"]
