"""Decode x86 vCPU registers from the ``cpu`` device sections of a parsed stream (format layer).

What it is for: forensic exports (ELF core notes, ``diff``) need each vCPU's registers,
and the migration stream carries them in the ``cpu`` sections.  Rather than hard-code
QEMU's field order, offsets are computed from the vmdesc JSON that QEMU writes at the
end of every stream: it lists each field of each section with its element size and
array length *as written*, so summing them gives every field's offset in the body.

Layer: ``vmarchive.format`` -- pure logic on a :class:`~vmarchive.format.migstream.StreamLayout`
and the devstate bytes; imports only :mod:`vmarchive.errors` and the standard library
(plus its sibling module).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from vmarchive.errors import StreamError
from vmarchive.format.migstream import SEC_SUBSECTION, StreamLayout

#: x86-64 general purpose registers in QEMU's env.regs order.
GPR_NAMES = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")


class Segment(msgspec.Struct, frozen=True):
    selector: int
    base: int
    limit: int
    flags: int


class X86CpuState(msgspec.Struct, frozen=True):
    """The registers of one vCPU as the stream carries them."""

    instance_id: int
    gprs: tuple[int, ...]
    rip: int
    rflags: int
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    efer: int
    segments: dict[str, Segment]
    gdt: Segment
    idt: Segment
    kernel_gs_base: int

    @property
    def rsp(self) -> int:
        return self.gprs[4]

    def as_dict(self) -> dict[str, int]:
        """Flat register names -> values (handy for notes and JSON output)."""
        out = dict(zip(GPR_NAMES, self.gprs, strict=True))
        out.update(
            rip=self.rip,
            rflags=self.rflags,
            cr0=self.cr0,
            cr2=self.cr2,
            cr3=self.cr3,
            cr4=self.cr4,
            efer=self.efer,
            kernel_gs_base=self.kernel_gs_base,
        )
        for name, seg in self.segments.items():
            out[name] = seg.selector
            out[f"{name}_base"] = seg.base
        return out


class _Field(msgspec.Struct, frozen=True):
    offset: int
    size: int  # of one element
    count: int
    struct: list[dict[str, Any]] | None


def _layout(fields: list[dict[str, Any]]) -> tuple[dict[str, _Field], int]:
    """Offsets of each named field, and the total size of the list."""
    out: dict[str, _Field] = {}
    off = 0
    for f in fields:
        count = int(f.get("array_len", 1))
        size = int(f["size"])
        sub = f.get("struct")
        out[str(f["name"])] = _Field(off, size, count, None if sub is None else sub["fields"])
        off += size * count
    return out, off


class _Body:
    def __init__(self, name: str, data: bytes, fields: dict[str, _Field]) -> None:
        self.name = name
        self.data = data
        self.fields = fields

    def _get(self, name: str) -> _Field:
        try:
            return self.fields[name]
        except KeyError:
            raise StreamError(f"{self.name}: vmdesc lists no field {name!r}") from None

    def uint(self, name: str, index: int = 0) -> int:
        f = self._get(name)
        if index >= f.count:
            raise StreamError(f"{self.name}: field {name!r} has no element {index}")
        at = f.offset + index * f.size
        return int.from_bytes(self.data[at : at + f.size], "big")

    def struct(self, name: str, index: int = 0) -> _Body:
        f = self._get(name)
        if f.struct is None or index >= f.count:
            raise StreamError(f"{self.name}: field {name!r} is not a struct array this long")
        sub, _ = _layout(f.struct)
        at = f.offset + index * f.size
        return _Body(f"{self.name}.{name}[{index}]", self.data[at : at + f.size], sub)


def _segment(body: _Body) -> Segment:
    return Segment(body.uint("selector"), body.uint("base"), body.uint("limit"), body.uint("flags"))


def decode_x86_cpus(
    layout: StreamLayout, devstate: bytes | bytearray | memoryview
) -> list[X86CpuState]:
    """Registers of every vCPU, in instance order, from the ``cpu`` device sections.

    Raises StreamError when vmdesc does not describe the fields needed or a body is
    shorter than its description says (the layout and devstate do not belong together).
    """
    try:
        desc = json.loads(layout.vmdesc)
        devices: list[dict[str, Any]] = list(desc["devices"])
    except (ValueError, KeyError, TypeError) as e:
        raise StreamError(f"vmdesc is not the JSON QEMU writes: {e}") from e
    by_key = {(str(d.get("name")), int(d.get("instance_id", -1))): d for d in devices}
    dev = memoryview(devstate)
    cpus: list[X86CpuState] = []
    for rec in layout.records:
        if rec.idstr != "cpu":
            continue
        d = by_key.get((rec.idstr, rec.instance_id))
        if d is None:
            raise StreamError(f"vmdesc does not describe cpu instance {rec.instance_id}")
        fields, total = _layout(d["fields"])
        data = bytes(dev[rec.offset : rec.offset + rec.length])
        if len(data) < total:
            raise StreamError(
                f"cpu {rec.instance_id}: section body has {len(data)} bytes,"
                f" vmdesc describes {total}"
            )
        subs = d.get("subsections") or []
        if subs and (len(data) == total or data[total] != SEC_SUBSECTION):
            # the first subsection must start right where the described fields end;
            # if it does not, our offsets would be wrong: refuse to guess
            raise StreamError(f"cpu {rec.instance_id}: vmdesc field sizes do not match the body")
        b = _Body(f"cpu {rec.instance_id}", data, fields)
        cpus.append(
            X86CpuState(
                instance_id=rec.instance_id,
                gprs=tuple(b.uint("env.regs", i) for i in range(16)),
                rip=b.uint("env.eip"),
                rflags=b.uint("env.eflags"),
                cr0=b.uint("env.cr[0]"),
                cr2=b.uint("env.cr[2]"),
                cr3=b.uint("env.cr[3]"),
                cr4=b.uint("env.cr[4]"),
                efer=b.uint("env.efer"),
                segments={
                    n: _segment(b.struct("env.segs", i)) for i, n in enumerate(SEGMENT_NAMES)
                },
                gdt=_segment(b.struct("env.gdt")),
                idt=_segment(b.struct("env.idt")),
                kernel_gs_base=b.uint("env.kernelgsbase"),
            )
        )
    cpus.sort(key=lambda c: c.instance_id)
    return cpus
