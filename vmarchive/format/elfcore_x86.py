"""vCPU registers for ELF core notes, from a parsed migration stream (format layer).

:func:`vmarchive.format.migstream_cpu.decode_x86_cpus` (the STREAM helper's decoder)
gives the general purpose registers, RIP, RFLAGS, control registers, the six segment
registers, GDT and IDT.  QEMU's CPU state note also carries LDTR and TR, which that
decoder does not read; this module reads them with the same method (field offsets summed
from the vmdesc JSON that QEMU appends to every stream) and assembles
:class:`~vmarchive.format.elfcore.X86Registers`.
"""

from __future__ import annotations

import json
from typing import Any

from vmarchive.errors import StreamError
from vmarchive.format.elfcore import SegmentRegs, X86Registers
from vmarchive.format.migstream import StreamLayout
from vmarchive.format.migstream_cpu import GPR_NAMES, decode_x86_cpus

#: EFER.LMA (bit 10): long mode active; QEMU's dump picks the note format by it.
EFER_LMA = 1 << 10


def _field_offset(fields: list[dict[str, Any]], name: str) -> tuple[int, dict[str, Any]]:
    """Byte offset of field ``name`` in a vmdesc field list, and its description."""
    off = 0
    for f in fields:
        if f.get("name") == name:
            return off, f
        off += int(f["size"]) * int(f.get("array_len", 1))
    raise StreamError(f"vmdesc lists no cpu field {name!r}")


def _segment_at(body: bytes, fields: list[dict[str, Any]], name: str) -> SegmentRegs:
    at, desc = _field_offset(fields, name)
    struct_desc = desc.get("struct")
    if not isinstance(struct_desc, dict):
        raise StreamError(f"vmdesc field {name!r} is not a struct")
    values: dict[str, int] = {}
    for sub in struct_desc["fields"]:
        sub_off, _ = _field_offset(struct_desc["fields"], str(sub["name"]))
        size = int(sub["size"])
        start = at + sub_off
        if start + size > len(body):
            raise StreamError(f"cpu section too short for field {name}.{sub['name']}")
        values[str(sub["name"])] = int.from_bytes(body[start : start + size], "big")
    try:
        return SegmentRegs(values["selector"], values["base"], values["limit"], values["flags"])
    except KeyError as e:
        raise StreamError(f"vmdesc segment {name!r} lacks field {e}") from e


def x86_registers(
    layout: StreamLayout, devstate: bytes | bytearray | memoryview
) -> list[X86Registers]:
    """Every vCPU's registers (in cpu_index order) as the ELF notes need them.

    Raises StreamError when the stream's cpu sections or vmdesc do not describe them.
    """
    cpus = decode_x86_cpus(layout, devstate)
    try:
        desc = json.loads(layout.vmdesc)
        by_instance = {
            int(d["instance_id"]): d["fields"] for d in desc["devices"] if d.get("name") == "cpu"
        }
    except (ValueError, KeyError, TypeError) as e:
        raise StreamError(f"vmdesc is not the JSON QEMU writes: {e}") from e
    records = {r.instance_id: r for r in layout.records if r.idstr == "cpu"}
    dev = memoryview(devstate)
    out: list[X86Registers] = []
    for c in cpus:
        rec = records[c.instance_id]
        body = bytes(dev[rec.offset : rec.offset + rec.length])
        fields = by_instance.get(c.instance_id)
        if fields is None:
            raise StreamError(f"vmdesc does not describe cpu instance {c.instance_id}")
        segs = {
            name: SegmentRegs(s.selector, s.base, s.limit, s.flags)
            for name, s in c.segments.items()
        }
        segs["ldt"] = _segment_at(body, fields, "env.ldt")
        segs["tr"] = _segment_at(body, fields, "env.tr")
        segs["gdt"] = SegmentRegs(c.gdt.selector, c.gdt.base, c.gdt.limit, c.gdt.flags)
        segs["idt"] = SegmentRegs(c.idt.selector, c.idt.base, c.idt.limit, c.idt.flags)
        out.append(
            X86Registers(
                index=c.instance_id,
                gprs=dict(zip(GPR_NAMES, c.gprs, strict=True)),
                rip=c.rip,
                rflags=c.rflags,
                segments=segs,
                # QEMU never sets cr1 (it does not exist); the stream does not carry it.
                cr=(c.cr0, 0, c.cr2, c.cr3, c.cr4),
                kernel_gs_base=c.kernel_gs_base,
                long_mode=bool(c.efer & EFER_LMA),
            )
        )
    return out
