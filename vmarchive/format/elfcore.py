"""ELF64 core files of guest memory, as QEMU's ``dump-guest-memory`` (paging=false) writes them.

Layer: format (pure: bytes in, bytes out; no I/O).  The export (``vmarchive.ops.export``)
asks :func:`plan_core` where everything goes, writes :attr:`CoreLayout.head` at offset 0
and then streams each PT_LOAD's bytes to its offset, so memory use never depends on the
size of guest RAM.

File layout (little-endian, x86-64)::

    0                 Elf64_Ehdr (64 bytes): ET_CORE, EM_X86_64
    64                program headers (56 bytes each): PT_NOTE, then one PT_LOAD per
                      guest-physical block in address order (p_paddr = p_vaddr = address)
    64 + 56*n         the notes: NT_PRSTATUS ("CORE") for each vCPU, then QEMU's CPU state
                      note ("QEMU", type 0) for each vCPU -- QEMU's order
    notes end         PT_LOAD data, back to back, in program header order

QEMU 7.2 also writes two empty section headers and an e_ehsize of 8 (a bug); this writer
writes none (unless there are 65535+ segments: then section 0 carries the count, as the
ELF spec's PN_XNUM rule says) and the correct e_ehsize.  The PT_LOAD bytes and the note
bytes are the same as QEMU's.

Note layouts (from QEMU's ``target/i386/arch_dump.c``, read for the facts):

* QEMU decides by the FIRST vCPU: in long mode, e_machine is EM_X86_64 and every vCPU
  gets the 64-bit NT_PRSTATUS below; otherwise (firmware, a 32-bit OS) e_machine is
  EM_386 and every vCPU gets the i386 NT_PRSTATUS, still in an ELF64 file (QEMU switches to
  ELFCLASS32 only when all memory ends below 4 GiB, which the x86 BIOS at 4 GiB never does).
* NT_PRSTATUS descriptor (long mode), 336 bytes: 32 bytes of signal info (zero), u32 pid (vCPU index
  + 1), 76 bytes (zero), the 27 u64 of ``user_regs_struct`` (r15 r14 r13 r12 rbp rbx r11
  r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss fs_base gs_base ds es fs
  gs), 8 bytes (zero).
* NT_PRSTATUS descriptor (i386), 144 bytes: 24 bytes (zero), u32 pid, 44 bytes (zero),
  ``user_regs_struct`` of i386 (u32 ebx ecx edx esi edi ebp eax; u16 ds, 0, es, 0, fs, 0,
  gs, 0; u32 orig_eax eip; u16 cs, 0; u32 eflags esp; u16 ss, 0), 4 bytes (zero).
* QEMU note descriptor (``QEMUCPUState`` version 1), 440 bytes: u32 version = 1, u32
  size = 440; u64 rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags; ten segments (cs ds
  es fs gs ss ldt tr gdt idt) of u32 selector, u32 limit, u32 flags, u32 pad, u64 base;
  u64 cr[0..4]; u64 kernel_gs_base.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping, Sequence

import msgspec

from vmarchive.errors import FormatError

# --- ELF constants --------------------------------------------------------------------------
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ELFOSABI_SYSV = 0
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
NT_PRSTATUS = 1
#: QEMU's CPU state note has type 0 and name "QEMU".
NT_QEMU_CPUSTATE = 0
PN_XNUM = 0xFFFF

# e_ident (16) + e_type, e_machine (2+2) + e_version (4) + e_entry, e_phoff, e_shoff (3*8)
# + e_flags (4) + e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx (6*2) = 64
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags (2*4) + p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align (6*8) = 56
_PHDR = struct.Struct("<IIQQQQQQ")
# sh_name, sh_type (2*4) + sh_flags, sh_addr, sh_offset, sh_size (4*8) + sh_link, sh_info
# (2*4) + sh_addralign, sh_entsize (2*8) = 64
_SHDR = struct.Struct("<IIQQQQIIQQ")
# n_namesz, n_descsz, n_type = 12
_NHDR = struct.Struct("<III")
assert (_EHDR.size, _PHDR.size, _SHDR.size, _NHDR.size) == (64, 56, 64, 12)

# --- x86-64 note layouts --------------------------------------------------------------------
PRSTATUS_SIZE = 336
_PRSTATUS_PID_AT = 32
_PRSTATUS_REGS_AT = 112  # 32 + 4 + 76
_USER_REGS = struct.Struct("<27Q")  # 216 bytes
assert _PRSTATUS_REGS_AT + _USER_REGS.size + 8 == PRSTATUS_SIZE
USER_REGS_ORDER = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip

PRSTATUS_I386_SIZE = 144
_PRSTATUS_I386_PID_AT = 24
_PRSTATUS_I386_REGS_AT = 72  # 24 + 4 + 44
# ebx ecx edx esi edi ebp eax (7*4) + ds es fs gs with padding (8*2) + orig_eax eip (2*4)
# + cs, pad (2*2) + eflags esp (2*4) + ss, pad (2*2) = 68
_USER_REGS_I386 = struct.Struct("<7I8H2I2H2I2H")
assert _PRSTATUS_I386_REGS_AT + _USER_REGS_I386.size + 4 == PRSTATUS_I386_SIZE

QEMU_CPUSTATE_VERSION = 1
_QEMU_HEAD = struct.Struct("<II18Q")  # version, size, 16 GPRs, rip, rflags: 152 bytes
_QEMU_SEG = struct.Struct("<IIIIQ")  # selector, limit, flags, pad, base: 24 bytes
_QEMU_TAIL = struct.Struct("<6Q")  # cr[0..4], kernel_gs_base: 48 bytes
QEMU_CPUSTATE_SIZE = _QEMU_HEAD.size + 10 * _QEMU_SEG.size + _QEMU_TAIL.size
assert QEMU_CPUSTATE_SIZE == 440
QEMU_GPR_ORDER = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
QEMU_SEGMENT_ORDER = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
#: QEMU's env.regs order (the migration stream's too).
ENV_GPR_ORDER = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


class SegmentRegs(msgspec.Struct, frozen=True):
    """One segment (or descriptor-table) register as QEMU holds it."""

    selector: int = 0
    base: int = 0
    limit: int = 0
    flags: int = 0


class X86Registers(msgspec.Struct, frozen=True):
    """What the x86-64 notes of one vCPU need.

    ``gprs`` maps the 16 general purpose register names (``rax`` ... ``r15``) to values;
    ``segments`` maps ``cs ds es fs gs ss ldt tr gdt idt``; ``cr`` holds cr0..cr4.
    """

    index: int  # QEMU's cpu_index
    gprs: Mapping[str, int]
    rip: int
    rflags: int
    segments: Mapping[str, SegmentRegs]
    cr: tuple[int, int, int, int, int]
    kernel_gs_base: int = 0
    #: EFER.LMA: the vCPU runs in long mode (QEMU's HF_LMA).
    long_mode: bool = True


def _u64(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def _u32(v: int) -> int:
    return v & 0xFFFFFFFF


def encode_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4 bytes."""
    n = name + b"\0"
    pad_n = -len(n) % 4
    pad_d = -len(desc) % 4
    return _NHDR.pack(len(n), len(desc), ntype) + n + bytes(pad_n) + desc + bytes(pad_d)


def prstatus_desc(regs: X86Registers) -> bytes:
    """The 336-byte NT_PRSTATUS descriptor QEMU writes for a vCPU in long mode."""
    seg = regs.segments
    values = {
        **{k: regs.gprs[k] for k in QEMU_GPR_ORDER},
        "orig_rax": 0,  # QEMU writes 0 too: the interrupted syscall is not known
        "rip": regs.rip,
        "eflags": regs.rflags,
        "cs": seg["cs"].selector,
        "ss": seg["ss"].selector,
        "ds": seg["ds"].selector,
        "es": seg["es"].selector,
        "fs": seg["fs"].selector,
        "gs": seg["gs"].selector,
        "fs_base": seg["fs"].base,
        "gs_base": seg["gs"].base,
    }
    out = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<I", out, _PRSTATUS_PID_AT, regs.index + 1)
    _USER_REGS.pack_into(out, _PRSTATUS_REGS_AT, *(_u64(values[k]) for k in USER_REGS_ORDER))
    return bytes(out)


def prstatus_i386_desc(regs: X86Registers) -> bytes:
    """The 144-byte i386 NT_PRSTATUS descriptor (QEMU's choice when vCPU 0 is not in long
    mode): 32-bit registers, 16-bit selectors."""
    g, seg = regs.gprs, regs.segments
    out = bytearray(PRSTATUS_I386_SIZE)
    struct.pack_into("<I", out, _PRSTATUS_I386_PID_AT, regs.index + 1)
    _USER_REGS_I386.pack_into(
        out,
        _PRSTATUS_I386_REGS_AT,
        *(_u32(g[k]) for k in ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax")),
        *(v for k in ("ds", "es", "fs", "gs") for v in (seg[k].selector & 0xFFFF, 0)),
        0,  # orig_eax
        _u32(regs.rip),
        seg["cs"].selector & 0xFFFF,
        0,
        _u32(regs.rflags),
        _u32(g["rsp"]),
        seg["ss"].selector & 0xFFFF,
        0,
    )
    return bytes(out)


def qemu_cpustate_desc(regs: X86Registers) -> bytes:
    """The 440-byte ``QEMUCPUState`` (version 1) descriptor of QEMU's CPU state note."""
    head = _QEMU_HEAD.pack(
        QEMU_CPUSTATE_VERSION,
        QEMU_CPUSTATE_SIZE,
        *(_u64(regs.gprs[k]) for k in QEMU_GPR_ORDER),
        _u64(regs.rip),
        _u64(regs.rflags),
    )
    segs = b"".join(
        _QEMU_SEG.pack(_u32(s.selector), _u32(s.limit), _u32(s.flags), 0, _u64(s.base))
        for s in (regs.segments[n] for n in QEMU_SEGMENT_ORDER)
    )
    return head + segs + _QEMU_TAIL.pack(*(_u64(c) for c in regs.cr), _u64(regs.kernel_gs_base))


def x86_notes(cpus: Sequence[X86Registers]) -> tuple[int, bytes]:
    """(e_machine, PT_NOTE contents) as QEMU chooses them: by vCPU 0's mode.

    Raises FormatError for an empty list.
    """
    if not cpus:
        raise FormatError("a core needs the registers of at least one vCPU")
    ordered = sorted(cpus, key=lambda c: c.index)
    if ordered[0].long_mode:
        return EM_X86_64, x86_64_notes(ordered)
    return EM_386, b"".join(
        encode_note(b"CORE", NT_PRSTATUS, prstatus_i386_desc(c)) for c in ordered
    ) + b"".join(encode_note(b"QEMU", NT_QEMU_CPUSTATE, qemu_cpustate_desc(c)) for c in ordered)


def x86_64_notes(cpus: Sequence[X86Registers]) -> bytes:
    """The PT_NOTE contents for ``cpus`` (in cpu_index order): all NT_PRSTATUS notes, then
    all QEMU CPU state notes, as ``dump-guest-memory`` writes them."""
    ordered = sorted(cpus, key=lambda c: c.index)
    return b"".join(encode_note(b"CORE", NT_PRSTATUS, prstatus_desc(c)) for c in ordered) + (
        b"".join(encode_note(b"QEMU", NT_QEMU_CPUSTATE, qemu_cpustate_desc(c)) for c in ordered)
    )


class LoadSegment(msgspec.Struct, frozen=True):
    """A PT_LOAD: ``size`` bytes of guest memory at guest-physical ``paddr``."""

    paddr: int
    size: int


class CoreLayout(msgspec.Struct, frozen=True):
    """Where everything of a core file goes.

    ``head`` (ELF header, program headers, any section header, notes) is written at offset
    0; load ``i``'s bytes at ``load_offsets[i]``; the file is ``size`` bytes long.
    """

    head: bytes
    load_offsets: tuple[int, ...]
    size: int


def plan_core(notes: bytes, loads: Sequence[LoadSegment], machine: int = EM_X86_64) -> CoreLayout:
    """Lay out a core file with one PT_NOTE holding ``notes`` and one PT_LOAD per load.

    Raises FormatError for an empty or overlapping load list.
    """
    if not loads:
        raise FormatError("a core needs at least one memory segment")
    for a, b in itertools.pairwise(loads):
        if b.paddr < a.paddr + a.size:
            raise FormatError(f"memory segments overlap or are unsorted at {b.paddr:#x}")
    phnum = 1 + len(loads)
    xnum = phnum >= PN_XNUM
    phoff = _EHDR.size
    shoff = phoff + phnum * _PHDR.size if xnum else 0
    notes_off = (shoff + _SHDR.size) if xnum else phoff + phnum * _PHDR.size
    pos = notes_off + len(notes)
    offsets = []
    for seg in loads:
        offsets.append(pos)
        pos += seg.size
    ident = ELFMAG + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT, ELFOSABI_SYSV]) + bytes(8)
    ehdr = _EHDR.pack(
        ident,
        ET_CORE,
        machine,
        EV_CURRENT,
        0,  # e_entry
        phoff,
        shoff,
        0,  # e_flags
        _EHDR.size,
        _PHDR.size,
        PN_XNUM if xnum else phnum,
        _SHDR.size if xnum else 0,
        1 if xnum else 0,
        0,  # e_shstrndx: SHN_UNDEF
    )
    phdrs = [_PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0)]
    phdrs += [
        _PHDR.pack(PT_LOAD, 0, off, seg.paddr, seg.paddr, seg.size, seg.size, 0)
        for seg, off in zip(loads, offsets, strict=True)
    ]
    # PN_XNUM: section 0 is empty except sh_info, which holds the real program header count.
    shdr = _SHDR.pack(0, 0, 0, 0, 0, 0, 0, phnum, 0, 0) if xnum else b""
    head = ehdr + b"".join(phdrs) + shdr + notes
    assert len(head) == notes_off + len(notes)
    return CoreLayout(head, tuple(offsets), pos)
