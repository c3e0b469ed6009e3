"""ELF core writer: layout read back by an independent reader, notes against QEMU 7.2's bytes.

The reader below is written from the ELF specification (struct formats spelled out here,
not imported from the writer), so a shared misunderstanding cannot hide.  The golden test
holds the writer to the notes QEMU 7.2's ``dump-guest-memory`` wrote for a paused 2-vCPU
guest (test_elfcore_qemu72_notes.json): vCPU 0 in long mode, vCPU 1 still in the BIOS.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmarchive.errors import FormatError
from vmarchive.format import elfcore as E

VECTORS = pathlib.Path(__file__).with_name("test_elfcore_qemu72_notes.json")


# --- an independent reader -------------------------------------------------------------------


def read_ehdr(data: bytes) -> dict[str, int]:
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2 and data[5] == 1 and data[6] == 1  # ELFCLASS64, LSB, EV_CURRENT
    names = [
        "type",
        "machine",
        "version",
        "entry",
        "phoff",
        "shoff",
        "flags",
        "ehsize",
        "phentsize",
        "phnum",
        "shentsize",
        "shnum",
        "shstrndx",
    ]
    return dict(zip(names, struct.unpack_from("<HHIQQQIHHHHHH", data, 16), strict=True))


def read_phdrs(data: bytes) -> list[dict[str, int]]:
    eh = read_ehdr(data)
    n = eh["phnum"]
    if n == 0xFFFF:  # PN_XNUM: the count is in section 0's sh_info
        n = struct.unpack_from("<I", data, eh["shoff"] + 44)[0]
    names = ["type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align"]
    return [
        dict(zip(names, struct.unpack_from("<IIQQQQQQ", data, eh["phoff"] + 56 * i), strict=True))
        for i in range(n)
    ]


def read_notes(blob: bytes) -> list[tuple[bytes, int, bytes]]:
    out = []
    pos = 0
    while pos < len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos : pos + namesz]
        pos += (namesz + 3) // 4 * 4
        desc = blob[pos : pos + descsz]
        pos += (descsz + 3) // 4 * 4
        out.append((name, ntype, desc))
    assert pos == len(blob)
    return out


def regs_from_json(c: dict[str, Any]) -> E.X86Registers:
    return E.X86Registers(
        index=c["index"],
        gprs=c["gprs"],
        rip=c["rip"],
        rflags=c["rflags"],
        segments={k: E.SegmentRegs(*v) for k, v in c["segments"].items()},
        cr=tuple(c["cr"]),
        kernel_gs_base=c["kernel_gs_base"],
        long_mode=c["long_mode"],
    )


def sample_regs(index: int) -> E.X86Registers:
    names = [
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rsp",
        "rbp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
    ]
    segs = ["cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt"]
    return E.X86Registers(
        index=index,
        gprs={n: (index << 40) | (i + 1) for i, n in enumerate(names)},
        rip=0xFFFFFFFF81000000 + index,
        rflags=0x246,
        segments={
            n: E.SegmentRegs(0x10 + i, 0x1000 * i + index, 0xFFFF, 0xC09300)
            for i, n in enumerate(segs)
        },
        cr=(0x80050033, 0, 0xDEAD, 0x2A92000 + index, 0x6B0),
        kernel_gs_base=0x4242,
    )


# --- notes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["long_mode", "reset"])
def test_notes_equal_qemu_72_bytes(case: str) -> None:
    vec = json.loads(VECTORS.read_text())[case]
    cpus = [regs_from_json(c) for c in vec["cpus"]]
    want = (vec["machine"], bytes.fromhex(vec["qemu_notes_hex"]))
    assert E.x86_notes(cpus) == want
    # order is by cpu index, whatever order the caller gives
    assert E.x86_notes(cpus[::-1]) == want


def test_notes_golden_negative_control() -> None:
    vec = json.loads(VECTORS.read_text())["long_mode"]
    c = dict(vec["cpus"][0])
    c["cr"] = [c["cr"][0], 0, c["cr"][2], c["cr"][3] ^ 0x1000, c["cr"][4]]
    cpus = [regs_from_json(c), regs_from_json(vec["cpus"][1])]
    assert E.x86_notes(cpus)[1] != bytes.fromhex(vec["qemu_notes_hex"])
    # vCPU 0 decides the format: flipping its mode changes machine and notes
    c["long_mode"] = False
    machine, notes = E.x86_notes([regs_from_json(c), regs_from_json(vec["cpus"][1])])
    assert machine == E.EM_386 and len(notes) != len(bytes.fromhex(vec["qemu_notes_hex"]))


def test_i386_prstatus_fields() -> None:
    r = sample_regs(0)
    r = E.X86Registers(r.index, r.gprs, r.rip, r.rflags, r.segments, r.cr, long_mode=False)
    machine, blob = E.x86_notes([r])
    (name, ntype, desc), _ = read_notes(blob)
    assert (machine, name, ntype, len(desc)) == (3, b"CORE\0", 1, 144)
    assert struct.unpack_from("<I", desc, 24)[0] == 1
    g = r.gprs
    names = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax")
    assert struct.unpack_from("<7I", desc, 72) == tuple(g[n] & 0xFFFFFFFF for n in names)
    sels = struct.unpack_from("<8H", desc, 100)
    assert sels == tuple(v for n in ("ds", "es", "fs", "gs") for v in (r.segments[n].selector, 0))
    orig_eax, eip, cs, _, eflags, esp, ss, _ = struct.unpack_from("<2I2H2I2H", desc, 116)
    assert (orig_eax, eip, cs, eflags) == (0, r.rip & 0xFFFFFFFF, r.segments["cs"].selector, 0x246)
    assert (esp, ss) == (r.gprs["rsp"] & 0xFFFFFFFF, r.segments["ss"].selector)


def test_prstatus_fields_at_their_offsets() -> None:
    r = sample_regs(3)
    (name, ntype, desc), *_ = read_notes(E.x86_64_notes([r]))
    assert (name, ntype, len(desc)) == (b"CORE\0", 1, 336)
    assert struct.unpack_from("<I", desc, 32)[0] == 4  # pid = cpu index + 1
    regs = struct.unpack_from("<27Q", desc, 112)
    by_name = dict(zip(E.USER_REGS_ORDER, regs, strict=True))
    assert by_name["rip"] == r.rip and by_name["rsp"] == r.gprs["rsp"]
    assert by_name["rax"] == r.gprs["rax"] and by_name["r15"] == r.gprs["r15"]
    assert by_name["orig_rax"] == 0 and by_name["eflags"] == 0x246
    assert by_name["cs"] == r.segments["cs"].selector
    assert by_name["fs_base"] == r.segments["fs"].base
    assert by_name["gs_base"] == r.segments["gs"].base
    assert desc[:32] == bytes(32) and desc[36:112] == bytes(76) and desc[-8:] == bytes(8)


def test_qemu_note_fields_at_their_offsets() -> None:
    r = sample_regs(1)
    notes = read_notes(E.x86_64_notes([r]))
    name, ntype, desc = notes[1]
    assert (name, ntype, len(desc)) == (b"QEMU\0", 0, 440)
    version, size = struct.unpack_from("<II", desc, 0)
    assert (version, size) == (1, 440)
    gprs = struct.unpack_from("<16Q", desc, 8)
    assert gprs[6] == r.gprs["rsp"] and gprs[0] == r.gprs["rax"] and gprs[1] == r.gprs["rbx"]
    rip, rflags = struct.unpack_from("<QQ", desc, 136)
    assert (rip, rflags) == (r.rip, r.rflags)
    for i, seg in enumerate(["cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt"]):
        sel, limit, flags, pad, base = struct.unpack_from("<IIIIQ", desc, 152 + 24 * i)
        s = r.segments[seg]
        assert (sel, limit, flags, pad, base) == (s.selector, s.limit, s.flags, 0, s.base)
    cr = struct.unpack_from("<6Q", desc, 392)
    assert cr[:5] == r.cr and cr[5] == r.kernel_gs_base


def test_note_padding() -> None:
    note = E.encode_note(b"AB", 7, b"xyz")
    assert note == struct.pack("<III", 3, 3, 7) + b"AB\0\0" + b"xyz\0"


# --- layout ---------------------------------------------------------------------------------


def test_layout_read_back() -> None:
    notes = E.x86_64_notes([sample_regs(0), sample_regs(1)])
    loads = [
        E.LoadSegment(0, 0xA0000),
        E.LoadSegment(0x100000, 0x1000),
        E.LoadSegment(0xFFFC0000, 0x40000),
    ]
    plan = E.plan_core(notes, loads)
    eh = read_ehdr(plan.head)
    assert (eh["type"], eh["machine"], eh["ehsize"], eh["phentsize"]) == (4, 62, 64, 56)
    assert eh["phoff"] == 64 and eh["phnum"] == 4 and eh["shnum"] == 0
    ph = read_phdrs(plan.head)
    assert ph[0]["type"] == 4 and ph[0]["filesz"] == len(notes)
    assert plan.head[ph[0]["offset"] : ph[0]["offset"] + ph[0]["filesz"]] == notes
    assert len(read_notes(notes)) == 4
    pos = ph[0]["offset"] + ph[0]["filesz"]
    for p, seg, off in zip(ph[1:], loads, plan.load_offsets, strict=True):
        assert p["type"] == 1 and p["paddr"] == p["vaddr"] == seg.paddr
        assert p["filesz"] == p["memsz"] == seg.size
        assert p["offset"] == off == pos
        pos += seg.size
    assert plan.size == pos == len(plan.head) + sum(s.size for s in loads)


def test_pn_xnum_many_segments() -> None:
    loads = [E.LoadSegment(i * 0x2000, 0x1000) for i in range(0x10000)]
    plan = E.plan_core(b"", loads)
    eh = read_ehdr(plan.head)
    assert eh["phnum"] == 0xFFFF and eh["shnum"] == 1
    ph = read_phdrs(plan.head)
    assert len(ph) == 0x10001
    assert ph[-1]["paddr"] == 0xFFFF * 0x2000 and ph[-1]["offset"] == plan.load_offsets[-1]


def test_overlapping_or_empty_loads_refused() -> None:
    with pytest.raises(FormatError):
        E.plan_core(b"", [])
    with pytest.raises(FormatError, match="overlap"):
        E.plan_core(b"", [E.LoadSegment(0, 0x2000), E.LoadSegment(0x1000, 0x1000)])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 20)), min_size=1, max_size=20),
    st.binary(max_size=64),
)
def test_layout_property(gaps_sizes: list[tuple[int, int]], notes: bytes) -> None:
    addr = 0
    loads = []
    for gap, size in gaps_sizes:
        addr += gap
        loads.append(E.LoadSegment(addr, size))
        addr += size
    plan = E.plan_core(notes, loads)
    ph = read_phdrs(plan.head)
    assert [(p["paddr"], p["filesz"]) for p in ph[1:]] == [(s.paddr, s.size) for s in loads]
    ends = [p["offset"] + p["filesz"] for p in ph]
    assert max(ends) == plan.size
    # data regions do not overlap each other or the head
    spans = sorted((p["offset"], p["offset"] + p["filesz"]) for p in ph[1:])
    assert spans[0][0] == len(plan.head)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
