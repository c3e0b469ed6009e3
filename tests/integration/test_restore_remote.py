"""Restore onto "another host": a second, separate libvirtd reached only through its TCP URI.

``scripts/start-second-libvirtd`` runs it in a private mount namespace (its own config,
state, run, cache and log directories) listening on 127.0.0.1.  The restore moves the
disks and the save image through libvirt's storage API (sparse volume uploads into a dir
pool of that instance) and restores there; the guest must continue where it was captured.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import libvirt
import pytest

from vmarchive.errors import AlreadyExistsError
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.ops.restore import RestoreOptions, restore
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import guestlib  # noqa: E402
from test_restore import Captured, assert_resumed, counter_in_archive  # noqa: E402

POOL = "vmatest-pool"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unix_uri(pool_dir: pathlib.Path) -> str:
    """The URI by which a program on the second "host" reaches its libvirtd: the daemon's
    own unix socket (capture passes file descriptors to QEMU, which TCP cannot carry).
    ``pool_dir`` is the one :func:`second_libvirtd` yields."""
    return f"qemu+unix:///system?socket={pool_dir.parent / 'instance' / 'run' / 'libvirt-sock'}"


@pytest.fixture(scope="module")
def second_libvirtd() -> Iterator[tuple[str, pathlib.Path]]:
    """(URI, pool directory) of a second libvirtd, stopped and removed afterwards."""
    base = guestlib.make_workdir("vmatest-lv2-")
    port = _free_port()
    uri = f"qemu+tcp://127.0.0.1:{port}/system"
    log = (base / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "start-second-libvirtd"), str(base / "instance"), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    conn = None
    try:
        deadline = time.monotonic() + 120
        while conn is None:
            assert proc.poll() is None, (base / "daemon.log").read_text()
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError:
                assert time.monotonic() < deadline, "second libvirtd did not answer"
                time.sleep(0.2)
        pool_dir = base / "pool"
        pool_dir.mkdir()
        pool_dir.chmod(0o755)
        conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{POOL}</name><target><path>{pool_dir}</path></target></pool>",
            0,
        )
        yield uri, pool_dir
    finally:
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                for dom in conn.listAllDomains(0):
                    if dom.isActive():
                        dom.destroy()
            conn.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def test_restore_onto_a_second_libvirtd_through_its_tcp_uri(
    libvirt_conn: libvirt.virConnect,
    guest_factory: guestlib.GuestFactory,
    second_libvirtd: tuple[str, pathlib.Path],
) -> None:
    uri, pool_dir = second_libvirtd
    # A UEFI guest: its variable store goes to the target as a volume of its own.
    g = guest_factory(guestlib.GuestSpec(params={"tick_ms": 100, "churn": 16}, uefi=True))
    g.wait_ticks(3)
    repo_path = str(g.workdir / "repo")
    Repository.init(repo_path, InitOptions()).close()
    cap = capture(CaptureOptions(domain=g.name, repo=repo_path))
    with Repository.open(repo_path) as repo:
        assert g.boot_id is not None
        cp = counter_in_archive(repo, cap.id, g.boot_id)
        flash = repo.open_stream(repo.load_archive(cap.id), "ram:system.flash1").read_all()
    # The original keeps running here: the target is another host with its own namespace.
    r = restore(RestoreOptions(archive=cap.id, repo=repo_path, uri=uri, pool=POOL))
    assert r.route == "pool" and r.domain == g.name
    assert [pathlib.Path(d.path).parent for d in r.disks] == [pool_dir]
    assert r.staging_bytes > 0  # the save image was a volume on the target...
    remote = libvirt.open(uri)
    try:
        vols = remote.storagePoolLookupByName(POOL).listVolumes()
        assert sorted(vols) == [f"{g.name}-nvram.fd", f"{g.name}-vda.raw"]  # ...and is gone
        assert r.nvram == str(pool_dir / f"{g.name}-nvram.fd")
        assert pathlib.Path(r.nvram).read_bytes() == flash
        qemu_log = pool_dir.parent / "instance" / "log" / "qemu" / f"{g.name}.log"
        alive = [d.name() for d in remote.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        assert g.name in alive, qemu_log.read_text()[-1500:] if qemu_log.exists() else "no log"
        # Two daemons, one name: each shows its own domain (the original's disk here).
        here = libvirt_conn.lookupByName(g.name).XMLDesc(0)
        there = remote.lookupByName(g.name).XMLDesc(0)
        assert str(g.disk_paths[0]) in here and str(g.disk_paths[0]) not in there
        assert r.disks[0].path in there
        assert ET.fromstring(there).findtext("./os/nvram") == r.nvram
        clone = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(), pool_dir, name=g.name)
        clone.is_active = lambda: (  # type: ignore[method-assign]
            g.name
            in [d.name() for d in remote.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        )
        clone.serial = guestlib.SerialLog(pathlib.Path(r.serial_logs[0]))
        try:
            assert_resumed(
                clone, Captured(cap.id, cp.counter, cp.last_written, g.boot_id, cp.in_check)
            )
        except guestlib.GuestError:
            print(qemu_log.read_text()[-3000:] if qemu_log.exists() else "no QEMU log")
            raise
        # The original still ticks on the first host.
        mark = g.serial.mark()
        g.wait_ticks(2, since=mark)
        with pytest.raises(AlreadyExistsError):
            restore(RestoreOptions(archive=cap.id, repo=repo_path, uri=uri, pool=POOL))
        remote.lookupByName(g.name).destroy()
    finally:
        remote.close()
    assert os.path.exists(pool_dir / f"{g.name}-vda.raw")


def test_disk_only_archive_is_defined_on_a_second_libvirtd(
    libvirt_conn: libvirt.virConnect, second_libvirtd: tuple[str, pathlib.Path]
) -> None:
    """A shut-off UEFI domain's archive, restored through the pool route: its disk and its
    variable store are uploaded as volumes and the domain is defined there, shut off."""
    uri, pool_dir = second_libvirtd
    wd = guestlib.make_workdir("vmatest-lv2-off-")
    g = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(uefi=True), wd)
    g.create_disks()
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(g.disk_paths[0])],
        check=True,
        capture_output=True,
    )
    store = wd / "nvram.fd"  # as libvirt would have made it at a first start, marked
    store.write_bytes(pathlib.Path(guestlib.OVMF_VARS).read_bytes()[:-16] + b"vmarchive-nvram!")
    dom = libvirt_conn.defineXML(g.xml)
    try:
        repo_path = str(wd / "repo")
        Repository.init(repo_path, InitOptions()).close()
        cap = capture(CaptureOptions(domain=g.name, repo=repo_path))
        assert cap.kind == "disk-only"
        r = restore(RestoreOptions(archive=cap.id, repo=repo_path, uri=uri, pool=POOL))
        assert (r.route, r.state, r.domain) == ("define", "shut off", g.name)
        assert r.nvram == str(pool_dir / f"{g.name}-nvram.fd")
        assert pathlib.Path(r.nvram).read_bytes() == store.read_bytes()
        (disk,) = r.disks
        assert pathlib.Path(disk.path).parent == pool_dir
        same = subprocess.run(
            ["qemu-img", "compare", str(g.disk_paths[0]), disk.path], capture_output=True
        )
        assert same.returncode == 0, same.stdout
        remote = libvirt.open(uri)
        try:
            there = remote.lookupByName(g.name)
            assert there.isPersistent() and not there.isActive()
            assert ET.fromstring(there.XMLDesc(0)).findtext("./os/nvram") == r.nvram
            there.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        finally:
            remote.close()
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
        shutil.rmtree(wd, ignore_errors=True)
