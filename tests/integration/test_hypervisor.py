"""The hypervisor layer against a real libvirt-run QEMU (TCG).

One transient domain serves the whole module (libvirt start costs 8-60 s here): no OS,
SeaBIOS idles; a qcow2 ``vda`` with known content, a read-only raw ``vdb`` and an empty
CD-ROM ``sda``.  It is destroyed in a finalizer whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from vmarchive.errors import (
    ConnectionFailedError,
    DomainNotFoundError,
    HypervisorError,
    NBDError,
    QMPCommandError,
)
from vmarchive.hypervisor.blockinfo import list_disks
from vmarchive.hypervisor.connection import Connection, DomainState
from vmarchive.hypervisor.export import NBDServer, qemu_process_owner
from vmarchive.hypervisor.nbd import NBDClient
from vmarchive.hypervisor.qmp import QMP, pause_us

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
URI = os.environ.get("VMARCHIVE_TEST_URI", "qemu:///system")
PATTERN = secrets.token_bytes(8 * MiB)  # written at 16 MiB of vda before the domain starts


@dataclass
class Guest:
    conn: Connection
    name: str
    dir: pathlib.Path


def _domain_xml(name: str, d: pathlib.Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{d}/vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/><source file='{d}/vdb.raw'/>
      <target dev='vdb' bus='virtio'/><readonly/>
    </disk>
    <disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>
  </devices>
</domain>"""


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-utils missing")
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmatest-hv-"))
    d.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the images
    name = f"vmatest-hv-{secrets.token_hex(4)}"
    conn = Connection.open(URI)
    dom = None
    try:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", f"{d}/vda.qcow2", "64M"], check=True
        )
        (d / "pattern").write_bytes(PATTERN)
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -s {d}/pattern 16M 8M", f"{d}/vda.qcow2"],
            check=True,
            capture_output=True,
        )
        (d / "pattern").unlink()
        with open(d / "vdb.raw", "wb") as f:
            f.truncate(4 * MiB)
        dom = conn.raw.createXML(_domain_xml(name, d), 0)
        yield Guest(conn, name, d)
    finally:
        if dom is not None:
            with contextlib.suppress(Exception):
                dom.destroy()
        conn.close()
        shutil.rmtree(d, ignore_errors=True)


def test_connection_versions_lookup_state(guest: Guest) -> None:
    v = guest.conn.versions()
    assert v.libvirt.count(".") == 2 and v.qemu.startswith(("7.", "8.", "9.", "10."))
    dom = guest.conn.lookup(guest.name)
    assert guest.conn.lookup(dom.uuid).name == guest.name
    assert dom.state() is DomainState.RUNNING
    live, mig = dom.xml(), dom.xml(migratable=True)
    assert "<alias name='virtio-disk0'/>" in live  # live form: aliases that link to QEMU
    assert guest.name in mig and "vda" in mig
    with pytest.raises(DomainNotFoundError) as ei:
        guest.conn.lookup(f"vmatest-hv-missing-{secrets.token_hex(4)}")
    assert ei.value.fields["domain"].startswith("vmatest-hv-missing-")


def test_bad_uri_fails_cleanly() -> None:
    with pytest.raises(ConnectionFailedError) as ei:
        Connection.open("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    assert "\n" not in ei.value.message and ei.value.fields["uri"].startswith("qemu+unix")


def test_qmp_commands_errors_and_fds(guest: Guest) -> None:
    qmp = QMP(guest.conn.lookup(guest.name))
    assert qmp.execute("query-status")["status"] == "running"
    t = time.perf_counter()
    for _ in range(20):
        qmp.execute("query-status")
    print(f"QMP round trip through libvirt: {(time.perf_counter() - t) / 20 * 1000:.2f} ms")
    with pytest.raises(QMPCommandError) as ei:
        qmp.execute("block-export-del", {"id": "no-such-export"})
    assert ei.value.fields["command"] == "block-export-del"
    assert ei.value.fields["error_class"] == "GenericError"
    assert type(ei.value.__cause__).__name__ == "ExecuteError"
    r, w = os.pipe()
    try:
        with qmp.passed_fd("vmatest-fd", r):
            pass
        with pytest.raises(QMPCommandError):  # closed on exit: closing again must fail
            qmp.closefd("vmatest-fd")
    finally:
        os.close(r)
        os.close(w)
    assert "running" in qmp.hmp("info status")


def test_nbd_server_start_consumes_its_named_fd(guest: Guest) -> None:
    """What passed_fd(consumed=True) relies on: QEMU takes the fd ``nbd-server-start``
    uses out of the monitor's list, so nothing is left to close after it succeeded."""
    qmp = QMP(guest.conn.lookup(guest.name))
    d = pathlib.Path(tempfile.mkdtemp(prefix="vmatest-hv-fd-"))
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ls.bind(str(d / "nbd.sock"))
        ls.listen(1)
        with qmp.passed_fd("vmatest-nbd", ls.fileno(), consumed=True):
            qmp.execute(
                "nbd-server-start", {"addr": {"type": "fd", "data": {"str": "vmatest-nbd"}}}
            )
        try:
            with pytest.raises(QMPCommandError, match="not found"):
                qmp.closefd("vmatest-nbd")
        finally:
            qmp.execute("nbd-server-stop")
        # the control: a body that fails leaves the fd passed, and passed_fd closes it
        with pytest.raises(RuntimeError), qmp.passed_fd("vmatest-nbd", ls.fileno(), consumed=True):
            raise RuntimeError("the command was never sent")
        with pytest.raises(QMPCommandError, match="not found"):
            qmp.closefd("vmatest-nbd")
        qmp.getfd("vmatest-nbd", ls.fileno())
        qmp.closefd("vmatest-nbd")  # an fd nobody consumed is there to close
    finally:
        ls.close()
        shutil.rmtree(d, ignore_errors=True)


def test_events_measure_pause_and_unregister(guest: Guest) -> None:
    qmp = QMP(guest.conn.lookup(guest.name))
    with qmp.subscribe({"STOP", "RESUME"}) as sub:
        qmp.execute("stop")
        time.sleep(0.05)
        qmp.execute("cont")
        sub.wait_for("RESUME", 30)
        us = pause_us(sub.history)
        assert [e.name for e in sub.history] == ["STOP", "RESUME"]
        assert us is not None and 50_000 <= us < 30_000_000  # QEMU's clock saw the sleep
    n = len(sub.history)
    qmp.execute("stop")  # negative control: after exit nothing is delivered any more
    qmp.execute("cont")
    time.sleep(0.5)
    assert len(sub.history) == n and sub.get(0) is None
    with pytest.raises(HypervisorError, match="no QMP event"), qmp.subscribe({"STOP"}) as sub2:
        sub2.wait_for("STOP", 0.2)


def test_migrate_to_fd_through_libvirt(guest: Guest) -> None:
    """The mechanism the capture relies on: getfd + migrate fd:NAME into a pipe."""
    qmp = QMP(guest.conn.lookup(guest.name))
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 1 << 20):
            got.extend(chunk)

    t = threading.Thread(target=drain)
    t.start()
    try:
        with qmp.subscribe({"STOP", "RESUME", "MIGRATION"}) as sub:
            with qmp.passed_fd("vmatest-mig", w):
                qmp.execute("migrate", {"uri": "fd:vmatest-mig"})
            os.close(w)
            w = -1
            sub.wait_for("MIGRATION", 60, lambda e: e.data.get("status") in ("completed", "failed"))
            assert qmp.execute("query-migrate")["status"] == "completed"
            qmp.execute("cont")
            sub.wait_for("RESUME", 30)
        t.join(30)
        assert got[:4] == b"QEVM" and len(got) > 100_000  # zero pages are compact
        assert qmp.execute("query-status")["status"] == "running"
    finally:
        if w >= 0:
            os.close(w)
        t.join(30)
        os.close(r)


def test_disks_map_to_block_nodes(guest: Guest) -> None:
    qmp = QMP(guest.conn.lookup(guest.name))
    disks = {d.target: d for d in list_disks(qmp)}
    assert set(disks) == {"vda", "vdb", "sda"}
    vda, vdb, sda = disks["vda"], disks["vdb"], disks["sda"]
    assert vda.driver == "qcow2" and vda.file_driver == "file" and vda.virtual_size == 64 * MiB
    assert vda.node_name and vda.file_node and not vda.readonly and not vda.removable
    assert vdb.driver == "raw" and vdb.readonly and vdb.virtual_size == 4 * MiB
    assert sda.removable and not sda.has_medium
    names = {n["node-name"] for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    assert {vda.node_name, vda.file_node, vdb.node_name} <= names


def test_nbd_export_from_libvirt_qemu(guest: Guest) -> None:
    qmp = QMP(guest.conn.lookup(guest.name))
    vda = next(d for d in list_disks(qmp) if d.target == "vda")
    assert vda.node_name
    sockdir = pathlib.Path(tempfile.mkdtemp(prefix="vmatest-hv-sock-"))
    try:
        with NBDServer(qmp, str(sockdir / "nbd.sock")) as srv:
            with srv.export(vda.node_name, "vda") as name, srv.connect(name) as c:
                assert c.size == 64 * MiB and c.info.read_only
                data = [(e.offset, e.length) for e in c.extents() if not e.zero]
                assert data == [(16 * MiB, 8 * MiB)]
                t = time.perf_counter()
                got = c.read(16 * MiB, 8 * MiB)
                dt = time.perf_counter() - t
                assert got == PATTERN
                print(f"NBD read from libvirt QEMU: {8 / dt:.0f} MiB/s")
                assert c.read(0, 4096) == bytes(4096)
            assert qmp.execute("query-block-exports") == []
        assert not (sockdir / "nbd.sock").exists()
        with pytest.raises(NBDError):  # negative control: the server is gone
            NBDClient.connect(str(sockdir / "nbd.sock"), "vmarchive-vda")
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_nbd_server_on_path_qemu_binds(guest: Guest) -> None:
    """QEMU binds the socket itself: only in a directory its user can write."""
    qmp = QMP(guest.conn.lookup(guest.name))
    uid, gid = qemu_process_owner(guest.name)
    sockdir = pathlib.Path(tempfile.mkdtemp(prefix="vmatest-hv-sock-"))
    try:
        with pytest.raises(QMPCommandError):  # negative control: root's 0700 dir
            NBDServer(qmp, str(sockdir / "nbd.sock"), via_fd=False).start()
        os.chown(sockdir, uid, gid)
        with NBDServer(qmp, str(sockdir / "nbd.sock"), via_fd=False) as srv:
            vdb = next(d for d in list_disks(qmp) if d.target == "vdb")
            assert vdb.node_name
            with srv.export(vdb.node_name) as name, srv.connect(name) as c:
                assert c.read(0, 4096) == bytes(4096)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


def test_userfaultfd_verdict_matches_libvirt_qemu(guest: Guest) -> None:
    """doctor's verdict for QEMU's user == what libvirt's QEMU does when asked for
    background-snapshot (it opens a userfaultfd as that user right then)."""
    from vmarchive.hypervisor.probe import probe_userfaultfd

    if os.geteuid() != 0:
        pytest.skip("the probe needs root to test as QEMU's user")
    verdict = probe_userfaultfd(qemu_user=str(qemu_process_owner(guest.name)[0])).qemu_user_ok
    qmp = QMP(guest.conn.lookup(guest.name))
    cap = [{"capability": "background-snapshot", "state": True}]
    try:
        qmp.execute("migrate-set-capabilities", {"capabilities": cap})
        accepted = True
    except QMPCommandError as e:
        accepted = False
        assert "background-snapshot" in e.message.lower() or "kernel" in e.message.lower()
    finally:
        cap[0]["state"] = False
        qmp.execute("migrate-set-capabilities", {"capabilities": cap})
    assert verdict is accepted
