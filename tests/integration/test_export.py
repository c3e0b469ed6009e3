"""Forensic exports against a real guest: vmarchive's ELF core vs QEMU's own dump, disks, diff.

One 2-vCPU workload guest for the module.  While it is paused (so QEMU's dump and the
capture see the same instant): a capture (archive A), QEMU's ``dump-guest-memory``
(paging=false, through libvirt's memory-only core dump), ``info registers -a`` and a copy of
its disk.  Then it runs on, and archive B is captured for ``diff``; archive C stores memory
as an opaque stream (the bad-input case).

Checks and their negative controls:
* every PT_LOAD of the exported core equals QEMU's byte for byte -- a copy with one byte
  changed is caught;
* the notes equal QEMU's bytes, and RIP/RSP/CR3 agree with HMP for each vCPU -- the same
  check against the other vCPU's registers fails;
* the workload's pattern pages sit at the frames the guest printed, in the ELF and the raw
  export (and in QEMU's dump);
* Volatility 3 finds the same kernel banners in both cores -- not in a copy whose banner
  bytes are overwritten;
* export-disk compares equal (qemu-img compare) to the disk copied at the instant -- not
  after one byte is changed;
* diff A B shows the counter page changed and the pattern pages unchanged -- diff A A shows
  nothing changed;
* bad input: unknown archive, opaque archive, existing output: one line, exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass

import libvirt
import pytest

from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.memmap import MemoryMap, collect_memory_map
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops import diff as D
from vmarchive.ops.capture import CaptureOptions, capture
from vmarchive.ops.export import (
    DiskFormat,
    ExportDiskOptions,
    ExportMemoryOptions,
    MemoryFormat,
    export_disk,
    export_memory,
)
from vmarchive.ops.export_source import load_memory_map
from vmarchive.ops.repo import RepoRef
from vmarchive.store import InitOptions, Repository

pytestmark = pytest.mark.libvirt

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

VMARCHIVE = str(pathlib.Path(sys.executable).with_name("vmarchive"))
VOL = str(pathlib.Path(sys.executable).with_name("vol"))
PAGE = guestlib.PAGE


# --- reading ELF cores (independent of vmarchive's writer) -----------------------------------


@dataclass(frozen=True)
class Load:
    paddr: int
    offset: int
    size: int


def elf_loads(path: pathlib.Path) -> tuple[list[Load], bytes]:
    """PT_LOADs and the PT_NOTE bytes of an ELF64 little-endian core."""
    with path.open("rb") as f:
        eh = f.read(64)
        assert eh[:6] == b"\x7fELF\x02\x01", f"{path} is not an ELF64 LSB file"
        phoff, phnum = struct.unpack_from("<Q", eh, 32)[0], struct.unpack_from("<H", eh, 56)[0]
        f.seek(phoff)
        ph = f.read(56 * phnum)
        loads, notes = [], b""
        for i in range(phnum):
            ptype, _fl, off, _va, pa, filesz, _mem, _al = struct.unpack_from(
                "<IIQQQQQQ", ph, 56 * i
            )
            if ptype == 1:
                loads.append(Load(pa, off, filesz))
            elif ptype == 4:
                f.seek(off)
                notes = f.read(filesz)
    return loads, notes


def compare_loads(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """Problems found comparing every PT_LOAD of two cores (empty: identical)."""
    la, _ = elf_loads(a)
    lb, _ = elf_loads(b)
    if [(x.paddr, x.size) for x in la] != [(x.paddr, x.size) for x in lb]:
        return [f"segments differ: {la} vs {lb}"]
    problems = []
    with a.open("rb") as fa, b.open("rb") as fb:
        for x, y in zip(la, lb, strict=True):
            fa.seek(x.offset)
            fb.seek(y.offset)
            left = x.size
            pos = 0
            while left:
                n = min(left, 8 << 20)
                da, db = fa.read(n), fb.read(n)
                if da != db:
                    i = next(k for k in range(n) if da[k] != db[k])
                    problems.append(f"PT_LOAD at {x.paddr:#x} differs at {x.paddr + pos + i:#x}")
                    break
                left -= n
                pos += n
    return problems


def read_phys(path: pathlib.Path, loads: list[Load], addr: int, n: int = PAGE) -> bytes:
    for x in loads:
        if x.paddr <= addr < x.paddr + x.size:
            with path.open("rb") as f:
                f.seek(x.offset + addr - x.paddr)
                return f.read(n)
    raise AssertionError(f"{addr:#x} is in no PT_LOAD of {path}")


def notes_of(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    out, pos = [], 0
    while pos < len(blob):
        nsz, dsz, typ = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos : pos + nsz]
        pos += -(-nsz // 4) * 4
        out.append((name, typ, blob[pos : pos + dsz]))
        pos += -(-dsz // 4) * 4
    return out


def note_registers(blob: bytes) -> list[dict[str, int]]:
    """rip/rsp from each NT_PRSTATUS and cr3 from each QEMU note, per vCPU (pid order)."""
    notes = notes_of(blob)
    pr = [d for n, t, d in notes if n == b"CORE\0" and t == 1]
    qn = [d for n, t, d in notes if n == b"QEMU\0" and t == 0]
    assert len(pr) == len(qn) > 0
    out = []
    for p, q in zip(pr, qn, strict=True):
        regs = struct.unpack_from("<27Q", p, 112)
        out.append(
            {
                "pid": struct.unpack_from("<I", p, 32)[0],
                "rip": regs[16],
                "rsp": regs[19],
                "cr3": struct.unpack_from("<Q", q, 392 + 3 * 8)[0],
            }
        )
    return out


_HMP_CPU = re.compile(r"^CPU#(\d+)", re.M)


def hmp_registers(text: str) -> list[dict[str, int]]:
    """RIP/RSP/CR3 per vCPU from ``info registers -a`` (E-names for a vCPU in 32-bit mode)."""
    out = []
    parts = _HMP_CPU.split(text)[1:]
    for i in range(0, len(parts), 2):
        body = parts[i + 1]

        def reg(*names: str, body: str = body) -> int:
            for n in names:
                m = re.search(rf"\b{n}=([0-9a-f]+)", body)
                if m:
                    return int(m.group(1), 16)
            raise AssertionError(f"no {names} in {body[:200]}")

        out.append(
            {
                "pid": int(parts[i]) + 1,
                "rip": reg("RIP", "EIP"),
                "rsp": reg("RSP", "ESP"),
                "cr3": reg("CR3"),
            }
        )
    return out


def register_problems(notes: list[dict[str, int]], hmp: list[dict[str, int]]) -> list[str]:
    if len(notes) != len(hmp):
        return [f"{len(notes)} vCPUs in the notes, {len(hmp)} in HMP"]
    return [
        f"vCPU {h['pid'] - 1} {k}: note {n[k]:#x}, HMP {h[k]:#x}"
        for n, h in zip(notes, hmp, strict=True)
        for k in ("pid", "rip", "rsp", "cr3")
        if n[k] != h[k]
    ]


# --- the module's guest and archives -------------------------------------------------------


@dataclass
class Env:
    guest: guestlib.Guest
    repo: pathlib.Path
    dir: pathlib.Path
    a: str  # paused capture, same instant as qemu_core / disk_copy / hmp
    b: str  # later capture of the running guest
    c: str  # opaque memory stream
    qemu_core: pathlib.Path
    disk_copy: pathlib.Path
    hmp: str
    live_map: dict[str, object]
    patterns: dict[int, int]
    counter: int


def _vol_banners(core: pathlib.Path) -> set[str]:
    out = subprocess.run(
        [VOL, "-q", "-f", str(core), "banners.Banners"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    return {
        line.split("\t", 1)[1].strip() for line in out.splitlines() if "\tLinux version" in line
    }


@pytest.fixture(scope="module")
def env(
    libvirt_conn: libvirt.virConnect,
    guest_build: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("export")
    repo = base / "repo"
    Repository.init(str(repo), InitOptions()).close()
    (base / "state").mkdir()
    workdir = guestlib.make_workdir()
    g = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(params={"tick_ms": 100}), workdir)
    g.xml = g.xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
    assert "<vcpu>2</vcpu>" in g.xml

    def cap(**kw: object) -> str:
        opts = CaptureOptions(
            domain=g.name,
            repo=str(repo),
            uri=guestlib.URI,
            state_dir=base / "state",
            **kw,  # type: ignore[arg-type]
        )
        return capture(opts).id

    try:
        g.start()
        g.wait_up()
        g.wait_ticks(3)
        patterns, counter = g.serial.pattern_frames(), g.serial.counter_frame()
        assert len(patterns) == guestlib.NPATTERN and counter is not None
        g.dom.suspend()
        a = cap()
        with Connection.open(guestlib.URI) as c:
            q = QMP(c.lookup(g.name))
            hmp = q.hmp("info registers -a")
            live_map = collect_memory_map(q)
        qemu_core = workdir / "qemu.core"
        # libvirt's memory-only dump runs QEMU's dump-guest-memory with paging=false
        g.dom.coreDumpWithFormat(
            str(qemu_core), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY
        )
        disk_copy = base / "vda-at-instant.qcow2"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "qcow2", str(g.disk_paths[0]), str(disk_copy)],
            check=True,
        )
        assert g.dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED, "the guest must still be paused"
        mark = g.serial.mark()
        g.dom.resume()
        g.wait_ticks(3, since=mark)
        b = cap()
        opaque = cap(parse_memory=False)
        yield Env(
            g, repo, base, a, b, opaque, qemu_core, disk_copy, hmp, live_map, patterns, counter
        )
    finally:
        g.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def our_core(env: Env) -> pathlib.Path:
    out = env.dir / "vmarchive.core"
    r = export_memory(ExportMemoryOptions(RepoRef(str(env.repo)), env.a, out))
    assert r.vcpus == 2
    return out


def _corrupted_copy(src: pathlib.Path, dst: pathlib.Path, at: int, data: bytes) -> pathlib.Path:
    shutil.copyfile(src, dst)
    with dst.open("r+b") as f:
        f.seek(at)
        old = f.read(len(data))
        assert old != data
        f.seek(at)
        f.write(data)
    return dst


# --- tests ---------------------------------------------------------------------------------


def test_pt_loads_identical_to_qemu_dump(env: Env, our_core: pathlib.Path) -> None:
    ours, _ = elf_loads(our_core)
    assert len(ours) >= 2 and sum(x.size for x in ours) >= 160 << 20
    assert compare_loads(env.qemu_core, our_core) == []
    # negative control: one byte changed in the middle of guest RAM is found
    x = ours[0]
    at = x.offset + x.size // 2
    with our_core.open("rb") as f:
        f.seek(at)
        byte = f.read(1)
    bad = _corrupted_copy(our_core, env.dir / "corrupt.core", at, bytes([byte[0] ^ 0xFF]))
    try:
        problems = compare_loads(env.qemu_core, bad)
        assert problems == [f"PT_LOAD at {x.paddr:#x} differs at {x.paddr + x.size // 2:#x}"]
    finally:
        bad.unlink()


def test_notes_match_qemu_and_hmp(env: Env, our_core: pathlib.Path) -> None:
    _, ours = elf_loads(our_core)
    _, qemus = elf_loads(env.qemu_core)
    assert ours == qemus, "NT_PRSTATUS / QEMU notes differ from QEMU's"
    regs = note_registers(ours)
    hmp = hmp_registers(env.hmp)
    assert len(regs) == 2
    assert register_problems(regs, hmp) == []
    # negative control: the other vCPU's registers do not pass
    assert register_problems(regs, hmp[::-1]) != []


def test_pattern_pages_at_reported_frames(env: Env, our_core: pathlib.Path) -> None:
    loads, _ = elf_loads(our_core)
    qloads, _ = elf_loads(env.qemu_core)
    raw = env.dir / "vmarchive.raw"
    r = export_memory(ExportMemoryOptions(RepoRef(str(env.repo)), env.a, raw, MemoryFormat.RAW))
    try:
        assert raw.stat().st_size == r.size == 1 << 32  # pc.bios ends at 4 GiB
        assert raw.stat().st_blocks * 512 < 512 << 20, "the raw image is not sparse"
        with raw.open("rb") as f:
            for i, pfn in env.patterns.items():
                want = guestlib.pattern_page(i)
                assert read_phys(our_core, loads, pfn * PAGE) == want, f"pattern {i} (ELF)"
                assert read_phys(env.qemu_core, qloads, pfn * PAGE) == want, f"pattern {i} (QEMU)"
                f.seek(pfn * PAGE)
                assert f.read(PAGE) == want, f"pattern {i} (raw)"
            # negative control: the frame next to the block is not pattern i
            lowest = min(env.patterns.values())
            f.seek((lowest - 1) * PAGE)
            assert f.read(PAGE) not in {guestlib.pattern_page(i) for i in env.patterns}
            f.seek(env.counter * PAGE)
            cp = guestlib.parse_counter_page(f.read(PAGE))
            assert cp is not None and cp.boot_id == env.guest.boot_id
    finally:
        raw.unlink()


def test_map_recorded_by_capture_equals_collect_memory_map(env: Env) -> None:
    with Repository.open(str(env.repo)) as repo:
        archived = load_memory_map(repo, repo.load_archive(env.a))
    live = MemoryMap.from_json(env.live_map["memory_map"])
    assert archived == live
    assert env.live_map["vcpus"] == 2 and env.live_map["arch"] == "x86_64"


def test_volatility_reads_both_cores_alike(env: Env, our_core: pathlib.Path) -> None:
    ours = _vol_banners(our_core)
    assert ours, "Volatility found no Linux banner in the exported core"
    assert ours == _vol_banners(env.qemu_core)
    build = guestlib.guest_build()
    assert any(build["kernel_version"] in b for b in ours)
    # negative control: overwrite every banner's "Linux version" in a copy: none is found
    data_loads, _ = elf_loads(our_core)
    bad = env.dir / "nobanner.core"
    shutil.copyfile(our_core, bad)
    try:
        with bad.open("r+b") as f:
            for x in data_loads:
                f.seek(x.offset)
                pos, chunk = 0, 8 << 20
                while pos < x.size:
                    f.seek(x.offset + pos)
                    buf = f.read(min(chunk + 64, x.size - pos))
                    for m in re.finditer(rb"Linux version \d", buf):
                        f.seek(x.offset + pos + m.start())
                        f.write(b"Xinux")
                    pos += chunk
        assert _vol_banners(bad) == set()
    finally:
        bad.unlink()


@pytest.mark.parametrize("fmt", [DiskFormat.QCOW2, DiskFormat.RAW])
def test_export_disk_equals_copy_at_instant(env: Env, fmt: DiskFormat) -> None:
    out = env.dir / f"vda.{fmt.value}"
    export_disk(ExportDiskOptions(RepoRef(str(env.repo)), env.a, "vda", out, fmt))
    try:
        cmp = subprocess.run(
            ["qemu-img", "compare", "-f", fmt.value, "-F", "qcow2", str(out), str(env.disk_copy)],
            capture_output=True,
            text=True,
        )
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        if fmt == DiskFormat.RAW:
            # negative control: the tick block changed by one byte is noticed
            with out.open("r+b") as f:
                f.seek(guestlib.TICK_OFFSET + 20)
                b = f.read(1)
                f.seek(guestlib.TICK_OFFSET + 20)
                f.write(bytes([b[0] ^ 1]))
            cmp = subprocess.run(
                ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(out), str(env.disk_copy)],
                capture_output=True,
                text=True,
            )
            assert cmp.returncode == 1, cmp.stdout + cmp.stderr
    finally:
        out.unlink()


def _changed(r: D.DiffResult, addr: int) -> bool:
    assert r.physical is not None
    return any(p.address <= addr < p.address + p.length for p in r.physical)


def test_diff_counter_changed_patterns_unchanged(env: Env) -> None:
    with Repository.open(str(env.repo)) as repo:
        a, b = repo.load_archive(env.a), repo.load_archive(env.b)
        r = D.diff_archives(repo, a, b)
        same = D.diff_archives(repo, a, a)
        (ram,) = [s for s in a.streams if s.kind == "ram" and s.attrs.get("block") == "pc.ram"]
    gran = ram.chunk_size
    assert _changed(r, env.counter * PAGE), "the counter page is not reported changed"
    # Pattern pages are never written again; a chunk that holds only pattern pages must be
    # unchanged (chunks shared with other pages may change because of those pages).
    frames = set(env.patterns.values())
    only_patterns = [
        pfn
        for pfn in frames
        if all(
            f in frames
            for f in range(
                pfn // (gran // PAGE) * (gran // PAGE), (pfn // (gran // PAGE) + 1) * (gran // PAGE)
            )
        )
    ]
    # the 64 pages are allocated together; at least one chunk must hold nothing else
    assert len(only_patterns) >= gran // PAGE
    assert [pfn for pfn in only_patterns if _changed(r, pfn * PAGE)] == []
    # --exact narrows to pages: every one of the 64 pattern pages is unchanged
    with Repository.open(str(env.repo)) as repo:
        exact = D.diff_archives(repo, repo.load_archive(env.a), repo.load_archive(env.b), True)
    assert _changed(exact, env.counter * PAGE)
    assert [pfn for pfn in sorted(frames) if _changed(exact, pfn * PAGE)] == []
    assert exact.physical is not None and r.physical is not None
    assert sum(p.length for p in exact.physical) < sum(p.length for p in r.physical)
    # negative control: the same archive against itself changes nothing, counter included
    assert same.physical == [] and not _changed(same, env.counter * PAGE)
    assert all(d.changed == [] for d in same.disks) and same.devstate_changed is False


def test_diff_cli_json(env: Env) -> None:
    out = subprocess.run(
        [VMARCHIVE, "diff", "--repo", str(env.repo), "--json", env.a[:12], env.b[:12]],
        capture_output=True,
        text=True,
        check=True,
    )
    js = json.loads(out.stdout)
    assert any(
        p["address"] <= env.counter * PAGE < p["address"] + p["length"] for p in js["physical"]
    )
    assert {d["name"] for d in js["disks"]} == {"vda"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VMARCHIVE, *args], capture_output=True, text=True)


def test_bad_input(env: Env) -> None:
    repo = ["--repo", str(env.repo)]
    out = env.dir / "bad.core"
    r = _cli("export-memory", "deadbeef00", "-o", str(out), *repo)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "deadbeef00" in r.stderr
    r = _cli("export-memory", env.c, "-o", str(out), *repo)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "opaque migration stream" in r.stderr and "guest-physical" in r.stderr
    assert not out.exists()
    out.write_bytes(b"precious")
    with contextlib.ExitStack() as stack:
        stack.callback(out.unlink)
        r = _cli("export-memory", env.a, "-o", str(out), *repo)
        assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
        assert out.read_bytes() == b"precious"
        r = _cli("export-disk", env.a, "--disk", "vda", "-o", str(out), "--format", "qcow2", *repo)
        assert r.returncode == 2 and out.read_bytes() == b"precious"
        r = _cli("export-disk", env.a, "--disk", "vdq", "-o", str(env.dir / "x"), *repo)
        assert r.returncode == 2 and "vdq" in r.stderr and "vda" in r.stderr
        r = _cli("diff", env.a, "nothere", *repo)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        # the opaque archive still diffs on disks, and says why RAM is not compared
        r = _cli("diff", env.a, env.c, *repo)
        assert r.returncode == 0 and "opaque migration stream" in r.stdout
        r = _cli("export-memory", env.a, "-o", str(out), "--force", "--no-progress", *repo)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:4] == b"\x7fELF"
    assert not any(p.name.startswith(".bad.core") for p in env.dir.iterdir()), "temporary left"


def test_guest_paused_at_reset_matches_qemu_dump(
    libvirt_conn: libvirt.virConnect, env: Env, tmp_path: pathlib.Path
) -> None:
    """Before the firmware runs, the memory map differs (no PAM shadowing yet: option ROM
    and BIOS alias below 1 MiB) and no vCPU is in long mode (QEMU writes EM_386 and i386
    NT_PRSTATUS notes).  The export must follow both."""
    workdir = guestlib.make_workdir()
    g = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(), workdir)
    try:
        g.create_disks()
        libvirt_conn.createXML(g.xml, libvirt.VIR_DOMAIN_START_PAUSED)
        opts = CaptureOptions(
            domain=g.name, repo=str(env.repo), uri=guestlib.URI, state_dir=env.dir / "state"
        )
        aid = capture(opts).id
        qemu_core = workdir / "qemu.core"
        g.dom.coreDumpWithFormat(
            str(qemu_core), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY
        )
        ours = tmp_path / "reset.core"
        export_memory(ExportMemoryOptions(RepoRef(str(env.repo)), aid, ours))
        loads, notes = elf_loads(ours)
        _, qemu_notes = elf_loads(qemu_core)
        assert len(loads) == 5, [hex(x.paddr) for x in loads]  # booted guests have 2
        assert compare_loads(qemu_core, ours) == []
        assert notes == qemu_notes
        with ours.open("rb") as a, qemu_core.open("rb") as b:
            machines = {struct.unpack_from("<H", f.read(20), 18)[0] for f in (a, b)}
        assert machines == {3}  # EM_386
    finally:
        g.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def test_export_memory_is_streaming(env: Env) -> None:
    """Python allocations during an export stay far below the guest's 160 MiB of RAM."""
    out = env.dir / "streaming.core"
    tracemalloc.start()
    try:
        export_memory(ExportMemoryOptions(RepoRef(str(env.repo)), env.a, out))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        # negative control: the instrument does see a buffer of the guest's RAM size
        held = bytearray(160 << 20)
        control = tracemalloc.get_traced_memory()[1]
        del held
    finally:
        tracemalloc.stop()
        out.unlink()
    assert peak < 20 << 20, f"export peaked at {peak >> 20} MiB of Python memory"
    assert control >= 160 << 20


def test_q35_guest_with_vga_matches_qemu_dump(
    libvirt_conn: libvirt.virConnect, env: Env, tmp_path: pathlib.Path
) -> None:
    """A device RAMBlock (``0000:00:01.0/vga.vram`` behind the region ``vga.vram``) on a
    q35 machine: four PT_LOADs (low RAM, RAM above the VGA window, VRAM at its PCI BAR,
    BIOS), all byte-identical to QEMU's dump."""
    workdir = guestlib.make_workdir()
    g = guestlib.Guest(libvirt_conn, guestlib.GuestSpec(machine="q35"), workdir)
    video = "<video><model type='vga'/></video>"
    g.xml = g.xml.replace("<memballoon model='none'/>", f"<memballoon model='none'/>\n    {video}")
    assert video in g.xml
    try:
        g.start()
        g.wait_up()
        g.dom.suspend()
        opts = CaptureOptions(
            domain=g.name, repo=str(env.repo), uri=guestlib.URI, state_dir=env.dir / "state"
        )
        aid = capture(opts).id
        qemu_core = workdir / "qemu.core"
        g.dom.coreDumpWithFormat(
            str(qemu_core), libvirt.VIR_DOMAIN_CORE_DUMP_FORMAT_RAW, libvirt.VIR_DUMP_MEMORY_ONLY
        )
        ours = tmp_path / "q35.core"
        r = export_memory(ExportMemoryOptions(RepoRef(str(env.repo)), aid, ours))
        assert any(str(s["block"]).endswith("/vga.vram") for s in r.segments), r.segments
        loads, notes = elf_loads(ours)
        assert len(loads) == 4, [hex(x.paddr) for x in loads]
        assert compare_loads(qemu_core, ours) == []
        assert notes == elf_loads(qemu_core)[1]
    finally:
        g.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
