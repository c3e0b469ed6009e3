"""clean_domain against a small fake QEMU: what a killed capture leaves, undone in order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmarchive.errors import HostPreconditionError, LockedError, QMPCommandError
from vmarchive.ops.capture import _release_qemu
from vmarchive.ops.capture_cleanup import Made, Marker, clean_domain, domain_lock


class FakeDomain:
    """The libvirt domain behind FakeQEMU: its QEMU runs unless a test says otherwise."""

    name = "fake"

    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active


class FakeQEMU:
    """Just enough QEMU state: run state, migration, graph, jobs, exports, fd sets, caps."""

    def __init__(self) -> None:
        self.domain = FakeDomain()
        self.log: list[str] = []
        self.running = False
        self.status = "paused"
        self.migration = "pre-switchover"
        # device -> attached node; node -> backing node
        self.attached = {"vda": "vmarchive-ov-vda"}
        self.backing = {"vmarchive-ov-vda": "libvirt-1-format"}
        self.nodes = {
            "libvirt-1-format",
            "libvirt-1-storage",
            "vmarchive-ov-vda",
            "vmarchive-ov-vda-f",
        }
        self.jobs: dict[str, dict[str, Any]] = {}
        self.exports = {"vmarchive-exp-vda"}
        self.nbd = True
        self.fdsets = [{"fdset-id": 3, "fds": [{"fd": 9, "opaque": "vmarchive-ov-vda"}]}]
        self.caps = {"pause-before-switchover": True, "background-snapshot": False}
        self.params = {"max-bandwidth": 1 << 40, "downtime-limit": 20}

    def execute(self, cmd: str, args: dict[str, Any] | None = None, **_: Any) -> Any:
        args = args or {}
        self.log.append(cmd)
        if cmd == "query-migrate":
            return {"status": self.migration}
        if cmd == "migrate_cancel":
            self.migration = "cancelled"
            return {}
        if cmd == "query-status":
            return {"running": self.running, "status": self.status}
        if cmd == "cont":
            if self.migration in ("active", "pre-switchover"):
                raise QMPCommandError("migration running", command=cmd)
            self.running, self.status = True, "running"
            return {}
        if cmd == "query-block-exports":
            return [{"id": e} for e in sorted(self.exports)]
        if cmd == "block-export-del":
            self.exports.discard(args["id"])
            return {}
        if cmd == "nbd-server-stop":
            if not self.nbd:
                raise QMPCommandError("not running", command=cmd)
            self.nbd = False
            self.exports.clear()  # as QEMU >= 5.2: every NBD export closed, then it returns
            return {}
        if cmd == "query-jobs":
            return list(self.jobs.values())
        if cmd == "job-cancel":
            if self.jobs.get(args["id"], {}).get("status") in (None, "concluded"):
                raise QMPCommandError(f"job {args['id']} cannot be cancelled", command=cmd)
            self.jobs[args["id"]]["status"] = "concluded"
            return {}
        if cmd == "job-dismiss":
            assert self.jobs[args["id"]]["status"] == "concluded"
            del self.jobs[args["id"]]
            return {}
        if cmd == "query-block":
            return [{"device": d, "inserted": {"node-name": n}} for d, n in self.attached.items()]
        if cmd == "block-commit":
            assert self.running, "commit needs active disks: the guest must run first"
            assert args["base-node"] == self.backing[args["device"]]
            self.jobs[args["job-id"]] = {
                "id": args["job-id"],
                "status": "ready",
                "top": args["device"],
            }
            return {}
        if cmd == "job-complete":
            job = self.jobs.pop(args["id"])
            for d, n in self.attached.items():
                if n == job["top"]:
                    self.attached[d] = self.backing[n]
            return {}
        if cmd == "query-named-block-nodes":
            return [{"node-name": n} for n in sorted(self.nodes)]
        if cmd == "blockdev-del":
            n = args["node-name"]
            if n not in self.nodes:
                raise QMPCommandError(f"Failed to find node with node-name='{n}'", command=cmd)
            if n in self.attached.values():
                raise QMPCommandError("node in use", command=cmd)
            if n.endswith("-f") and n[:-2] in self.nodes:
                raise QMPCommandError(f"Node {n} is not owned by the monitor", command=cmd)
            # as in QEMU 7.2: a file node made inline with its parent goes with it
            self.nodes -= {n, n + "-f"}
            return {}
        if cmd == "query-fdsets":
            return self.fdsets
        if cmd == "remove-fd":
            if all(s["fdset-id"] != args["fdset-id"] for s in self.fdsets):
                raise QMPCommandError("fdset not found", command=cmd)
            self.fdsets = [s for s in self.fdsets if s["fdset-id"] != args["fdset-id"]]
            return {}
        if cmd == "closefd":
            raise QMPCommandError("no such fd", command=cmd)
        if cmd == "migrate-set-capabilities":
            for c in args["capabilities"]:
                self.caps[c["capability"]] = c["state"]
            return {}
        if cmd == "migrate-set-parameters":
            self.params.update(args)
            return {}
        if cmd == "x-debug-query-block-graph":
            raise QMPCommandError("not in this fake", command=cmd)
        raise AssertionError(f"unexpected command {cmd}")

    def remove_fd(self, fdset_id: int) -> None:
        self.execute("remove-fd", {"fdset-id": fdset_id})

    def closefd(self, name: str) -> None:
        self.execute("closefd", {"fdname": name})


def killed_marker(tmp_path: Path) -> Marker:
    m = Marker(path=tmp_path / "u.json", domain="g", uuid="u", was_running=True, mode="switchover")
    m.migration_started = True
    m.nbd_server = True
    m.saved_capabilities = {"pause-before-switchover": False, "background-snapshot": False}
    m.saved_parameters = {"max-bandwidth": 134217728, "downtime-limit": 300}
    m.overlays = {"vmarchive-ov-vda": "libvirt-1-format"}
    f = tmp_path / "vmarchive-ov-vda.qcow2"
    f.write_bytes(b"x")
    m.files = [str(f)]
    m.save()
    return m


def test_killed_at_pre_switchover_is_undone_in_order(tmp_path: Path) -> None:
    q = FakeQEMU()
    m = Marker.load(killed_marker(tmp_path).path)
    assert m is not None and m.overlays == {"vmarchive-ov-vda": "libvirt-1-format"}
    assert clean_domain(q, m)  # type: ignore[arg-type]
    assert q.running and q.migration == "cancelled"
    assert q.attached == {"vda": "libvirt-1-format"}
    assert q.nodes == {"libvirt-1-format", "libvirt-1-storage"}
    assert not q.exports and not q.nbd and not q.jobs and not q.fdsets
    assert q.caps["pause-before-switchover"] is False
    assert q.params == {"max-bandwidth": 134217728, "downtime-limit": 300}
    assert not (tmp_path / "vmarchive-ov-vda.qcow2").exists() and not m.path.exists()
    order = [c for c in q.log if c in ("migrate_cancel", "cont", "block-commit", "blockdev-del")]
    assert order.index("migrate_cancel") < order.index("cont") < order.index("block-commit")
    assert order.index("block-commit") < order.index("blockdev-del")


def _snapshot_leftovers(q: FakeQEMU, tmp_path: Path) -> Marker:
    """What a snapshot-mode capture of two disks holds while it reads them."""
    q.running, q.status, q.migration = True, "running", "completed"
    q.attached, q.backing = {"vda": "libvirt-1-format", "vdb": "libvirt-2-format"}, {}
    q.nodes = {"libvirt-1-format", "libvirt-2-format"}
    q.exports = set()
    for d in ("vda", "vdb"):
        q.nodes |= {f"vmarchive-fl-{d}", f"vmarchive-fl-{d}-f"}
        q.exports.add(f"vmarchive-exp-{d}")
    q.jobs = {
        "vmarchive-fleece-vda": {"id": "vmarchive-fleece-vda", "status": "running"},
        "vmarchive-fleece-vdb": {"id": "vmarchive-fleece-vdb", "status": "concluded"},
    }
    m = killed_marker(tmp_path)
    m.mode, m.overlays = "snapshot", {}
    return m


def test_a_snapshot_capture_is_undone_in_few_round_trips(tmp_path: Path) -> None:
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    assert clean_domain(q, m)  # type: ignore[arg-type]
    assert not q.exports and not q.jobs and q.nodes == {"libvirt-1-format", "libvirt-2-format"}
    # stopping our NBD server took the exports with it: they were never asked about
    assert q.log.index("nbd-server-stop") < q.log.index("job-cancel")
    assert "block-export-del" not in q.log and "query-block-exports" not in q.log
    # each job asked for once, then one query sees them all gone
    assert q.log.count("job-cancel") == 1 and q.log.count("job-dismiss") == 2
    assert q.log.count("query-jobs") == 2
    # file nodes go with their parents: never asked for (QEMU refuses them alone), and
    # with every deletion accepted nothing is left to look for again
    assert q.log.count("blockdev-del") == 2
    assert q.log.count("query-named-block-nodes") == 1
    # a snapshot-mode capture attaches no overlay: the devices are not asked about
    assert "query-block" not in q.log


def test_exports_on_a_server_not_ours_are_removed_one_by_one(tmp_path: Path) -> None:
    """The control of the above: without a server of ours (or one that is gone) the
    exports are looked for, each removed once, and one query sees them all gone; the
    server is left alone."""
    for ours, running in ((False, True), (True, False)):
        q = FakeQEMU()
        m = _snapshot_leftovers(q, tmp_path)
        m.nbd_server, q.nbd = ours, running
        assert clean_domain(q, m)  # type: ignore[arg-type]
        assert not q.exports and q.nbd is running
        assert q.log.count("block-export-del") == 2 and q.log.count("query-block-exports") == 2
        assert q.log.index("block-export-del") < q.log.index("job-cancel")


def test_a_refused_node_deletion_is_looked_at_again(tmp_path: Path) -> None:
    """The control of the above: a deletion QEMU refuses (a child asked before its
    parent, say) makes the clean-up ask for the nodes again and retry."""
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    refused: list[str] = []

    def once_refusing(cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        if cmd == "blockdev-del" and not refused:
            refused.append(str((args or {}).get("node-name")))
            q.log.append(cmd)
            raise QMPCommandError("node in use", command=cmd)
        return FakeQEMU.execute(q, cmd, args, **kw)

    q.execute = once_refusing  # type: ignore[method-assign]
    assert clean_domain(q, m)  # type: ignore[arg-type]
    assert q.nodes == {"libvirt-1-format", "libvirt-2-format"}
    assert q.log.count("query-named-block-nodes") == 2  # asked again after the refusal


def test_the_release_after_a_completed_capture_closes_no_named_fd(tmp_path: Path) -> None:
    """QEMU took both named fds (migrate fd:, nbd-server-start): the release beside the
    commit does not ask to close them (two failing round trips, and the first error
    reply imported qemu.qmp with asyncio), nor about the migration it saw complete; the
    full clean-up still does both (the control)."""
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    q.caps["background-snapshot"] = True  # as the capture set it
    q.running, q.status = True, "running"  # QEMU resumed the guest in its set-up
    assert _release_qemu(q, m, True, Made())  # type: ignore[arg-type]
    assert "closefd" not in q.log and "query-migrate" not in q.log
    assert "query-status" not in q.log  # a completed snapshot left the guest running
    assert not q.exports and not q.jobs and m.path.exists()
    assert q.caps["background-snapshot"] is False  # the settings restored all the same
    full = tmp_path / "full"
    full.mkdir()
    q = FakeQEMU()
    m = _snapshot_leftovers(q, full)
    assert clean_domain(q, m)  # type: ignore[arg-type]
    assert q.log.count("closefd") == 2 and q.log.count("query-migrate") == 2
    assert "query-status" in q.log


def _made(q: FakeQEMU) -> Made:
    """What the capture of _snapshot_leftovers noted as it made it."""
    for j in q.jobs.values():
        j["status"] = "running"
    return Made(
        jobs=sorted(q.jobs),
        nodes=["vmarchive-fl-vda", "vmarchive-fl-vdb"],
        fdsets=[int(str(s["fdset-id"])) for s in q.fdsets],
    )


def test_the_release_undoes_what_the_capture_made_without_looking_for_it(
    tmp_path: Path,
) -> None:
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    assert _release_qemu(q, m, True, _made(q))  # type: ignore[arg-type]
    assert not q.jobs and not q.fdsets and q.nodes == {"libvirt-1-format", "libvirt-2-format"}
    assert "query-named-block-nodes" not in q.log and "query-fdsets" not in q.log
    assert q.log.count("query-jobs") == 1  # only to see the cancelled jobs end
    assert q.log.index("job-cancel") < q.log.index("blockdev-del") < q.log.index("remove-fd")


@pytest.mark.parametrize("gone", ["job", "node", "fdset"])
def test_what_is_not_there_as_noted_is_looked_for(tmp_path: Path, gone: str) -> None:
    """The control of the above: a job that ended by itself, a node or an fd set someone
    removed -- that step asks QEMU as every clean-up does, and all of ours still goes."""
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    made = _made(q)
    ask = {"job": "query-jobs", "node": "query-named-block-nodes", "fdset": "query-fdsets"}
    if gone == "job":
        q.jobs["vmarchive-fleece-vda"]["status"] = "concluded"
    elif gone == "node":
        made.nodes.insert(0, "vmarchive-fl-vdc")
    else:
        made.fdsets.insert(0, 99)
    assert _release_qemu(q, m, True, made)  # type: ignore[arg-type]
    assert not q.jobs and not q.fdsets and q.nodes == {"libvirt-1-format", "libvirt-2-format"}
    # asked for (beyond the one look at the cancelled jobs ending, as noted)
    assert q.log.count(ask[gone]) > (1 if gone == "job" else 0)


def test_a_release_that_did_not_see_the_migration_end_asks(tmp_path: Path) -> None:
    """Without the capture's word that the migration completed, the release checks it
    before restoring the migration's settings, as any clean-up does."""
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)
    assert _release_qemu(q, m, False, Made())  # type: ignore[arg-type]
    assert q.log.count("query-migrate") == 2


def test_one_refused_export_or_job_does_not_stop_the_others(tmp_path: Path) -> None:
    q = FakeQEMU()
    m = _snapshot_leftovers(q, tmp_path)

    def refusing(cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        if (args or {}).get("id") in ("vmarchive-exp-vda", "vmarchive-fleece-vda"):
            q.log.append(cmd)
            raise QMPCommandError("refused", command=cmd)
        return FakeQEMU.execute(q, cmd, args, **kw)

    q.execute = refusing  # type: ignore[method-assign]
    m.nbd_server = False  # a server not ours: the exports are removed one by one
    assert not clean_domain(q, m)  # type: ignore[arg-type]
    assert q.exports == {"vmarchive-exp-vda"} and set(q.jobs) == {"vmarchive-fleece-vda"}
    assert m.path.exists()  # kept: the next run retries


def test_the_sweep_without_a_marker_only_looks(tmp_path: Path) -> None:
    # nothing of ours in QEMU and no marker: queries only, and no named fd to close (they
    # are passed only after a marker is saved); with a marker, both names are closed
    q = FakeQEMU()
    q.attached, q.exports, q.nbd, q.fdsets = {}, set(), False, []
    q.nodes = {"libvirt-1-format", "libvirt-1-storage"}
    assert clean_domain(q, None)  # type: ignore[arg-type]
    assert all(c.startswith("query-") for c in q.log), q.log
    q.log.clear()
    m = killed_marker(tmp_path)
    m.migration_started, m.was_running, m.overlays = False, False, {}
    clean_domain(q, m)  # type: ignore[arg-type]
    assert q.log.count("closefd") == 2


def test_a_sweep_that_found_nothing_hands_over_what_it_saw(tmp_path: Path) -> None:
    """The capture lists its disks from the sweep's own block answers (two round trips
    less), but only when the sweep changed nothing: controls with a leftover node, an
    overlay of ours, and a marker (whose bitmaps or options the sweep may restore)."""
    q = FakeQEMU()
    q.attached, q.exports, q.nbd, q.fdsets = {"vda": "libvirt-1-format"}, set(), False, []
    q.nodes = {"libvirt-1-format", "libvirt-1-storage"}
    seen: dict[str, Any] = {}
    assert clean_domain(q, None, block_state=seen)  # type: ignore[arg-type]
    assert seen == {
        "query-block": q.execute("query-block"),
        "query-named-block-nodes": q.execute("query-named-block-nodes"),
    }

    q.nodes |= {"vmarchive-fl-vda"}  # a node of ours left behind: removed, so changed
    seen = {}
    assert clean_domain(q, None, block_state=seen)  # type: ignore[arg-type]
    assert seen == {} and "blockdev-del" in q.log

    q.attached = {"vda": "vmarchive-ov-vda"}  # an overlay of ours: committed, so changed
    q.nodes |= {"vmarchive-ov-vda", "vmarchive-ov-vda-f"}
    seen = {}
    clean_domain(q, None, block_state=seen)  # type: ignore[arg-type]
    assert seen == {}

    q = FakeQEMU()
    q.attached, q.exports, q.nbd, q.fdsets = {"vda": "libvirt-1-format"}, set(), False, []
    q.nodes = {"libvirt-1-format", "libvirt-1-storage"}
    m = killed_marker(tmp_path)
    m.migration_started, m.was_running, m.overlays = False, False, {}
    seen = {}
    clean_domain(q, m, block_state=seen)  # type: ignore[arg-type]
    assert seen == {}


def test_a_domain_without_qemu_only_loses_our_files(tmp_path: Path) -> None:
    q = FakeQEMU()
    q.domain.active = False  # destroyed mid-capture: nothing left to undo in QEMU
    m = Marker.load(killed_marker(tmp_path).path)
    assert m is not None
    assert clean_domain(q, m)  # type: ignore[arg-type]
    assert q.log == []  # not one QMP command
    assert not (tmp_path / "vmarchive-ov-vda.qcow2").exists() and not m.path.exists()


def test_background_snapshot_is_never_cancelled(tmp_path: Path) -> None:
    q = FakeQEMU()
    q.migration = "active"
    m = killed_marker(tmp_path)
    m.mode = "snapshot"
    calls = 0

    def finishing(cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        nonlocal calls
        if cmd == "query-migrate":
            calls += 1
            if calls > 3:  # whoever drains the pipe lets it complete
                q.migration = "completed"
        return FakeQEMU.execute(q, cmd, args, **kw)

    q.execute = finishing  # type: ignore[method-assign]
    clean_domain(q, m)  # type: ignore[arg-type]
    assert "migrate_cancel" not in q.log and q.migration == "completed"


def _stuck_cancel(q: FakeQEMU, wakeable: bool) -> None:
    """QEMU 7.2's race: a cancel just after the switchover stopped the vCPUs, before
    pre-switchover, stays at 'cancelling' until migrate-continue names that state."""
    q.migration = "active"
    q.status = "finish-migrate"

    def racing(cmd: str, args: dict[str, Any] | None = None, **kw: Any) -> Any:
        if cmd == "migrate_cancel":
            q.log.append(cmd)
            q.migration = "cancelling"
            return {}
        if cmd == "migrate-continue":
            q.log.append(cmd)
            if not wakeable or (args or {}).get("state") != q.migration:
                raise QMPCommandError("Migration not in expected state", command=cmd)
            q.migration = "cancelled"
            return {}
        if cmd == "cont" and q.migration == "cancelling":
            raise QMPCommandError("Migration is not finalized yet", command=cmd)
        return FakeQEMU.execute(q, cmd, args, **kw)

    q.execute = racing  # type: ignore[method-assign]


def test_a_cancel_stuck_at_the_switchover_is_woken_and_the_guest_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmarchive.ops import capture_cleanup

    monkeypatch.setattr(capture_cleanup, "CANCEL_FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(capture_cleanup, "CANCEL_WAIT_S", 0.2)
    real_cont = capture_cleanup.cont_guest
    monkeypatch.setattr(capture_cleanup, "cont_guest", lambda q: real_cont(q, timeout=0.2))
    q = FakeQEMU()
    _stuck_cancel(q, wakeable=True)
    assert clean_domain(q, killed_marker(tmp_path))  # type: ignore[arg-type]
    assert q.migration == "cancelled" and q.running
    assert q.log.index("migrate_cancel") < q.log.index("migrate-continue") < q.log.index("cont")
    # a cancel that is slow, not stuck (vCPUs not stopped by the switchover): left alone, as
    # a post nobody waits for would skip the next migration's pre-switchover pause
    q = FakeQEMU()
    _stuck_cancel(q, wakeable=True)
    q.status = "paused"
    m = killed_marker(tmp_path)
    m.overlays = {}  # this fake commits only a running guest's overlays
    assert not clean_domain(q, m)  # type: ignore[arg-type]
    assert "migrate-continue" not in q.log
    # the control: a QEMU that cannot be woken stays stuck, and the clean-up says so
    q = FakeQEMU()
    _stuck_cancel(q, wakeable=False)
    m = killed_marker(tmp_path)
    m.overlays = {}  # this fake commits only a running guest's overlays
    assert not clean_domain(q, m)  # type: ignore[arg-type]
    assert q.migration == "cancelling" and not q.running


def test_a_marker_left_by_nobody_changes_nothing_without_qemu(tmp_path: Path) -> None:
    m = killed_marker(tmp_path)
    assert clean_domain(None, m)
    assert not m.path.exists()


def test_domain_lock_refuses_a_second_capture(tmp_path: Path) -> None:
    with domain_lock(tmp_path, "u", "g") as p:
        assert p == tmp_path / "u.json"
        with pytest.raises(LockedError, match="already running"), domain_lock(tmp_path, "u", "g"):
            pass
    with domain_lock(tmp_path, "u", "g"):
        pass
    assert not (tmp_path / "u.lock").exists()  # no file per domain ever captured
    (tmp_path / "u.lock").write_text("4242\n")  # left by a holder killed with -9
    with domain_lock(tmp_path, "u", "g"):
        assert (tmp_path / "u.lock").read_text() == f"{os.getpid()}\n"


def test_domain_lock_names_a_state_directory_it_cannot_use(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with (
        pytest.raises(HostPreconditionError, match=r"state directory .*a-file/state"),
        domain_lock(blocker / "state", "u", "g"),
    ):
        pass
    # Negative control: the same call under a directory makes it and takes the lock.
    with domain_lock(tmp_path / "state", "u", "g") as p:
        assert p == tmp_path / "state" / "u.json"


def test_domain_lock_retakes_a_file_its_holder_unlinked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    real_open = os.open

    def racing_open(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        if not opened:  # its holder lets go and unlinks it just after this open
            os.unlink(path)
        opened.append(path)
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    with domain_lock(tmp_path, "u", "g"):
        monkeypatch.undo()
        assert len(opened) == 2  # the unlinked file was given up for the one at the path
        with pytest.raises(LockedError), domain_lock(tmp_path, "u", "g"):
            pass


def test_marker_round_trips(tmp_path: Path) -> None:
    m = killed_marker(tmp_path)
    data = json.loads(m.path.read_text())
    assert data["mode"] == "switchover" and data["overlays"] == m.overlays
