"""The guest-physical memory map: QEMU 7.2 ``info mtree -f`` / ``info ramblock`` text parsing,
QEMU's dump-block merging, the JSON form, and the register extraction for notes."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from vmarchive.errors import FormatError, StreamError
from vmarchive.format import elfcore_x86
from vmarchive.format import migstream as ms
from vmarchive.hypervisor import memmap as M

# Trimmed from a real 160 MiB pc-i440fx-7.2 guest (QEMU 7.2): the I/O view comes first,
# the "memory" view later, the SMM view after it (same ranges, must not be mixed in).
PC_MTREE = """FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000010-000000000000001f (prio 0, i/o): io @0000000000000010

FlatView #4
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 AS "cpu-memory-1", root: system
 AS "virtio-blk-pci", root: bus master container
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): pc.ram @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): pc.ram @00000000000f0000
  0000000000100000-0000000009ffffff (prio 0, ram): pc.ram @0000000000100000
  00000000febf8000-00000000febf8fff (prio 0, i/o): virtio-pci-common-virtio-blk
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios

FlatView #5
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-00000000000c2fff (prio 0, ram): pc.ram
  00000000000a0000-00000000000bffff (prio 1, ram): smram @0000000000000000
"""

PC_RAMBLOCK = """              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x000000000a000000 0x000000000a000000
                 pc.bios    4 KiB  0x000000000a000000 0x0000000000040000 0x0000000000040000
                  pc.rom    4 KiB  0x000000000a040000 0x0000000000020000 0x0000000000020000
"""

# Synthetic, in QEMU's format: a q35-like guest with VGA, RAM above 4 GiB, a pflash ROM
# device, an NVDIMM and KVM annotations.
Q35_MTREE = """FlatView #1
 AS "memory", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-000000007fffffff (prio 0, ram): pc.ram @00000000000c0000 KVM
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram KVM
  00000000ffc00000-00000000ffffffff (prio 0, romd): system.flash0 KVM
  0000000100000000-000000017fffffff (prio 0, ram): pc.ram @0000000080000000 KVM
  0000000180000000-00000001801fffff (prio 0, nv-ram): nvdimm0 KVM
"""
Q35_RAMBLOCK = """              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000100000000 0x0000000100000000
   0000:00:01.0/vga.vram    4 KiB  0x0000000100000000 0x0000000001000000 0x0000000001000000
          system.flash0    4 KiB  0x0000000101000000 0x0000000000400000 0x0000000000400000
"""


def test_pc_map_from_real_text() -> None:
    m = M.build_memory_map(PC_MTREE, PC_RAMBLOCK)
    assert [(r.start, r.size, r.block, r.offset, r.readonly) for r in m.ranges] == [
        (0, 0xC3000, "pc.ram", 0, False),
        (0xC3000, 0x25000, "pc.ram", 0xC3000, True),
        (0xE8000, 0x8000, "pc.ram", 0xE8000, False),
        (0xF0000, 0x10000, "pc.ram", 0xF0000, True),
        (0x100000, 0x9F00000, "pc.ram", 0x100000, False),
        (0xFFFC0000, 0x40000, "pc.bios", 0, True),
    ]
    # QEMU's dump-guest-memory wrote exactly these two PT_LOADs for this guest
    assert [(b.start, b.size, b.block) for b in m.dump_blocks()] == [
        (0, 0xA000000, "pc.ram"),
        (0xFFFC0000, 0x40000, "pc.bios"),
    ]


def test_q35_like_map() -> None:
    m = M.build_memory_map(Q35_MTREE, Q35_RAMBLOCK)
    got = [(r.start, r.block, r.offset) for r in m.dump_blocks()]
    assert got == [
        (0, "pc.ram", 0),  # 0-0x9ffff and 0xc0000-... are not contiguous: two blocks
        (0xC0000, "pc.ram", 0xC0000),
        (0xFD000000, "0000:00:01.0/vga.vram", 0),
        (0x100000000, "pc.ram", 0x80000000),
    ]  # romd (pflash), nv-ram (NVDIMM) and I/O are left out, as QEMU's dump does


def test_ambiguous_or_unknown_region_refused() -> None:
    two = (
        Q35_RAMBLOCK
        + "   0000:00:02.0/vga.vram    4 KiB  0x0 0x0000000001000000 0x0000000001000000\n"
    )
    with pytest.raises(FormatError, match="no single RAM block"):
        M.build_memory_map(Q35_MTREE, two)
    with pytest.raises(FormatError, match="no single RAM block"):
        M.build_memory_map(PC_MTREE, PC_RAMBLOCK.replace("pc.bios", "other"))
    with pytest.raises(FormatError, match="reaches past"):
        M.build_memory_map(
            PC_MTREE,
            PC_RAMBLOCK.replace(
                "0x000000000a000000 0x000000000a000000", "0x0000000000100000 0x000000000a000000"
            ),
        )
    with pytest.raises(FormatError, match="no flat view"):
        M.build_memory_map('FlatView #0\n AS "I/O", root: io\n', PC_RAMBLOCK)
    with pytest.raises(FormatError, match="no RAM blocks"):
        M.build_memory_map(PC_MTREE, "")


def test_json_round_trip_and_validation() -> None:
    m = M.build_memory_map(PC_MTREE, PC_RAMBLOCK)
    js = json.loads(json.dumps(m.to_json()))
    assert js["version"] == 1 and js["ranges"][0] == {
        "start": 0, "size": 0xC3000, "block": "pc.ram", "offset": 0, "readonly": False,
    }  # fmt: skip
    assert M.MemoryMap.from_json(js) == m
    bad: dict[str, Any] = json.loads(json.dumps(js))
    bad["ranges"][1]["start"] = 0x1000
    with pytest.raises(FormatError, match="overlap"):
        M.MemoryMap.from_json(bad)
    with pytest.raises(FormatError, match="version"):
        M.MemoryMap.from_json({**js, "version": 2})
    with pytest.raises(FormatError, match="malformed"):
        M.MemoryMap.from_json(
            {**js, "ranges": [{"start": -1, "size": 1, "block": "x", "offset": 0}]}
        )
    with pytest.raises(FormatError):
        M.MemoryMap.from_json([])


class FakeQMP:
    """Answers the commands collect_memory_map may send, like QEMU 7.2 does (``old``: like
    a QEMU before 3.0, whose query-cpus-fast names no target)."""

    def __init__(self, old: bool = False) -> None:
        self.sent: list[str] = []
        self.old = old

    def hmp(self, line: str) -> str:
        self.sent.append(line)
        return {"info mtree -f": PC_MTREE, "info ramblock": PC_RAMBLOCK}[line]

    def execute(self, cmd: str, args: object = None) -> Any:
        self.sent.append(cmd)
        if cmd == "query-cpus-fast":
            cpus = [{"cpu-index": 0, "target": "x86_64"}, {"cpu-index": 1, "target": "x86_64"}]
            return [{"cpu-index": c["cpu-index"]} for c in cpus] if self.old else cpus
        assert cmd == "query-target"
        return {"arch": "x86_64"}


def test_collect_fills_exactly_the_documented_keys() -> None:
    q = FakeQMP()
    got = M.collect_memory_map(q)  # type: ignore[arg-type]
    assert set(got) == set(M.METADATA_KEYS)
    assert got["vcpus"] == 2 and got["arch"] == "x86_64"
    assert M.MemoryMap.from_json(got["memory_map"]) == M.build_memory_map(PC_MTREE, PC_RAMBLOCK)
    json.dumps(got)  # JSON-able
    # the vCPUs name the arch: no query-target
    assert q.sent == ["info mtree -f", "info ramblock", "query-cpus-fast"]


def test_collect_asks_for_the_target_when_the_vcpus_do_not_name_it() -> None:
    q = FakeQMP(old=True)
    got = M.collect_memory_map(q)  # type: ignore[arg-type]
    assert q.sent == ["info mtree -f", "info ramblock", "query-cpus-fast", "query-target"]
    assert got == M.collect_memory_map(FakeQMP())  # type: ignore[arg-type]


def test_collect_parses_texts_it_is_given_without_asking_again() -> None:
    q = FakeQMP()
    got = M.collect_memory_map(q, PC_MTREE, PC_RAMBLOCK)  # type: ignore[arg-type]
    assert q.sent == ["query-cpus-fast"]
    assert got == M.collect_memory_map(FakeQMP())  # type: ignore[arg-type]


# --- registers for the notes, from a synthetic cpu section ------------------------------------

_SEG = {
    "vmsd_name": "segment",
    "version": 1,
    "fields": [
        {"name": "selector", "type": "uint32", "size": 4},
        {"name": "base", "type": "uint64", "size": 8},
        {"name": "limit", "type": "uint32", "size": 4},
        {"name": "flags", "type": "uint32", "size": 4},
    ],
}


def _f(name: str, size: int = 8, n: int = 1, struct_: Any = None) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "type": "struct" if struct_ else "uint64", "size": size}
    if n > 1:
        d["array_len"] = n
    if struct_:
        d["struct"] = struct_
    return d


_FIELDS = [
    _f("env.regs", 8, 16),
    _f("env.eip"),
    _f("env.eflags"),
    _f("env.segs", 20, 6, _SEG),
    _f("env.ldt", 20, 1, _SEG),
    _f("env.tr", 20, 1, _SEG),
    _f("env.gdt", 20, 1, _SEG),
    _f("env.idt", 20, 1, _SEG),
    _f("env.cr[0]"),
    _f("env.cr[2]"),
    _f("env.cr[3]"),
    _f("env.cr[4]"),
    _f("env.efer"),
    _f("env.kernelgsbase"),
]


def _seg(sel: int, base: int, limit: int, flags: int) -> bytes:
    return struct.pack(">IQII", sel, base, limit, flags)


def _cpu(k: int) -> bytes:
    b = struct.pack(">16Q", *[(k << 32) | (i + 1) for i in range(16)])
    b += struct.pack(">QQ", 0xFFFFFFFF81000000 + k, 0x246)
    b += b"".join(_seg(0x10 + i, 0x1000 * i, 0xFFFFF, 0xC09300) for i in range(6))
    b += _seg(0x28, 0xAAAA0000 + k, 0xFFFF, 0x8200)  # ldt
    b += _seg(0x40, 0xFFFFFE0000003000 + k, 0x4087, 0x8900)  # tr
    b += _seg(0, 0xFFFFFE0000001000, 0x7F, 0) + _seg(0, 0xFFFFFE0000000000, 0xFFF, 0)
    b += struct.pack(">6Q", 0x80050033, 0xDEAD, 0x2A92000 + k, 0x6B0, 0xD01, 0x4242)
    return b


def _layout(fields: list[dict[str, Any]]) -> tuple[ms.StreamLayout, bytes]:
    dev = bytearray()
    records, devices = [], []
    for k in range(2):
        body = _cpu(k)
        records.append(ms.SectionRecord(ms.SEC_FULL, 4 + k, "cpu", k, 12, len(dev), len(body)))
        devices.append({"name": "cpu", "instance_id": k, "fields": fields})
        dev += body
    layout = ms.StreamLayout(
        version=3,
        configuration=b"",
        ram=ms.RamSection(2, 0, 4),
        ram_blocks=[ms.RamBlock(0, "pc.ram", 4096)],
        records=records,
        vmdesc=json.dumps({"devices": devices}).encode(),
    )
    return layout, bytes(dev)


def test_registers_for_notes_include_ldt_and_tr() -> None:
    layout, dev = _layout(_FIELDS)
    cpus = elfcore_x86.x86_registers(layout, dev)
    assert [c.index for c in cpus] == [0, 1]
    for k, c in enumerate(cpus):
        assert c.gprs["rax"] == (k << 32) | 1 and c.gprs["rsp"] == (k << 32) | 5
        assert c.gprs["r15"] == (k << 32) | 16 and c.rip == 0xFFFFFFFF81000000 + k
        assert c.segments["ldt"].base == 0xAAAA0000 + k and c.segments["ldt"].selector == 0x28
        assert c.segments["tr"].base == 0xFFFFFE0000003000 + k and c.segments["tr"].limit == 0x4087
        assert c.segments["gdt"].limit == 0x7F and c.segments["cs"].selector == 0x11
        assert c.cr == (0x80050033, 0, 0xDEAD, 0x2A92000 + k, 0x6B0)
        assert c.kernel_gs_base == 0x4242


def test_registers_missing_tr_is_an_error() -> None:
    fields = [_f("env.tr_renamed", 20, 1, _SEG) if f["name"] == "env.tr" else f for f in _FIELDS]
    layout, dev = _layout(fields)
    with pytest.raises(StreamError, match=r"env\.tr"):
        elfcore_x86.x86_registers(layout, dev)
