"""Real QEMU streams through the parser and regenerator (plain QEMU, no libvirt).

A source VM (the team's test guest kernel if it is built, else SeaBIOS idling) is
migrated to a file in three ways: stopped, live precopy (several passes, pages re-sent)
and background-snapshot.  Each stream is parsed and regenerated; a second QEMU loads the
regenerated stream with ``-incoming defer`` and is migrated out again; its RAM must be
byte-identical to what the parser found in the original stream.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmarchive.errors import StreamError
from vmarchive.format import migstream as ms
from vmarchive.format import migstream_cpu as mc

pytestmark = pytest.mark.qemu

ROOT = pathlib.Path(__file__).resolve().parents[2]
GUEST_JSON = ROOT / "build" / "guest" / "guest.json"
QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
PAGE = 4096


def _guest_args() -> list[str]:
    """Boot the team's test guest when it is built (it keeps dirtying RAM), else SeaBIOS."""
    if not GUEST_JSON.exists():
        return []
    g = json.loads(GUEST_JSON.read_text())
    if not (os.path.exists(g["kernel"]) and os.path.exists(g["initrd"])):
        return []
    return ["-kernel", g["kernel"], "-initrd", g["initrd"], "-append", g["cmdline"]]


class VM:
    """A plain QEMU process with a QMP socket; killed by ``close``."""

    def __init__(self, workdir: pathlib.Path, name: str, extra: list[str]) -> None:
        self.sock = workdir / f"{name}.qmp"
        disk = workdir / "disk.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(8 << 20)
        argv = [
            QEMU,
            "-machine",
            "pc",
            "-m",
            "128",
            "-smp",
            "2",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.sock},server=on,wait=off",
            "-serial",
            f"file:{workdir / (name + '.serial')}",
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-pci,netdev=n0",
            # both VMs open the same scratch disk: no image locking between them
            "-drive",
            f"if=none,id=d0,file={disk},format=raw,file.locking=off",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-device",
            "VGA",
            *_guest_args(),
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"QEMU did not start: {err}")
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(self.sock))
        self.qmp.connect()

    def cmd(self, name: str, **args: Any) -> Any:
        r = self.qmp.cmd_raw(name, args or None)
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']}")
        return r["return"]

    def wait_migration(self, timeout: float = 40) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st: dict[str, Any] = self.cmd("query-migrate")
            if st.get("status") in ("completed", "failed", "cancelled"):
                assert st["status"] == "completed", st
                return st
            time.sleep(0.02)
        raise TimeoutError("migration did not complete")

    def migrate_to(self, path: pathlib.Path) -> dict[str, Any]:
        self.cmd("migrate", uri=f"exec:cat > {path}")
        return self.wait_migration()

    def close(self) -> None:
        try:
            self.qmp.close()
        finally:
            self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stderr:
                self.proc.stderr.close()


class Images(ms.NullSink):
    """Keeps the final page image of every block (fine for a 128 MiB test VM)."""

    def __init__(self) -> None:
        self.img: dict[str, bytearray] = {}
        self.dev = bytearray()

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        self.img = {b.idstr: bytearray(b.used_length) for b in blocks}

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        self.img[block.idstr][offset : offset + PAGE] = bytes(PAGE) if data is None else data

    def device_section(self, record: ms.SectionRecord, data: memoryview) -> None:
        self.dev += data

    def source(self, block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        img = self.img[block.idstr]
        step = 1 << 20  # hand the regenerator 1 MiB extents, like store chunks
        for off in range(0, block.used_length, step):
            n = min(step, block.used_length - off)
            yield (off, n, memoryview(img)[off : off + n])


def parse_file(path: pathlib.Path) -> tuple[ms.StreamLayout, Images]:
    sink = Images()
    with open(path, "rb", buffering=0) as f:
        layout = ms.parse_stream(f, sink)
    return layout, sink


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("migstream")


@pytest.fixture(scope="module")
def source_vm(workdir: pathlib.Path) -> Iterator[VM]:
    vm = VM(workdir, "src", [])
    try:
        time.sleep(3.0 if _guest_args() else 1.0)  # let firmware / kernel dirty RAM
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 34, "downtime-limit": 30})
        yield vm
    finally:
        vm.close()


def load_and_reexport(workdir: pathlib.Path, stream: pathlib.Path, tag: str) -> pathlib.Path:
    """Feed ``stream`` to a fresh paused QEMU, then migrate it out again."""
    vm = VM(workdir, f"dst-{tag}", ["-S", "-incoming", "defer"])
    try:
        vm.cmd("migrate-incoming", uri=f"exec:cat {stream}")
        vm.wait_migration()
        status = vm.cmd("query-status")
        assert status["status"] in ("paused", "prelaunch"), status
        out = workdir / f"reexport-{tag}.bin"
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 34})
        vm.migrate_to(out)
        return out
    finally:
        vm.close()


def round_trip(
    workdir: pathlib.Path, stream: pathlib.Path, tag: str, *, qemu_reads_original: bool = False
) -> ms.StreamLayout:
    layout, orig = parse_file(stream)
    if qemu_reads_original:
        # Independent oracle for "later records win": QEMU itself loads the ORIGINAL
        # stream; the RAM it then holds must be exactly what our parser reconstructed.
        _, oracle = parse_file(load_and_reexport(workdir, stream, f"{tag}-orig"))
        for name, img in orig.img.items():
            assert oracle.img[name] == img, f"parser disagrees with QEMU on block {name}"
    regen = workdir / f"regen-{tag}.bin"
    with open(regen, "wb") as f:
        ms.regenerate(layout, bytes(orig.dev), orig.source, f)
    # capture's own check, memory bounded, then the same by hand with whole images
    report = ms.check_round_trip(layout, bytes(orig.dev), orig.source)
    assert report.ok, report.problems
    layout2, again = parse_file(regen)
    assert again.img == orig.img and again.dev == orig.dev
    assert layout2.records == layout.records and layout2.vmdesc == layout.vmdesc
    # QEMU's check: it loads, and what it then holds is what we parsed
    _, back = parse_file(load_and_reexport(workdir, regen, tag))
    assert back.img.keys() == orig.img.keys()
    for name, img in orig.img.items():
        assert back.img[name] == img, f"RAM block {name} differs after QEMU round trip"
    return layout


def test_live_precopy_stream_with_resent_pages(source_vm: VM, workdir: pathlib.Path) -> None:
    # a low bandwidth stretches the first pass so the running guest re-dirties pages
    source_vm.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20})
    try:
        stream = workdir / "live.bin"
        st = source_vm.migrate_to(stream)
    finally:
        source_vm.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 34})
        source_vm.cmd("cont")  # a completed precopy leaves the source paused
    layout = round_trip(workdir, stream, "live", qemu_reads_original=True)
    assert layout.stats.resent_pages > 0, (layout.stats, st["ram"])
    assert layout.stats.unsent_pages == 0
    assert len(layout.records) > 20
    idstrs = {r.idstr for r in layout.records}
    assert {"cpu", "0000:00:03.0/virtio-blk", "0000:00:02.0/virtio-net"} <= idstrs


def test_background_snapshot_stream(source_vm: VM, workdir: pathlib.Path) -> None:
    caps = [{"capability": "background-snapshot", "state": True}]
    source_vm.cmd("migrate-set-capabilities", capabilities=caps)
    try:
        stream = workdir / "bg.bin"
        source_vm.migrate_to(stream)
    finally:
        caps[0]["state"] = False
        source_vm.cmd("migrate-set-capabilities", capabilities=caps)
    layout = round_trip(workdir, stream, "bg", qemu_reads_original=True)
    assert layout.stats.resent_pages == 0  # each page exactly once
    assert layout.stats.unsent_pages == 0


def hmp_registers(vm: VM) -> list[dict[str, int]]:
    """RIP/RSP/CR3 per vCPU as HMP ``info registers -a`` prints them (32- or 64-bit)."""
    text = vm.cmd("human-monitor-command", **{"command-line": "info registers -a"})
    cpus = []
    for part in re.split(r"^CPU#\d+", text, flags=re.M)[1:]:
        regs = {}
        for key, pat in (
            ("rip", r"\b[ER]IP=([0-9a-f]+)"),
            ("rsp", r"\b[ER]SP=([0-9a-f]+)"),
            ("cr3", r"\bCR3=([0-9a-f]+)"),
        ):
            m = re.search(pat, part)
            assert m, (key, part)
            regs[key] = int(m.group(1), 16)
        cpus.append(regs)
    return cpus


def test_stopped_stream_registers_and_missing_device_is_caught(
    source_vm: VM, workdir: pathlib.Path
) -> None:
    source_vm.cmd("stop")
    try:
        expected = hmp_registers(source_vm)
        stream = workdir / "stopped.bin"
        source_vm.migrate_to(stream)
    finally:
        source_vm.cmd("cont")
    layout = round_trip(workdir, stream, "stopped")
    # the decoder agrees with QEMU's own view of each vCPU (issue 6)
    _, sink = parse_file(stream)
    cpus = mc.decode_x86_cpus(layout, sink.dev)
    assert len(expected) == 2
    assert [{"rip": c.rip, "rsp": c.rsp, "cr3": c.cr3} for c in cpus] == expected
    # negative control on a real stream: drop virtio-blk's section from the stream bytes
    data = stream.read_bytes()
    rec = next(r for r in layout.records if r.idstr.endswith("/virtio-blk"))
    head = bytes([ms.SEC_FULL]) + rec.section_id.to_bytes(4, "big")
    start = data.index(head + bytes([len(rec.idstr)]) + rec.idstr.encode())
    end = start + 14 + len(rec.idstr) + rec.length + 5
    broken = workdir / "broken.bin"
    broken.write_bytes(data[:start] + data[end:])
    with pytest.raises(StreamError, match="virtio-blk"):
        parse_file(broken)


def test_skipping_zero_pages_on_a_fresh_destination(source_vm: VM, workdir: pathlib.Path) -> None:
    """Does a fresh ``-incoming`` QEMU need the ZERO records?  Measured, not assumed."""
    source_vm.cmd("stop")
    try:
        stream = workdir / "stopped-nozero.bin"
        source_vm.migrate_to(stream)
    finally:
        source_vm.cmd("cont")
    layout, orig = parse_file(stream)
    regen = workdir / "regen-nozero.bin"
    with open(regen, "wb") as f:
        ms.regenerate(layout, bytes(orig.dev), orig.source, f, send_zero_pages=False)
    _, back = parse_file(load_and_reexport(workdir, regen, "nozero"))
    differ = [n for n, img in orig.img.items() if back.img[n] != img]
    assert differ == []
