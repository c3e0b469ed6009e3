"""Shared fixtures: the test guest under libvirt (see tests/guestlib.py).

The test bed must fail loudly when it is broken (no skipping): CI runs ``scripts/setup-host``
and ``scripts/build-test-guest`` first; the ``guest_build`` fixture runs the (cached) builder
again so a stale guest is never used.

Fixtures:
    libvirt_conn          session  connection to qemu:///system (VMARCHIVE_TEST_URI)
    guest_build           session  build/guest/guest.json, built if needed
    vm_workdir            function a fresh directory libvirt-qemu can use, removed afterwards
    guest_factory         function make(spec=GuestSpec(...)) -> Guest, started and up;
                                   every guest made is destroyed at teardown
    module_guest_factory  module   the same, shared by a module's tests
    guest                 function a qcow2 guest, up and ticking
    raw_guest             function a guest whose vda is a raw image
    two_disk_guest        function qcow2 vda + qcow2 vdb (16 MiB) with the random writer on
                                   (seed TWO_DISK_WRITER_SEED)
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import guestlib
import libvirt
import pytest
from guestlib import TWO_DISK_WRITER_SEED, GuestFactory


@pytest.fixture(scope="session", autouse=True)
def _local_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The summary and index caches of every repository a test opens (in this process or
    in the CLI processes it starts) go to a session directory, not to ~/.cache."""
    saved = os.environ.get("VMARCHIVE_CACHE_DIR")
    os.environ["VMARCHIVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("vmarchive-cache"))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VMARCHIVE_CACHE_DIR", None)
        else:
            os.environ["VMARCHIVE_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def guest_build() -> dict[str, str]:
    subprocess.run([str(guestlib.ROOT / "scripts" / "build-test-guest")], check=True)
    return guestlib.guest_build()


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[libvirt.virConnect]:
    conn = libvirt.open(guestlib.URI)
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def vm_workdir() -> Iterator[pathlib.Path]:
    path = guestlib.make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class _Factory:
    """Makes guests and remembers them, so teardown destroys every one of them."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.guests: list[guestlib.Guest] = []
        self.workdirs: list[pathlib.Path] = []

    def __call__(self, spec: guestlib.GuestSpec | None = None, wait: bool = True) -> guestlib.Guest:
        workdir = guestlib.make_workdir()
        self.workdirs.append(workdir)
        guest = guestlib.Guest(self.conn, spec or guestlib.GuestSpec(), workdir)
        self.guests.append(guest)
        guest.start()
        if wait:
            guest.wait_up()
        return guest

    def close(self) -> None:
        for guest in self.guests:
            guest.cleanup()
        for workdir in self.workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def guest_factory(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str]
) -> Iterator[GuestFactory]:
    factory = _Factory(libvirt_conn)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_guest_factory(
    libvirt_conn: libvirt.virConnect, guest_build: dict[str, str]
) -> Iterator[GuestFactory]:
    factory = _Factory(libvirt_conn)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def guest(guest_factory: GuestFactory) -> guestlib.Guest:
    return guest_factory(guestlib.GuestSpec())


@pytest.fixture
def raw_guest(guest_factory: GuestFactory) -> guestlib.Guest:
    return guest_factory(guestlib.GuestSpec(disks=(guestlib.DiskSpec(fmt="raw"),)))


@pytest.fixture
def two_disk_guest(guest_factory: GuestFactory) -> guestlib.Guest:
    spec = guestlib.GuestSpec(
        disks=(guestlib.DiskSpec(), guestlib.DiskSpec(size_mib=16)),
        params={"writer": TWO_DISK_WRITER_SEED},
    )
    return guest_factory(spec)
