"""Unit tests of the vCPU register decoder on a synthetic ``cpu`` section + vmdesc."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from vmarchive.errors import StreamError
from vmarchive.format import migstream as ms
from vmarchive.format import migstream_cpu as mc

SEG = {
    "vmsd_name": "segment",
    "version": 1,
    "fields": [
        {"name": "selector", "type": "uint32", "size": 4},
        {"name": "base", "type": "uint64", "size": 8},
        {"name": "limit", "type": "uint32", "size": 4},
        {"name": "flags", "type": "uint32", "size": 4},
    ],
}


def u64(name: str, n: int | None = None) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "type": "uint64", "size": 8}
    if n:
        f["array_len"] = n
    return f


def seg(name: str, n: int | None = None) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "type": "struct", "struct": SEG, "size": 20}
    if n:
        f["array_len"] = n
    return f


FIELDS = [
    u64("env.regs", 16),
    u64("env.eip"),
    u64("env.eflags"),
    {"name": "env.hflags", "type": "uint32", "size": 4},
    seg("env.segs", 6),
    seg("env.ldt"),
    seg("env.tr"),
    seg("env.gdt"),
    seg("env.idt"),
    u64("env.cr[0]"),
    u64("env.cr[2]"),
    u64("env.cr[3]"),
    u64("env.cr[4]"),
    u64("env.efer"),
    u64("env.kernelgsbase"),
]


def seg_bytes(sel: int, base: int, limit: int, flags: int) -> bytes:
    return struct.pack(">IQII", sel, base, limit, flags)


def cpu_body(k: int) -> bytes:
    b = struct.pack(">16Q", *[(k << 32) | (i + 1) for i in range(16)])
    b += struct.pack(">QQI", 0xFFFFFFFF81000000 + k, 0x246, 7)
    b += b"".join(seg_bytes(0x10 + i, 0x1000 * i, 0xFFFFF, 0xC09300) for i in range(6))
    b += seg_bytes(0, 0, 0, 0) * 2
    b += seg_bytes(0, 0xFFFFFE0000001000, 0x7F, 0)  # gdt
    b += seg_bytes(0, 0xFFFFFE0000000000, 0xFFF, 0)  # idt
    b += struct.pack(">6Q", 0x80050033, 0xDEAD, 0x1234000 + k * 0x1000, 0x3506F0, 0xD01, 0x42)
    # one subsection follows the main fields, as QEMU writes them
    b += b"\x05" + bytes([len("cpu/sub")]) + b"cpu/sub" + struct.pack(">IQ", 1, 99)
    return b


def make(n_cpus: int = 2, fields: list[dict[str, Any]] = FIELDS) -> tuple[ms.StreamLayout, bytes]:
    devices = [{"name": "timer", "instance_id": 0, "fields": []}]
    records = [ms.SectionRecord(ms.SEC_FULL, 3, "timer", 0, 2, 0, 8)]
    dev = bytearray(8)
    for k in range(n_cpus):
        body = cpu_body(k)
        records.append(ms.SectionRecord(ms.SEC_FULL, 4 + k, "cpu", k, 12, len(dev), len(body)))
        dev += body
        devices.append(
            {
                "name": "cpu",
                "instance_id": k,
                "fields": fields,
                "subsections": [{"vmsd_name": "cpu/sub", "fields": [u64("x")]}],
            }
        )
    layout = ms.StreamLayout(
        version=3,
        configuration=b"",
        ram=ms.RamSection(2, 0, 4),
        ram_blocks=[ms.RamBlock(0, "pc.ram", 4096)],
        records=records,
        vmdesc=json.dumps({"devices": devices}).encode(),
    )
    layout.validate()
    return layout, bytes(dev)


def test_decodes_rip_rsp_cr3_segments_per_vcpu() -> None:
    layout, dev = make()
    cpus = mc.decode_x86_cpus(layout, dev)
    assert [c.instance_id for c in cpus] == [0, 1]
    for k, c in enumerate(cpus):
        assert c.rip == 0xFFFFFFFF81000000 + k
        assert c.rsp == (k << 32) | 5
        assert c.gprs[0] == (k << 32) | 1
        assert c.cr3 == 0x1234000 + k * 0x1000
        assert c.cr0 == 0x80050033 and c.cr4 == 0x3506F0 and c.efer == 0xD01
        assert c.kernel_gs_base == 0x42
        assert c.segments["cs"] == mc.Segment(0x11, 0x1000, 0xFFFFF, 0xC09300)
        assert c.idt.base == 0xFFFFFE0000000000 and c.gdt.limit == 0x7F
        assert c.as_dict()["rsp"] == c.rsp


def test_field_sizes_not_matching_the_body_are_refused() -> None:
    # one field described 4 bytes too wide: offsets after it would be wrong
    bad = [dict(f) for f in FIELDS]
    bad[3] = {"name": "env.hflags", "type": "uint64", "size": 8}
    layout, dev = make(fields=bad)
    with pytest.raises(StreamError, match="do not match"):
        mc.decode_x86_cpus(layout, dev)


def test_missing_field_is_an_error() -> None:
    renamed = [u64("env.cr3_renamed") if f["name"] == "env.cr[3]" else f for f in FIELDS]
    layout, dev = make(fields=renamed)
    with pytest.raises(StreamError, match=r"no field 'env.cr\[3\]'"):
        mc.decode_x86_cpus(layout, dev)
