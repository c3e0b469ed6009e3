"""export-memory / export-disk on small synthetic archives built with the store API.

No QEMU: the archive holds a RAM block with known pages, a memory map that places it at two
guest-physical ranges (with a gap, like the PCI hole), a synthetic ``cpu`` device state and
a disk.  The ELF output is read back with the independent reader of test_elfcore.py.
"""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any

import pytest
from test_elfcore import read_ehdr, read_notes, read_phdrs
from test_elfcore_memmap import _FIELDS, PC_MTREE, PC_RAMBLOCK, _layout
from test_restore_writeback import record_writeback_starts

from vmarchive.errors import AlreadyExistsError, FormatError, NotFoundError
from vmarchive.hypervisor.memmap import MemoryMap, MemRange
from vmarchive.ops import export as X
from vmarchive.ops.export_source import NoMemoryMapError
from vmarchive.ops.repo import RepoRef
from vmarchive.store import InitOptions, Repository

PAGE = 4096
RAM = 64 * PAGE  # a 256 KiB "pc.ram"
BIOS = 16 * PAGE


def page(tag: int) -> bytes:
    return bytes([tag % 251 + 1]) * 16 + tag.to_bytes(8, "little") + bytes(PAGE - 24)


def ram_image() -> bytes:
    img = bytearray(RAM)
    for p in range(0, 64, 3):  # every third page has data, the rest are holes
        img[p * PAGE : (p + 1) * PAGE] = page(p)
    return bytes(img)


MAP = MemoryMap(
    (
        MemRange(0, 32 * PAGE, "pc.ram", 0, False),
        MemRange(0x100000, 32 * PAGE, "pc.ram", 32 * PAGE, False),
        MemRange(0x200000, BIOS, "pc.bios", 0, True),
    )
)


def make_archive(
    repo: Repository,
    *,
    memory_map: bool = True,
    mtree: bool = False,
    opaque: bool = False,
    disk: bytes | None = None,
) -> str:
    layout, dev = _layout(_FIELDS)
    meta: dict[str, Any] = {"time": "2026-11-25T21:00:00Z", "domain": "vm1", "kind": "full"}
    if memory_map:
        meta |= {"memory_map": MAP.to_json(), "vcpus": 2, "arch": "x86_64"}
    with repo.writer() as w:
        if opaque:
            sw = w.stream("migration", "stream", 8192, attrs={"refused": "unknown section"})
            sw.write(0, b"QEVM" + bytes(8188))
            sw.close()
        else:
            for name, data in (("pc.ram", ram_image()), ("pc.bios", b"\xb1" * BIOS)):
                sw = w.stream(
                    f"ram:{name}", "ram", len(data), attrs={"block": name, "page_size": PAGE}
                )
                sw.write(0, data)
                sw.close()
            sw = w.stream("devstate", "devstate", len(dev), attrs={"layout": layout.to_json()})
            sw.write(0, dev)
            sw.close()
        if mtree:
            for name, text in (("mtree.txt", PC_MTREE), ("ramblock.txt", PC_RAMBLOCK)):
                sw = w.stream(name, "meta", len(text))
                sw.write(0, text.encode())
                sw.close()
        if disk is not None:
            sw = w.stream("disk:vda", "disk", len(disk), attrs={"target": "vda", "format": "raw"})
            sw.write(0, disk)
            sw.close()
        return w.commit(meta)


@pytest.fixture
def repo_path(tmp_path: pathlib.Path) -> pathlib.Path:
    p = tmp_path / "repo"
    Repository.init(str(p), InitOptions(memory_chunk_size=16 * 1024, disk_chunk_size=8192)).close()
    return p


def phys(addr: int) -> bytes:
    """The expected 4 KiB at guest-physical ``addr`` (zeros where nothing is mapped)."""
    img = ram_image()
    for r in MAP.ranges:
        if r.start <= addr < r.end:
            if r.block == "pc.bios":
                return b"\xb1" * PAGE
            off = r.offset + addr - r.start
            return img[off : off + PAGE]
    return bytes(PAGE)


def test_elf_export_places_pages_and_notes(repo_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with Repository.open(str(repo_path)) as repo:
        aid = make_archive(repo)
    out = tmp_path / "core"
    r = X.export_memory(X.ExportMemoryOptions(RepoRef(str(repo_path)), aid[:8], out))
    data = out.read_bytes()
    assert r.size == len(data) and r.vcpus == 2
    assert read_ehdr(data)["machine"] == 62
    ph = read_phdrs(data)
    assert [(p["paddr"], p["filesz"]) for p in ph[1:]] == [
        (0, 32 * PAGE),
        (0x100000, 32 * PAGE),
        (0x200000, BIOS),
    ]
    for p in ph[1:]:
        for a in range(0, p["filesz"], PAGE):
            got = data[p["offset"] + a : p["offset"] + a + PAGE]
            assert got == phys(p["paddr"] + a), hex(p["paddr"] + a)
    notes = read_notes(data[ph[0]["offset"] : ph[0]["offset"] + ph[0]["filesz"]])
    assert [(n[0], n[1]) for n in notes] == [(b"CORE\0", 1)] * 2 + [(b"QEMU\0", 0)] * 2


def test_raw_export_by_physical_address(repo_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with Repository.open(str(repo_path)) as repo:
        aid = make_archive(repo)
    out = tmp_path / "raw"
    r = X.export_memory(
        X.ExportMemoryOptions(RepoRef(str(repo_path)), aid, out, X.MemoryFormat.RAW)
    )
    data = out.read_bytes()
    assert len(data) == r.size == 0x200000 + BIOS
    for a in range(0, len(data), PAGE):
        assert data[a : a + PAGE] == phys(a), hex(a)


def test_map_from_mtree_streams_when_metadata_lacks_it(
    repo_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with Repository.open(str(repo_path)) as repo:
        aid = make_archive(repo, memory_map=False, mtree=True)
    # PC_MTREE maps 160 MiB of pc.ram: more than this archive's block holds
    with pytest.raises(FormatError, match="past the end of RAM block"):
        X.export_memory(X.ExportMemoryOptions(RepoRef(str(repo_path)), aid, tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_refusals(repo_path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    ref = RepoRef(str(repo_path))
    with Repository.open(str(repo_path)) as repo:
        no_map = make_archive(repo, memory_map=False)
        opaque = make_archive(repo, memory_map=False, opaque=True)
        good = make_archive(repo, disk=b"d" * 8192 + bytes(8192))
    with pytest.raises(NoMemoryMapError, match="records no guest-physical memory map"):
        X.export_memory(X.ExportMemoryOptions(ref, no_map, tmp_path / "a"))
    with pytest.raises(NoMemoryMapError, match=r"opaque migration stream.*unknown section"):
        X.export_memory(X.ExportMemoryOptions(ref, opaque, tmp_path / "a"))
    with pytest.raises(NotFoundError):
        X.export_memory(X.ExportMemoryOptions(ref, "ffffffff", tmp_path / "a"))
    existing = tmp_path / "exists"
    existing.write_bytes(b"keep me")
    with pytest.raises(AlreadyExistsError, match="--force"):
        X.export_memory(X.ExportMemoryOptions(ref, good, existing))
    assert existing.read_bytes() == b"keep me"
    X.export_memory(X.ExportMemoryOptions(ref, good, existing, force=True))
    assert existing.read_bytes()[:4] == b"\x7fELF"
    with pytest.raises(NotFoundError, match=r"has no disk 'vdb'.*vda"):
        X.export_disk(X.ExportDiskOptions(ref, good, "vdb", tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "repo"]  # no leftovers


@pytest.mark.qemu  # qemu-img writes and checks the images
@pytest.mark.parametrize("fmt", [X.DiskFormat.RAW, X.DiskFormat.QCOW2])
def test_disk_export(repo_path: pathlib.Path, tmp_path: pathlib.Path, fmt: X.DiskFormat) -> None:
    disk = bytes(8192) + b"x" * 8192 + bytes(3 * 8192) + b"y" * 100 + bytes(8092)
    with Repository.open(str(repo_path)) as repo:
        aid = make_archive(repo, disk=disk)
    out = tmp_path / f"vda.{fmt.value}"
    X.export_disk(X.ExportDiskOptions(RepoRef(str(repo_path)), aid, "vda", out, fmt))
    raw = tmp_path / "check.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt.value, "-O", "raw", str(out), str(raw)], check=True
    )
    assert raw.read_bytes() == disk
    info = subprocess.run(
        ["qemu-img", "info", str(out)], capture_output=True, text=True, check=True
    )
    assert f"file format: {fmt.value}" in info.stdout


@pytest.mark.parametrize("what", ["raw", "qcow2", "elf"])
def test_exports_go_to_writeback_while_written(
    repo_path: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    """Every export writes through fileio.ImageWriter: with a threshold of 8 KiB the
    writeback of what was written starts along the way, and the file is still right."""
    started = record_writeback_starts(monkeypatch, 8192)
    disk = b"x" * 8192 + bytes(8192) + b"y" * 16384
    with Repository.open(str(repo_path)) as repo:
        aid = make_archive(repo, disk=disk)
    out = tmp_path / f"out.{what}"
    ref = RepoRef(str(repo_path))
    if what == "elf":
        X.export_memory(X.ExportMemoryOptions(ref, aid, out, X.MemoryFormat.ELF))
        phdrs = read_phdrs(out.read_bytes())
        assert sum(p["filesz"] for p in phdrs) >= RAM  # the file itself is tested above
    else:
        X.export_disk(X.ExportDiskOptions(ref, aid, "vda", out, X.DiskFormat(what)))
        if what == "raw":
            assert out.read_bytes() == disk
    assert started and all(n >= 8192 for _o, n in started)


@pytest.mark.qemu  # qemu-img checks the images
@pytest.mark.parametrize(
    ("chunk", "size", "at"),
    [
        # chunks smaller than a qcow2 cluster; data in the first and the last (short) slot
        (4096, 5 * 65536 + 8192 + 512, [0, 5 * 65536 + 8192]),
        # a 3 GiB disk: data in several L2 tables (512 MiB each) and refcount coverage
        (262144, 3 << 30, [0, 262144 * 3, 600 << 20, (3 << 30) - 262144]),
    ],
)
def test_qcow2_writer_against_qemu_img(
    tmp_path: pathlib.Path, chunk: int, size: int, at: list[int]
) -> None:
    p = tmp_path / "repo"
    Repository.init(str(p), InitOptions(disk_chunk_size=chunk)).close()
    expect = tmp_path / "expect.raw"
    with Repository.open(str(p)) as repo, expect.open("wb") as f:
        f.truncate(size)
        with repo.writer() as w:
            sw = w.stream("disk:vdb", "disk", size, attrs={"target": "vdb"})
            for k, off in enumerate(at):
                data = bytes([k + 1]) * min(chunk, size - off)
                sw.write(off, data)
                f.seek(off)
                f.write(data)
            sw.close()
            aid = w.commit({"time": "2026-11-25T21:00:00Z", "domain": "vm1", "kind": "disks"})
    out = tmp_path / "vdb.qcow2"
    r = X.export_disk(X.ExportDiskOptions(RepoRef(str(p)), aid, "vdb", out, X.DiskFormat.QCOW2))
    check = subprocess.run(["qemu-img", "check", str(out)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(expect)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert r.size < 4 << 20  # holes are unallocated clusters
    # negative control: the comparison notices one changed byte of data
    with expect.open("r+b") as f:
        f.seek(at[-1])
        f.write(b"\xee")
    cmp = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(out), str(expect)],
        capture_output=True,
        text=True,
    )
    assert cmp.returncode == 1
