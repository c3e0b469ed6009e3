"""QEMU migration stream: streaming parser, layout model and regenerator (format layer).

What it is for: a capture reads the stream QEMU writes for ``migrate`` and splits it into
per-RAMBlock page images (which deduplicate across captures) plus the verbatim non-RAM
device state; a restore writes a valid stream again from what was stored.  The layout
of everything that is not RAM (header, configuration, RAM block list, the ordered device
section records, the vmdesc JSON trailer) is kept in a :class:`StreamLayout`, a small
JSON-serialisable object; the device section bodies are concatenated into one "devstate"
byte string that the layout's records index into.

Layer: ``vmarchive.format`` -- pure logic, imports only :mod:`vmarchive.errors` and the
standard library.  It never holds guest RAM in memory: pages are handed to a sink one at
a time as a view that is valid only during the callback.

Stream facts this module relies on (QEMU 7.2, x86; all integers big-endian)::

    header          be32 magic "QEVM" | be32 version 3                      = 8 bytes
    configuration   u8 0x07 | be32 n | n bytes machine type | subsections (u8 0x05 ...)
    section START/FULL
                    u8 type | be32 section id | u8 n | n bytes idstr | be32 instance id
                    | be32 version id                               = 14 + n bytes
    section PART/END
                    u8 type | be32 section id                       = 5 bytes
    section footer  u8 0x7E | be32 section id                       = 5 bytes
    ram record      be64 (offset | flags); flags live in the low 12 bits (4 KiB pages)
                    unless CONTINUE: u8 n | n bytes RAMBlock idstr
                    ZERO: u8 fill byte     PAGE: 4096 bytes
    MEM_SIZE        be64 (total | 0x04) then per block: u8 n | idstr | be64 used length
                    (page size / address follow only with postcopy / x-ignore-shared,
                    both refused)
    trailer         u8 0x00 (EOF) | u8 0x06 | be32 n | n bytes vmdesc JSON

Device (non-iterable, FULL) sections carry no length.  Their ends are found with the
vmdesc trailer, which lists every device section QEMU wrote, in order: the body of
section *k* ends at the one footer ``0x7E + be32(id)`` that is followed by exactly the
header of section *k+1* named in vmdesc (or by EOF for the last).  More than one such
candidate is refused rather than guessed.  Precopy streams re-send dirty pages (later
records win); background-snapshot streams send each page once; both parse the same way.

Anything outside the allow-list (other versions, flags, section types, commands,
subsections, page sizes, iterable sections other than ``ram``) raises
:class:`~vmarchive.errors.StreamRefusedError`; the capture then stores the stream opaquely.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import queue
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import msgspec
import xxhash

from vmarchive.errors import StreamError, StreamRefusedError
from vmarchive.progress import Task

# --- constants (see the byte table in the module docstring) -------------------------------

QEVM_MAGIC = 0x5145564D  # b"QEVM"
QEVM_VERSION = 3
HEADER_SIZE = 8  # be32 magic + be32 version

SEC_EOF = 0x00
SEC_START = 0x01
SEC_PART = 0x02
SEC_END = 0x03
SEC_FULL = 0x04
SEC_SUBSECTION = 0x05
SEC_VMDESC = 0x06
SEC_CONFIGURATION = 0x07
SEC_COMMAND = 0x08
SEC_FOOTER = 0x7E

SECTION_NAMES = {
    SEC_EOF: "EOF",
    SEC_START: "START",
    SEC_PART: "PART",
    SEC_END: "END",
    SEC_FULL: "FULL",
    SEC_SUBSECTION: "SUBSECTION",
    SEC_VMDESC: "VMDESC",
    SEC_CONFIGURATION: "CONFIGURATION",
    SEC_COMMAND: "COMMAND",
    SEC_FOOTER: "FOOTER",
}

RAM_IDSTR = "ram"
RAM_SECTION_VERSION = 4
TARGET_PAGE_SIZE = 4096
_FLAG_MASK = TARGET_PAGE_SIZE - 1  # flags share the be64 with a page-aligned offset

RAM_FLAG_FULL = 0x01  # obsolete, never written by 7.2
RAM_FLAG_ZERO = 0x02
RAM_FLAG_MEM_SIZE = 0x04
RAM_FLAG_PAGE = 0x08
RAM_FLAG_EOS = 0x10
RAM_FLAG_CONTINUE = 0x20
RAM_FLAG_XBZRLE = 0x40
RAM_FLAG_HOOK = 0x80  # RDMA
RAM_FLAG_COMPRESS_PAGE = 0x100
RAM_FLAG_MULTIFD_FLUSH = 0x200  # newer QEMU

_RAM_FLAG_NAMES = {
    RAM_FLAG_FULL: "FULL",
    RAM_FLAG_XBZRLE: "XBZRLE",
    RAM_FLAG_HOOK: "HOOK (RDMA)",
    RAM_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}
_RAM_FLAGS_ALLOWED = (
    RAM_FLAG_ZERO | RAM_FLAG_MEM_SIZE | RAM_FLAG_PAGE | RAM_FLAG_EOS | RAM_FLAG_CONTINUE
)

CONFIG_SUBSECTION_UUID = "configuration/uuid"
_CONFIG_UUID_SIZE = 16

#: The device-state tail (device sections + vmdesc) is buffered whole before it is split;
#: it is small (hundreds of KiB for a PC), so a huge one means something unexpected.
DEFAULT_MAX_TAIL = 256 << 20
DEFAULT_READ_SIZE = 1 << 20

_BE32 = struct.Struct(">I")
#: A FOOTER record followed by the start of a FULL section (:func:`_footers`).
_FOOTER_BEFORE_HEADER = re.compile(
    re.escape(bytes([SEC_FOOTER])) + rb"(?=.{4}" + re.escape(bytes([SEC_FULL])) + rb")", re.DOTALL
)
_BE64 = struct.Struct(">Q")
_ZERO_PAGE = bytes(TARGET_PAGE_SIZE)

#: Runs: QEMU sends most of RAM as long runs of CONTINUE records of one kind at
#: consecutive offsets; the parser takes ``_RUN`` of them at a time with one struct call
#: (headers checked against the expected sequence, bodies joined) instead of one record
#: at a time, and hands them to a sink's ``ram_pages`` at once.
_RUN = 16
_PAGE_REC = 8 + TARGET_PAGE_SIZE
#: the largest RAM record: 8 header + 1 + 255 idstr + 4096 page
_MAX_RECORD = 8 + 256 + TARGET_PAGE_SIZE
_ZERO_REC = 8 + 1
_PAGE_CONT = RAM_FLAG_PAGE | RAM_FLAG_CONTINUE
_ZERO_CONT = RAM_FLAG_ZERO | RAM_FLAG_CONTINUE
_RUN_PAGES = struct.Struct(">" + f"Q{TARGET_PAGE_SIZE}x" * _RUN)
_RUN_ZEROS = struct.Struct(">" + "QB" * _RUN)
_RUN_FILLS = (0,) * _RUN
_RUN_MARKS = b"\x01" * _RUN
#: records to parse one by one after a run did not match, before trying again
_RUN_COOLDOWN = 8
#: Zero runs are taken ``_ZRUN`` records (2 MiB of RAM) at a time where they start at a
#: multiple of that: untouched RAM is most of a guest's stream records, 9 bytes each.
#: The run's bytes are compared with the ones expected (headers at consecutive offsets,
#: fill bytes 0), built with one struct call.
_ZRUN = 512
_ZRUN_BYTES = _ZRUN * TARGET_PAGE_SIZE
_ZRUN_LEN = _ZRUN * _ZERO_REC
_ZRUN_EXPECT = struct.Struct(">" + "Qx" * _ZRUN)
_ZRUN_MARKS = b"\x01" * _ZRUN

# --- model ----------------------------------------------------------------------------------


class RamBlock(msgspec.Struct, frozen=True):
    """One RAMBlock as announced by the MEM_SIZE record (index = position in that list)."""

    index: int
    idstr: str
    used_length: int
    page_size: int = TARGET_PAGE_SIZE

    @property
    def pages(self) -> int:
        return (self.used_length + self.page_size - 1) // self.page_size


class SectionRecord(msgspec.Struct, frozen=True):
    """A non-RAM section: its header fields and where its body sits in devstate."""

    section_type: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    length: int


class RamSection(msgspec.Struct, frozen=True):
    """Header fields of the iterable ``ram`` section (START)."""

    section_id: int
    instance_id: int
    version_id: int


@dataclass
class StreamStats:
    """What the parser saw; useful in the manifest and for tests."""

    stream_bytes: int = 0
    page_records: int = 0
    zero_records: int = 0
    resent_pages: int = 0
    unsent_pages: int = 0
    ram_sections: int = 0


@dataclass
class StreamLayout:
    """Everything of a stream except RAM contents and device bodies (JSON-serialisable).

    ``records`` index into a separate "devstate" byte string (the concatenated device
    section bodies, in stream order).
    """

    version: int
    configuration: bytes
    ram: RamSection | None
    ram_blocks: list[RamBlock]
    records: list[SectionRecord]
    vmdesc: bytes
    stats: StreamStats = field(default_factory=StreamStats)

    LAYOUT_VERSION = 1

    @property
    def devstate_size(self) -> int:
        return sum(r.length for r in self.records)

    def vmdesc_devices(self) -> list[tuple[str, int]]:
        """(name, instance id) of each device section vmdesc lists, in order.

        Raises StreamError if vmdesc is not the JSON QEMU writes.
        """
        return _vmdesc_devices(self.vmdesc)

    def validate(self) -> None:
        """Check the layout describes a stream QEMU can load without silent loss.

        QEMU itself accepts a stream that lacks a device section (the guest then hangs)
        or lacks MEM_SIZE, so we check both here.  Raises StreamError.
        """
        if self.version != QEVM_VERSION:
            raise StreamError(f"layout has stream version {self.version}, expected 3")
        if self.ram is None or not self.ram_blocks:
            raise StreamError("layout has no ram section / MEM_SIZE block list")
        for i, b in enumerate(self.ram_blocks):
            if b.index != i or b.page_size != TARGET_PAGE_SIZE or b.used_length % b.page_size:
                raise StreamError(f"layout has an inconsistent RAM block {b.idstr!r}")
        offset = 0
        for r in self.records:
            if r.offset != offset or r.length < 0:
                raise StreamError(f"device record {r.idstr!r} is not contiguous in devstate")
            offset += r.length
        want = self.vmdesc_devices()
        have = [(r.idstr, r.instance_id) for r in self.records]
        if want != have:
            missing = [d for d in want if d not in have]
            extra = [d for d in have if d not in want]
            raise StreamError(
                "device sections do not match vmdesc"
                f" (missing {missing or 'none'}, unexpected {extra or 'none'},"
                " or out of order)",
                missing=missing,
                extra=extra,
            )

    def to_json(self) -> dict[str, Any]:
        """A plain JSON object (bytes as base64)."""
        return {
            "layout_version": self.LAYOUT_VERSION,
            "version": self.version,
            "configuration": base64.b64encode(self.configuration).decode("ascii"),
            "ram": None
            if self.ram is None
            else {
                "section_id": self.ram.section_id,
                "instance_id": self.ram.instance_id,
                "version_id": self.ram.version_id,
            },
            "ram_blocks": [
                {"idstr": b.idstr, "used_length": b.used_length, "page_size": b.page_size}
                for b in self.ram_blocks
            ],
            "records": [
                {
                    "type": r.section_type,
                    "section_id": r.section_id,
                    "idstr": r.idstr,
                    "instance_id": r.instance_id,
                    "version_id": r.version_id,
                    "offset": r.offset,
                    "length": r.length,
                }
                for r in self.records
            ],
            "vmdesc": base64.b64encode(self.vmdesc).decode("ascii"),
            "stats": {
                "stream_bytes": self.stats.stream_bytes,
                "page_records": self.stats.page_records,
                "zero_records": self.stats.zero_records,
                "resent_pages": self.stats.resent_pages,
                "unsent_pages": self.stats.unsent_pages,
                "ram_sections": self.stats.ram_sections,
            },
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StreamLayout:
        """Inverse of :meth:`to_json`.  Raises StreamError on a malformed object."""
        try:
            if obj["layout_version"] != cls.LAYOUT_VERSION:
                raise StreamError(f"unknown stream layout version {obj['layout_version']!r}")
            ram = obj["ram"]
            return cls(
                version=int(obj["version"]),
                configuration=base64.b64decode(obj["configuration"], validate=True),
                ram=None
                if ram is None
                else RamSection(
                    int(ram["section_id"]), int(ram["instance_id"]), int(ram["version_id"])
                ),
                ram_blocks=[
                    RamBlock(i, str(b["idstr"]), int(b["used_length"]), int(b["page_size"]))
                    for i, b in enumerate(obj["ram_blocks"])
                ],
                records=[
                    SectionRecord(
                        int(r["type"]),
                        int(r["section_id"]),
                        str(r["idstr"]),
                        int(r["instance_id"]),
                        int(r["version_id"]),
                        int(r["offset"]),
                        int(r["length"]),
                    )
                    for r in obj["records"]
                ],
                vmdesc=base64.b64decode(obj["vmdesc"], validate=True),
                stats=StreamStats(**{k: int(v) for k, v in obj.get("stats", {}).items()}),
            )
        except StreamError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise StreamError(f"malformed stream layout JSON: {e}") from e


def _vmdesc_devices(vmdesc: bytes) -> list[tuple[str, int]]:
    try:
        doc = json.loads(vmdesc)
        return [(str(d["name"]), int(d["instance_id"])) for d in doc["devices"]]
    except (ValueError, KeyError, TypeError) as e:
        raise StreamError(f"vmdesc is not the JSON QEMU writes: {e}") from e


# --- sink -----------------------------------------------------------------------------------


class StreamSink(Protocol):
    """Receives the parts of a stream as the parser meets them.

    Order: ``header``, ``configuration``, ``ram_blocks`` (once, at MEM_SIZE), any number
    of ``ram_page`` (a page may come several times: the last one wins), then every
    ``device_section`` in stream order, then ``vmdesc``.  ``data`` views are valid only
    during the call: copy what you keep.
    """

    def header(self, version: int) -> None: ...

    def configuration(self, data: bytes) -> None: ...

    def ram_blocks(self, blocks: list[RamBlock]) -> None: ...

    def ram_page(self, block: RamBlock, offset: int, data: memoryview | None) -> None:
        """``data`` is one 4 KiB page; None means a zero page."""

    # Optional: ``ram_section(ram)`` is told the ram section's ids (a RamSection) just
    # before ``ram_blocks``.

    # Optional: ``ram_pages(block, offset, data, count)`` takes ``count`` pages at
    # consecutive offsets at once (``data`` holds them back to back; None: all zero
    # pages); a sink without it gets ``count`` ``ram_page`` calls instead.

    # Optional: ``ram_pages_wired(block, offset, data, count, wire)`` takes the place of
    # ``ram_pages`` for a run of data pages that came as one group of CONTINUE records,
    # in order and with nothing between them; ``wire`` is a view of those records as
    # they were read (valid only during the call), for a check that the regenerator
    # writes them again byte for byte (:func:`records_digest`).

    def device_section(self, record: SectionRecord, data: memoryview) -> None: ...

    def vmdesc(self, data: bytes) -> None: ...


class NullSink:
    """A sink that ignores everything; subclass it and override what you need."""

    def header(self, version: int) -> None:
        pass

    def configuration(self, data: bytes) -> None:
        pass

    def ram_blocks(self, blocks: list[RamBlock]) -> None:
        pass

    def ram_page(self, block: RamBlock, offset: int, data: memoryview | None) -> None:
        pass

    def ram_pages(self, block: RamBlock, offset: int, data: bytes | None, count: int) -> None:
        """``count`` pages at once; by default one :meth:`ram_page` call each."""
        _pages_one_by_one(self.ram_page, block, offset, data, count)

    def device_section(self, record: SectionRecord, data: memoryview) -> None:
        pass

    def vmdesc(self, data: bytes) -> None:
        pass


def _pages_one_by_one(
    ram_page: Callable[[RamBlock, int, memoryview | None], None],
    block: RamBlock,
    offset: int,
    data: bytes | None,
    count: int,
) -> None:
    ps = TARGET_PAGE_SIZE
    if data is None:
        for i in range(count):
            ram_page(block, offset + i * ps, None)
    else:
        mv = memoryview(data)
        for i in range(count):
            ram_page(block, offset + i * ps, mv[i * ps : (i + 1) * ps])


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes | None: ...


# --- parser ---------------------------------------------------------------------------------


class _Input:
    """Block reader over a file or pipe: big reads, no per-byte Python work.

    The buffer is an immutable ``bytes`` so that views handed to sinks stay valid even if
    a sink keeps them a little too long.  A record that straddles two reads is not made
    contiguous by joining the unread remainder to the whole next read (a copy of every
    byte of the stream, ~1 MiB per read): :meth:`fill` makes a short *bridge* of the
    remainder and the next read's first ``n`` bytes, and once the parser is past the
    remainder it goes on in the read itself, where it is.
    """

    def __init__(self, f: _Readable, read_size: int, task: Task | None = None) -> None:
        self._f = f
        self._read_size = read_size
        self._task = task
        self.buf = b""
        self.mv = memoryview(self.buf)
        self.pos = 0
        self.base = 0  # stream offset of buf[0]
        self.eof = False
        #: while ``buf`` is a bridge: the read it bridges to, where that read's first byte
        #: is in ``buf``, and how many of its bytes ``buf`` holds
        self._next: bytes | None = None
        self._next_at = 0
        self._next_held = 0

    def _read(self, n: int) -> bytes:
        d = self._f.read(n)
        if d is None:
            # a non-blocking source would make us spin; the caller must pass a blocking one
            raise StreamError("migration stream source is non-blocking (read returned None)")
        if self._task is not None:
            self._task.advance(len(d))
        return d

    def _set(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.mv = memoryview(buf)
        self.pos = pos

    def _unbridged(self) -> list[bytes]:
        """The unread bytes: ``buf``'s, then those of the read it bridges to (if any) that
        it does not hold; the bridge is given up."""
        parts = [self.buf[self.pos :]]
        if self._next is not None:
            parts.append(self._next[self._next_held :])
            self._next = None
        return parts

    def fill(self, n: int) -> None:
        """Make at least ``n`` unread bytes available, fewer only at end of stream."""
        have = len(self.buf) - self.pos
        if have >= n:
            return
        nxt = self._next
        if nxt is not None and self.pos >= self._next_at:
            # Past the bridge's old bytes: the rest of it is the read's own head.
            self._next = None
            self.base += self._next_at
            self._set(nxt, self.pos - self._next_at)
            have = len(nxt) - self.pos
            if have >= n:
                return
        if self._next is not None and nxt is not None:
            # Still in the bridge's old bytes, and more is wanted (a run starting there):
            # a longer bridge, not the unread bytes joined to the whole read.
            old = self.buf[self.pos : self._next_at]
            m = min(len(nxt), max(n, self._next_held))
            if len(old) + m >= n:
                self.base += self.pos
                self._next_at, self._next_held = len(old), m
                self._set(old + nxt[:m], 0)
                return
        if self.eof:
            return
        parts = self._unbridged()
        have = sum(len(x) for x in parts)
        fresh = 0  # reads made here
        while have < n:
            d = self._read(max(self._read_size, n - have))
            if not d:
                self.eof = True
                break
            parts.append(d)
            fresh += 1
            have += len(d)
        self.base += self.pos
        parts = [x for x in parts if x]
        if not parts:
            self._set(b"", 0)
        elif len(parts) == 1:
            # Nothing left over (a source whose buffers end on records): no copy at all.
            self._set(parts[0], 0)
        elif len(parts) == 2 and fresh == 1 and len(parts[1]) > n:
            # A remainder and one new read: bridge them (copies the remainder and n bytes).
            old, new = parts
            self._next, self._next_at, self._next_held = new, len(old), n
            self._set(old + new[:n], 0)
        else:
            self._set(b"".join(parts), 0)

    def need(self, n: int, what: str) -> None:
        self.fill(n)
        if len(self.buf) - self.pos < n:
            raise StreamError(
                f"migration stream truncated in {what} at offset {self.base + self.pos}",
                offset=self.base + self.pos,
            )

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def be32(self, what: str) -> int:
        self.need(4, what)
        v: int = _BE32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return v

    def be64(self, what: str) -> int:
        self.need(8, what)
        v: int = _BE64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return v

    def idstr(self, what: str) -> str:
        n = self.u8(what)
        raw = self.take(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamRefusedError(f"non-ASCII name {raw!r} in {what}") from None

    def rest(self, limit: int) -> bytes:
        """All unread bytes up to end of stream; StreamRefusedError beyond ``limit``."""
        parts = self._unbridged()
        have = sum(len(x) for x in parts)
        while not self.eof:
            d = self._read(self._read_size)
            if not d:
                self.eof = True
                break
            parts.append(d)
            have += len(d)
            if have > limit:
                raise StreamRefusedError(
                    f"device state after RAM exceeds {limit} bytes; refusing to buffer it"
                )
        self.base += self.pos + have
        self._set(b"", 0)
        return b"".join(parts)

    @property
    def offset(self) -> int:
        return self.base + self.pos


class _Parser:
    def __init__(self, inp: _Input, sink: StreamSink, max_tail: int) -> None:
        self.inp = inp
        self.sink = sink
        self.max_tail = max_tail
        self.ram: RamSection | None = None
        self.blocks: list[RamBlock] = []
        self.by_name: dict[str, RamBlock] = {}
        self.seen: list[bytearray] = []
        self.last_block: RamBlock | None = None
        self.stats = StreamStats()
        self.configuration = b""
        self.records: list[SectionRecord] = []
        self.vmdesc = b""

    # header and configuration --------------------------------------------------------------

    def parse(self) -> StreamLayout:
        inp = self.inp
        magic = inp.be32("header")
        if magic != QEVM_MAGIC:
            raise StreamRefusedError(f"not a QEMU migration stream (magic {magic:#010x})")
        version = inp.be32("header")
        if version != QEVM_VERSION:
            raise StreamRefusedError(f"stream version {version} (only {QEVM_VERSION} allowed)")
        self.sink.header(version)
        if inp.u8("configuration") != SEC_CONFIGURATION:
            raise StreamRefusedError("stream has no configuration section")
        self._configuration()
        while True:
            t = inp.u8("section type")
            if t in (SEC_START, SEC_PART, SEC_END):
                self._ram_section(t)
            elif t in (SEC_FULL, SEC_EOF):
                inp.pos -= 1  # the tail parser re-reads this type byte
                self._tail(inp.rest(self.max_tail))
                break
            elif t == SEC_COMMAND:
                cmd = inp.be32("command") >> 16  # be16 command, be16 length
                raise StreamRefusedError(
                    f"stream carries COMMAND {cmd} (postcopy/return path/packaged)"
                )
            else:
                name = SECTION_NAMES.get(t, "unknown")
                raise StreamRefusedError(
                    f"unexpected section type {t:#04x} ({name}) at offset {inp.offset - 1}"
                )
        self._finish_stats()
        layout = StreamLayout(
            version=version,
            configuration=self.configuration,
            ram=self.ram,
            ram_blocks=list(self.blocks),
            records=self.records,
            vmdesc=self.vmdesc,
            stats=self.stats,
        )
        layout.validate()
        return layout

    def _configuration(self) -> None:
        inp = self.inp
        start = inp.offset
        raw = bytearray()
        n = inp.be32("configuration")
        if n > 255:
            raise StreamRefusedError(f"configuration machine name of {n} bytes")
        raw += _BE32.pack(n) + inp.take(n, "configuration")
        while True:
            inp.fill(1)
            if len(inp.buf) - inp.pos < 1 or inp.buf[inp.pos] != SEC_SUBSECTION:
                break
            inp.pos += 1
            name = inp.idstr("configuration subsection")
            ver = inp.be32("configuration subsection")
            if name != CONFIG_SUBSECTION_UUID:
                # target-page-bits means non-4 KiB pages; capabilities means
                # x-ignore-shared (RAM not in the stream): neither is supported.
                raise StreamRefusedError(f"configuration subsection {name!r} (version {ver})")
            body = inp.take(_CONFIG_UUID_SIZE, "configuration uuid")
            raw += bytes([SEC_SUBSECTION, len(name)]) + name.encode() + _BE32.pack(ver) + body
        assert inp.offset - start == len(raw)
        self.configuration = bytes(raw)
        self.sink.configuration(self.configuration)

    # ram -----------------------------------------------------------------------------------

    def _ram_section(self, t: int) -> None:
        inp = self.inp
        sid = inp.be32("section header")
        if t == SEC_START:
            idstr = inp.idstr("section header")
            instance_id = inp.be32("section header")
            version_id = inp.be32("section header")
            if idstr != RAM_IDSTR:
                raise StreamRefusedError(f"iterable section {idstr!r} (only 'ram' allowed)")
            if self.ram is not None:
                raise StreamRefusedError("second ram START section")
            if version_id != RAM_SECTION_VERSION:
                raise StreamRefusedError(f"ram section version {version_id} (only 4 allowed)")
            self.ram = RamSection(sid, instance_id, version_id)
        elif self.ram is None or sid != self.ram.section_id:
            raise StreamRefusedError(f"{SECTION_NAMES[t]} for unknown section id {sid}")
        self.stats.ram_sections += 1
        self._ram_records(start=t == SEC_START)
        inp.need(5, "section footer")
        if inp.buf[inp.pos] != SEC_FOOTER:
            raise StreamRefusedError(
                f"no section footer after ram section at offset {inp.offset}"
                " (machine without send-section-footer)"
            )
        (fid,) = _BE32.unpack_from(inp.buf, inp.pos + 1)
        if fid != sid:
            raise StreamError(f"section footer names id {fid}, expected {sid}")
        inp.pos += 5

    def _mem_size(self, total: int) -> None:
        if self.blocks:
            raise StreamRefusedError("second MEM_SIZE record")
        inp = self.inp
        remaining = total
        while remaining > 0:
            idstr = inp.idstr("MEM_SIZE block list")
            length = inp.be64("MEM_SIZE block list")
            if length % TARGET_PAGE_SIZE or length > remaining:
                raise StreamError(f"RAM block {idstr!r} has bad length {length}")
            if idstr in self.by_name:
                raise StreamError(f"RAM block {idstr!r} listed twice")
            b = RamBlock(len(self.blocks), idstr, length)
            self.blocks.append(b)
            self.by_name[idstr] = b
            self.seen.append(bytearray(b.pages))
            remaining -= length
        on_section = getattr(self.sink, "ram_section", None)
        if on_section is not None:
            assert self.ram is not None  # MEM_SIZE is read inside the ram START section
            on_section(self.ram)
        self.sink.ram_blocks(list(self.blocks))

    def _ram_records(self, start: bool) -> None:
        # The hot loop: one struct unpack per record, one view per page, no per-byte work.
        inp = self.inp
        sink_page = self.sink.ram_page
        by_name = self.by_name
        seen = self.seen
        stats = self.stats
        block = self.last_block
        unpack64 = _BE64.unpack_from
        page_size = TARGET_PAGE_SIZE
        # runs are taken only where the buffer holds them: filling for a whole run would
        # copy more at every refill
        want = _MAX_RECORD
        pages = zeros = resent = 0
        sink_pages = getattr(self.sink, "ram_pages", None)
        sink_wired = getattr(self.sink, "ram_pages_wired", None)
        run_bytes = _RUN * page_size
        cooldown = 0
        try:
            while True:
                if len(inp.buf) - inp.pos < want:
                    inp.fill(want)
                buf = inp.buf
                pos = inp.pos
                avail = len(buf)  # after fill(): anything short of a record is truncation
                if block is not None and cooldown == 0:
                    # A run of _RUN records of one kind, CONTINUE, at consecutive offsets?
                    (word,) = unpack64(buf, pos) if pos + 8 <= avail else (0,)
                    kind = word & _FLAG_MASK
                    run_data: bytes | None = None
                    addr = word ^ kind
                    heads: tuple[int, ...] | None
                    count = 0  # records of the run taken here, if any
                    if (
                        kind == _ZERO_CONT
                        and not addr % _ZRUN_BYTES
                        and avail - pos >= _ZRUN_LEN
                        and addr + _ZRUN_BYTES <= block.used_length
                        and buf.startswith(
                            _ZRUN_EXPECT.pack(*range(word, word + _ZRUN_BYTES, page_size)), pos
                        )
                    ):
                        count, n = _ZRUN, _ZRUN_LEN
                    else:
                        if addr % run_bytes:
                            # Runs start at multiples of their length only: a run is then
                            # one whole 64 KiB chunk of the page image, which a sink can
                            # take without copying it into a buffer.
                            heads = None
                        elif kind == _PAGE_CONT and avail - pos >= _RUN * _PAGE_REC:
                            heads = _RUN_PAGES.unpack_from(buf, pos)
                            n = _RUN * _PAGE_REC
                        elif kind == _ZERO_CONT and avail - pos >= _RUN * _ZERO_REC:
                            both = _RUN_ZEROS.unpack_from(buf, pos)
                            heads = both[0::2] if both[1::2] == _RUN_FILLS else ()
                            n = _RUN * _ZERO_REC
                        else:
                            heads = ()
                            if kind in (_PAGE_CONT, _ZERO_CONT) and not inp.eof:
                                # The buffer ends inside what may be a run: bridge into
                                # the next read (a short copy, see _Input) and look again
                                # (at the end of the stream, eof is set: no second time).
                                inp.fill(_RUN * (_PAGE_REC if kind == _PAGE_CONT else _ZERO_REC))
                                continue
                        if (
                            heads
                            and heads == tuple(range(word, word + run_bytes, page_size))
                            and addr + run_bytes <= block.used_length
                        ):
                            count = _RUN
                            if kind == _PAGE_CONT:
                                mv = inp.mv
                                first = pos + 8
                                run_data = b"".join(
                                    [
                                        mv[p : p + page_size]
                                        for p in range(first, first + n, _PAGE_REC)
                                    ]
                                )
                        elif heads is not None:
                            cooldown = _RUN_COOLDOWN
                    if count:
                        if kind == _ZERO_CONT:
                            zeros += count
                        inp.pos = pos + n
                        pages += count
                        marks = seen[block.index]
                        pi = addr // page_size
                        resent += marks.count(1, pi, pi + count)
                        marks[pi : pi + count] = _RUN_MARKS if count == _RUN else _ZRUN_MARKS
                        if run_data is not None and sink_wired is not None:
                            sink_wired(block, addr, run_data, count, inp.mv[pos : pos + n])
                        elif sink_pages is not None:
                            sink_pages(block, addr, run_data, count)
                        else:
                            _pages_one_by_one(sink_page, block, addr, run_data, count)
                        continue
                elif cooldown:
                    cooldown -= 1
                if pos + 8 > avail:
                    raise _truncated(inp, pos, "ram record")
                (word,) = unpack64(buf, pos)
                pos += 8
                flags = word & _FLAG_MASK
                addr = word ^ flags
                if flags & ~_RAM_FLAGS_ALLOWED:
                    bad = [n for f, n in _RAM_FLAG_NAMES.items() if flags & f]
                    raise StreamRefusedError(
                        f"ram record flags {flags:#x} ({', '.join(bad) or 'unknown'})"
                        f" at offset {inp.base + pos - 8}"
                    )
                if flags & RAM_FLAG_EOS:
                    inp.pos = pos
                    if flags != RAM_FLAG_EOS:
                        raise StreamError(f"EOS combined with flags {flags:#x}")
                    break
                if flags & RAM_FLAG_MEM_SIZE:
                    inp.pos = pos
                    if not start or flags != RAM_FLAG_MEM_SIZE:
                        raise StreamRefusedError("MEM_SIZE outside the ram START section")
                    self._mem_size(addr)
                    continue
                kind = flags & (RAM_FLAG_ZERO | RAM_FLAG_PAGE)
                if kind == 0 or kind == RAM_FLAG_ZERO | RAM_FLAG_PAGE:
                    raise StreamError(f"ram record flags {flags:#x} name no page kind")
                if flags & RAM_FLAG_CONTINUE:
                    if block is None:
                        raise StreamError("CONTINUE page record before any block named")
                else:
                    if pos >= avail or pos + 1 + buf[pos] > avail:
                        raise _truncated(inp, pos, "ram record block name")
                    n = buf[pos]
                    name = buf[pos + 1 : pos + 1 + n].decode("ascii", "replace")
                    pos += 1 + n
                    found = by_name.get(name)
                    if found is None:
                        if not self.blocks:
                            raise StreamRefusedError("page record before MEM_SIZE")
                        raise StreamError(f"page for unknown RAM block {name!r}")
                    block = found
                if addr >= block.used_length:
                    raise StreamError(
                        f"page offset {addr:#x} beyond RAM block {block.idstr!r}"
                        f" ({block.used_length:#x} bytes)"
                    )
                if flags & RAM_FLAG_ZERO:
                    if pos >= avail:
                        raise _truncated(inp, pos, "zero page")
                    fill = buf[pos]
                    pos += 1
                    if fill:
                        raise StreamRefusedError(f"ZERO page with fill byte {fill:#04x}")
                    data = None
                    zeros += 1
                else:
                    if pos + page_size > avail:
                        raise _truncated(inp, pos, "page data")
                    data = inp.mv[pos : pos + page_size]
                    pos += page_size
                inp.pos = pos
                pages += 1
                marks = seen[block.index]
                pi = addr // page_size
                if marks[pi]:
                    resent += 1
                else:
                    marks[pi] = 1
                sink_page(block, addr, data)
        finally:
            self.last_block = block
            stats.page_records += pages
            stats.zero_records += zeros
            stats.resent_pages += resent

    def _finish_stats(self) -> None:
        self.stats.unsent_pages = sum(m.count(0) for m in self.seen)
        self.stats.stream_bytes = self.inp.offset

    # device tail ---------------------------------------------------------------------------

    def _tail(self, tail: bytes) -> None:
        vm_at = _find_vmdesc(tail)
        self.vmdesc = tail[vm_at + 6 :]
        devices = _vmdesc_devices(self.vmdesc)
        mv = memoryview(tail)
        footers = _footers(tail, vm_at)
        pos = 0
        offset = 0
        for k, (name, instance) in enumerate(devices):
            hdr = _parse_full_header(tail, pos, name, instance)
            if hdr is None:
                raise StreamError(
                    f"device section {name!r} instance {instance} listed in vmdesc is not"
                    f" the next section (stream offset {self.inp.base - len(tail) + pos})",
                    missing=[name],
                )
            sid, version_id, body = hdr
            nxt = devices[k + 1] if k + 1 < len(devices) else None
            end = _find_section_end(tail, body, sid, nxt, vm_at, name, footers.get(sid, ()))
            rec = SectionRecord(SEC_FULL, sid, name, instance, version_id, offset, end - body)
            self.records.append(rec)
            self.sink.device_section(rec, mv[body:end])
            offset += end - body
            pos = end + 5
        if pos != vm_at:
            t = tail[pos]
            raise StreamError(
                f"section of type {SECTION_NAMES.get(t, hex(t))} after the last device"
                " section that vmdesc lists"
            )
        self.sink.vmdesc(self.vmdesc)


def _truncated(inp: _Input, pos: int, what: str) -> StreamError:
    return StreamError(
        f"migration stream truncated in {what} at offset {inp.base + pos}",
        offset=inp.base + pos,
    )


def _find_vmdesc(tail: bytes) -> int:
    """Offset of the EOF byte that precedes the vmdesc trailer ending the stream."""
    end = len(tail)
    hi = end
    while True:
        i = tail.rfind(b"\x00\x06", 0, hi)
        if i < 0:
            raise StreamRefusedError("stream has no vmdesc trailer after EOF")
        if i + 6 <= end and _BE32.unpack_from(tail, i + 2)[0] == end - i - 6:
            return i
        hi = i + 1  # the pair may overlap the length field; step back one byte


def _parse_full_header(
    tail: bytes, pos: int, name: str, instance: int
) -> tuple[int, int, int] | None:
    """(section id, version id, body offset) if a FULL header for name/instance is at pos."""
    n = len(name)
    if pos + 14 + n > len(tail) or tail[pos] != SEC_FULL or tail[pos + 5] != n:
        return None
    if tail[pos + 6 : pos + 6 + n] != name.encode("ascii", "replace"):
        return None
    (inst,) = _BE32.unpack_from(tail, pos + 6 + n)
    if inst != instance:
        return None
    (sid,) = _BE32.unpack_from(tail, pos + 1)
    (ver,) = _BE32.unpack_from(tail, pos + 10 + n)
    return sid, ver, pos + 14 + n


def _any_full_header(tail: bytes, pos: int) -> tuple[str, int] | None:
    """(idstr, instance id) of a plausible FULL section header at pos, else None."""
    if pos + 6 > len(tail) or tail[pos] != SEC_FULL:
        return None
    n = tail[pos + 5]
    if n == 0 or pos + 14 + n > len(tail):
        return None
    try:
        idstr = tail[pos + 6 : pos + 6 + n].decode("ascii")
    except UnicodeDecodeError:
        return None
    if not idstr.isprintable():
        return None
    return idstr, _BE32.unpack_from(tail, pos + 6 + n)[0]


def _footers(tail: bytes, vm_at: int) -> dict[int, list[int]]:
    """Every place before ``vm_at`` where a section could end, by the id of the section
    whose footer would be there, in stream order: a FOOTER byte whose five bytes (it and
    a section id) are followed by a FULL section's header or by the EOF at ``vm_at`` --
    nothing else can follow a device section's end (:func:`_find_section_end`).

    One pass over the device sections, in C (a regular expression): finding each
    section's end by searching the rest of them for its footer took time in the number
    of sections times their size (3 ms for the 29 sections, 56 KiB, of the bench guest;
    twice per capture, at the end of the stream and in the round trip).  A device state
    full of FOOTER bytes costs no Python per byte.
    """
    out: dict[int, list[int]] = {}
    for m in _FOOTER_BEFORE_HEADER.finditer(tail, 0, vm_at):
        i = m.start()
        out.setdefault(_BE32.unpack_from(tail, i + 1)[0], []).append(i)
    last = vm_at - 5
    if last >= 0 and tail[last] == SEC_FOOTER:
        out.setdefault(_BE32.unpack_from(tail, last + 1)[0], []).append(last)
    return out


def _find_section_end(
    tail: bytes,
    body: int,
    sid: int,
    nxt: tuple[str, int] | None,
    vm_at: int,
    name: str,
    footers: Sequence[int],
) -> int:
    """The one footer position after which the next expected thing follows.

    ``footers``: where section ``sid``'s footer could be, in order (:func:`_footers`).
    Raises StreamError when there is none and StreamRefusedError when there is more than
    one: a device body that happens to contain footer + next header is never guessed.
    """
    here = footers[bisect.bisect_left(footers, body) :]
    found = [
        i
        for i in here
        if (
            i + 5 == vm_at
            if nxt is None
            else _parse_full_header(tail, i + 5, nxt[0], nxt[1]) is not None
        )
    ]
    if not found:
        # Say what is there instead: usually a section vmdesc did not expect next,
        # i.e. a device section is missing or out of order.
        for i in here:
            other = _any_full_header(tail, i + 5)
            if other is not None:
                want = "EOF" if nxt is None else f"{nxt[0]!r} instance {nxt[1]}"
                raise StreamError(
                    f"after device section {name!r} the stream has {other[0]!r} instance"
                    f" {other[1]} but vmdesc lists {want} next (missing or out of order)",
                    missing=[] if nxt is None else [nxt[0]],
                )
        raise StreamError(f"end of device section {name!r} (id {sid}) not found")
    if len(found) > 1:
        raise StreamRefusedError(
            f"ambiguous end of device section {name!r}: {len(found)} candidate footers"
        )
    return found[0]


def parse_stream(
    f: _Readable,
    sink: StreamSink,
    *,
    read_size: int = DEFAULT_READ_SIZE,
    max_tail: int = DEFAULT_MAX_TAIL,
    progress: Task | None = None,
) -> StreamLayout:
    """Parse a whole migration stream from ``f`` (``read(n)``: file, pipe, socket file).

    ``f`` must be blocking; unbuffered (``buffering=0``) is fastest, since reads are
    already ``read_size`` blocks (give a pipe 1 MiB with F_SETPIPE_SZ).  ``progress``
    is advanced by the bytes read.  Calls ``sink`` as it goes and returns the validated
    layout.  Raises
    StreamRefusedError when the stream is outside the allow-list (store it opaquely),
    StreamError when it is truncated or inconsistent.
    """
    return _Parser(_Input(f, read_size, progress), sink, max_tail).parse()


# --- regenerator ----------------------------------------------------------------------------


class _Unsent:
    """The type of :data:`UNSENT`."""

    def __repr__(self) -> str:
        return "UNSENT"


#: Extent data meaning "no records for these pages": the regenerated stream leaves them
#: out (as QEMU leaves out pages it never sends), not even as ZERO records.  Only the
#: capture's round trip uses it, for pages its parent archive's round trip proved.
UNSENT: Final = _Unsent()

#: One extent of a block's page image: (offset, length, data; None for zeros, UNSENT).
RamExtent = tuple[int, int, "bytes | bytearray | memoryview | _Unsent | None"]
#: Called once per block, yields ascending non-overlapping extents; gaps are zeros.
RamSource = Callable[[RamBlock], Iterable[RamExtent]]


class _Writable(Protocol):
    def write(self, b: bytes | bytearray | memoryview, /) -> int | None: ...


class _Output:
    """Pieces of the stream, written out joined once ``flush_at`` bytes are gathered.

    A list of pieces, not a growing bytearray: a bytearray emptied after each write is
    freed and regrown by reallocation on the next, which cost a fresh process (a restore)
    about as much as generating the stream (measured: 0.36 -> 0.105 s for 404 MB).
    """

    def __init__(self, out: _Writable, flush_at: int) -> None:
        self._out = out
        self.flush_at = flush_at
        self.parts: list[bytes | bytearray | memoryview] = []
        self.size = 0
        self.written = 0

    def add(self, b: bytes | bytearray | memoryview) -> None:
        self.parts.append(b)
        self.size += len(b)
        if self.size >= self.flush_at:
            self.flush()

    def add_whole(self, b: bytes | bytearray | memoryview) -> None:
        """:meth:`add`, flushing first if ``b`` would take the buffer past ``flush_at``:
        buffers then stay within it unless one piece is larger."""
        self.add_parts([b], len(b))

    def add_parts(self, parts: Sequence[bytes | bytearray | memoryview], nbytes: int) -> None:
        """:meth:`add_whole` for pieces that must stay together in one buffer (``nbytes``
        in all); they are copied once, by the join at :meth:`flush`, so views of
        immutable source buffers are written without a copy of their own."""
        if self.size and self.size + nbytes > self.flush_at:
            self.flush()
        self.parts += parts
        self.size += nbytes
        if self.size >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            # the whole object first: a writer may keep (immutable) bytes without a copy
            n = self._out.write(data if not done else mv[done:])
            # buffered writers return None / the full length; raw ones may write less
            done += len(mv) - done if n is None else n
        mv.release()
        self.written += len(data)


def _section_header(t: int, sid: int, idstr: str, instance: int, version: int) -> bytes:
    name = idstr.encode("ascii")
    return (
        bytes([t])
        + _BE32.pack(sid)
        + bytes([len(name)])
        + name
        + _BE32.pack(instance)
        + _BE32.pack(version)
    )


def _footer(sid: int) -> bytes:
    return bytes([SEC_FOOTER]) + _BE32.pack(sid)


def _iter_pages(
    block: RamBlock, extents: Iterable[RamExtent]
) -> Iterator[tuple[int, bytes | memoryview | None]]:
    """Every page of ``block`` in order, from extents; None = zero page."""
    ps = block.page_size
    for off, n, raw in _page_runs(block, extents):
        for i in range(n):
            page = None if raw is None else raw[i * ps : (i + 1) * ps]
            yield off + i * ps, (None if page == _ZERO_PAGE else page)


def _emit_pages_one_by_one(
    o: _Output,
    blocks: list[RamBlock],
    ram_source: RamSource,
    send_zero_pages: bool,
    on_page: Callable[[RamBlock, int, bytes | memoryview | None], None],
) -> None:
    """The RAM records page by page, each page shown to ``on_page`` first."""
    pack64 = _BE64.pack
    zero_tail = b"\x00"
    body: bytes | memoryview
    for b in blocks:
        named = _named(b)
        first = True
        for off, page in _iter_pages(b, ram_source(b)):
            on_page(b, off, page)
            if page is None:
                if not send_zero_pages:
                    continue
                flags = RAM_FLAG_ZERO
                body = zero_tail
            else:
                flags = RAM_FLAG_PAGE
                body = page
            if first:
                o.add(pack64(off | flags) + named)
                first = False
            else:
                o.add(pack64(off | flags | RAM_FLAG_CONTINUE))
            o.add(body)


def _named(block: RamBlock) -> bytes:
    name = block.idstr.encode("ascii")
    return bytes([len(name)]) + name


#: Zero records per struct call when written in bulk (9 bytes each).
_EMIT_ZEROS = 512
_zero_structs: dict[int, struct.Struct] = {}


def _zero_struct(n: int) -> struct.Struct:
    """``n`` ZERO records (x: each record's fill byte)."""
    st = _zero_structs.get(n)
    if st is None:
        st = _zero_structs.setdefault(n, struct.Struct(">" + "Qx" * n))
    return st


def _bytes_under(data: bytes | bytearray | memoryview) -> bytes | None:
    """The bytes object a contiguous view ``data`` shows (part of), else None.  Such a view
    cannot change; a view of a bytearray can, even when read-only: its owner may refill it."""
    if isinstance(data, memoryview) and data.c_contiguous:
        obj = data.obj
        if type(obj) is bytes:
            return obj
    return None


def _immutable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` as bytes nobody can change while the output holds pieces of it: bytes and
    views of bytes as they are (no copy, :func:`_bytes_under`); anything else copied."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and _bytes_under(data) is not None:
        return data.cast("B") if data.format != "B" or data.ndim != 1 else data
    return bytes(data)


def _page_runs(
    block: RamBlock, extents: Iterable[RamExtent]
) -> Iterator[tuple[int, int, bytes | memoryview | None]]:
    """The block as runs ``(offset, pages, data)`` in order, gaps and holes as ``None``,
    data runs as bytes or views of bytes (:func:`_immutable`); :data:`UNSENT` extents
    give no run at all.  Raises StreamError for an extent out of order, unaligned or out
    of range, or data of the wrong length."""
    ps = block.page_size
    nxt = 0
    for off, length, data in extents:
        if off < nxt or off % ps or length < 0 or off + length > block.used_length:
            raise StreamError(
                f"RAM source extent ({off:#x}, {length:#x}) of block {block.idstr!r}"
                " is unaligned, out of order or out of range"
            )
        if off > nxt:
            yield nxt, (off - nxt) // ps, None
        if isinstance(data, _Unsent):
            pass  # no records: the next run starts after it
        elif data is None:
            if length:
                yield off, -(-length // ps), None
        else:
            if len(data) != length or length % ps:
                raise StreamError(f"RAM source data for {block.idstr!r} has a bad length")
            if length:
                yield off, length // ps, _immutable(data)
        nxt = off + length
        nxt += -nxt % ps
    if nxt < block.used_length:
        yield nxt, -(-(block.used_length - nxt) // ps), None


def _emit_block(
    o: _Output,
    block: RamBlock,
    extents: Iterable[RamExtent],
    send_zero_pages: bool,
    *,
    named_before: bool = False,
) -> None:
    """The RAM records of one block, byte for byte what :func:`_emit_pages_one_by_one`
    writes, but in groups instead of Python work per page (the regenerator was four times
    slower than the parser): a struct call per group of zero records, and per group of
    data records a list of headers and page views that the output joins once.
    ``named_before``: records that follow others of the block (:func:`records_digest`),
    so the first one continues it instead of naming it."""
    ps = block.page_size
    named = _named(block)
    first = not named_before  # the block's first record names it; the others CONTINUE

    put = o.add_whole  # buffers within flush_at: check_round_trip's parser takes each whole
    put_parts = o.add_parts
    pack64 = _BE64.pack

    def zeros(off: int, n: int) -> None:
        nonlocal first
        if not send_zero_pages or n <= 0:
            return
        if first:
            put(_BE64.pack(off | RAM_FLAG_ZERO) + named + b"\x00")
            first = False
            off += ps
            n -= 1
        flags = RAM_FLAG_ZERO | RAM_FLAG_CONTINUE
        while n > 0:
            k = min(n, _EMIT_ZEROS)
            put(_zero_struct(k).pack(*range(off | flags, (off + k * ps) | flags, ps)))
            off += k * ps
            n -= k

    # data records per buffer: within the output's flush_at, so a buffer is never larger
    group = max(1, o.flush_at // (8 + ps))

    def pages(off: int, raw: bytes | memoryview, start: int, n: int) -> None:
        # n data pages from raw[start:], none of them all zero: each record's header and a
        # view of its page, joined once by the output (the only copy of the page)
        nonlocal first
        mv = memoryview(raw)
        flags = RAM_FLAG_PAGE | RAM_FLAG_CONTINUE
        while n > 0:
            k = min(n, group)
            parts: list[bytes | memoryview] = [b""] * (2 * k)
            parts[0::2] = [pack64(a) for a in range(off | flags, (off + k * ps) | flags, ps)]
            parts[1::2] = [mv[i : i + ps] for i in range(start, start + k * ps, ps)]
            nbytes = k * (8 + ps)
            if first:
                parts[0] = pack64(off | RAM_FLAG_PAGE) + named
                nbytes += len(named)
                first = False
            put_parts(parts, nbytes)
            off += k * ps
            start += k * ps
            n -= k

    for off, n, raw in _page_runs(block, extents):
        if raw is None:
            zeros(off, n)
            continue
        # zero pages inside data go out as ZERO records: find them (most pages are told
        # apart by their first or last byte)
        end = n * ps
        zero_at = [
            i
            for i in range(0, end, ps)
            if not raw[i] and not raw[i + ps - 1] and raw[i : i + ps] == _ZERO_PAGE
        ]
        done = 0
        for z in [*zero_at, end]:
            if z > done:
                pages(off + done, raw, done, (z - done) // ps)
            if z < end:
                zeros(off + z, 1)
            done = z + ps


def regenerate(
    layout: StreamLayout,
    devstate: bytes | bytearray | memoryview | _Readable,
    ram_source: RamSource,
    out: _Writable,
    *,
    send_zero_pages: bool = True,
    flush_at: int = 4 << 20,
    on_page: Callable[[RamBlock, int, bytes | memoryview | None], None] | None = None,
) -> int:
    """Write a QEMU 7.2 migration stream for ``layout`` to ``out``; return bytes written.

    Output (canonical form): header, configuration, ram START with the MEM_SIZE block
    list, one ram END section with every page of every block in order (zero pages as
    ZERO records unless ``send_zero_pages`` is False -- the destination's ROM blocks are
    not zero, so skipping is only safe where every block starts zeroed; extents given as
    :data:`UNSENT` get no records at all), the device sections byte-exact in their
    original order, EOF, vmdesc.  ``devstate`` is the concatenated device bodies, as
    bytes or a reader read sequentially.  Memory use is bounded by ``flush_at`` plus one
    extent of ``ram_source``.  ``on_page`` sees every
    page (None = zero) in the order written, e.g. to digest what was sent.

    A fresh ``-incoming`` QEMU 7.2 loaded streams without ZERO records correctly in our
    tests (its RAM starts zeroed and its ROMs match), but QEMU itself sends them, and a
    destination whose block differs from zero would silently keep its own bytes; so
    they are sent by default.

    Raises StreamError if the layout fails validation or the sources disagree with it.
    """
    layout.validate()
    assert layout.ram is not None
    o = _Output(out, flush_at)
    buf = bytearray()
    buf += _BE32.pack(QEVM_MAGIC) + _BE32.pack(layout.version)
    buf.append(SEC_CONFIGURATION)
    buf += layout.configuration
    ram = layout.ram
    buf += _section_header(SEC_START, ram.section_id, RAM_IDSTR, ram.instance_id, ram.version_id)
    total = sum(b.used_length for b in layout.ram_blocks)
    buf += _BE64.pack(total | RAM_FLAG_MEM_SIZE)
    for b in layout.ram_blocks:
        name = b.idstr.encode("ascii")
        buf += bytes([len(name)]) + name + _BE64.pack(b.used_length)
    buf += _BE64.pack(RAM_FLAG_EOS) + _footer(ram.section_id)
    buf += bytes([SEC_END]) + _BE32.pack(ram.section_id)
    o.add(buf)

    if on_page is None:
        for b in layout.ram_blocks:
            _emit_block(o, b, ram_source(b), send_zero_pages)
    else:
        _emit_pages_one_by_one(o, layout.ram_blocks, ram_source, send_zero_pages, on_page)
    o.add(_BE64.pack(RAM_FLAG_EOS) + _footer(ram.section_id))

    reader = None if isinstance(devstate, bytes | bytearray | memoryview) else devstate
    dev = None if reader is not None else memoryview(devstate)  # type: ignore[arg-type]
    for r in layout.records:
        o.add(_section_header(r.section_type, r.section_id, r.idstr, r.instance_id, r.version_id))
        if dev is not None:
            body = bytes(dev[r.offset : r.offset + r.length])
        else:
            assert reader is not None
            body = _read_exact(reader, r.length)
        if len(body) != r.length:
            raise StreamError(f"devstate too short for device section {r.idstr!r}")
        o.add(body)
        o.add(_footer(r.section_id))
    o.add(bytes([SEC_EOF, SEC_VMDESC]) + _BE32.pack(len(layout.vmdesc)) + layout.vmdesc)
    o.flush()
    return o.written


class _DigestOutput(_Output):
    """An :class:`_Output` that digests what would be written instead of joining it."""

    def __init__(self) -> None:
        super().__init__(self, 1 << 62)  # nothing is flushed: one group per data run
        self.h = _digest()

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        raise AssertionError("a digest output writes nothing")

    def add(self, b: bytes | bytearray | memoryview) -> None:
        self.h.update(b)

    def add_parts(self, parts: Sequence[bytes | bytearray | memoryview], nbytes: int) -> None:
        update = self.h.update
        for p in parts:
            update(p)


def wire_digest(records: bytes | bytearray | memoryview) -> bytes:
    """The digest :func:`records_digest` is compared with: of RAM records as read."""
    h = _digest()
    h.update(records)
    digest: bytes = h.digest()
    return digest


def records_digest(block: RamBlock, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """The :func:`wire_digest` of the records :func:`regenerate` writes for ``data`` at
    ``offset`` of ``block`` where other records of the block came before (the way every
    slot but the block's first is written), by the regenerator's own code, without
    writing them out.

    Equal to the digest of records a capture parsed into ``data`` (a group of CONTINUE
    records, :meth:`StreamSink.ram_pages_wired`), it shows that the regenerated stream
    carries those very bytes there, which parse to ``data`` as they did in the capture.
    """
    o = _DigestOutput()
    end = offset + len(data)
    extents: list[RamExtent] = [(offset, len(data), data)]
    if offset:
        extents.insert(0, (0, offset, UNSENT))
    if end < block.used_length:
        extents.append((end, block.used_length - end, UNSENT))
    _emit_block(o, block, extents, True, named_before=True)
    digest: bytes = o.h.digest()
    return digest


# --- round-trip check ------------------------------------------------------------------------


@dataclass
class RoundTripReport:
    """Result of :func:`check_round_trip`; ``problems`` is empty when it round-trips."""

    stream_bytes: int = 0
    pages: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _digest() -> Any:
    """The round trip's digest: both sides run in this process, so it needs to catch
    accidents (a mis-framed, lost, duplicated or reordered page), not forgeries; xxh3-128
    does that at memory speed where a cryptographic hash cost ~1 s per GiB."""
    return xxhash.xxh3_128()


class _DigestSink(NullSink):
    """Digests each block's pages, which a canonical stream sends once each, in order."""

    def __init__(self) -> None:
        self.digests: dict[str, Any] = {}
        self.next: dict[str, int] = {}
        #: (block name, offset) -> end of a range sent as UNSENT (no records expected)
        self.unsent: dict[tuple[str, int], int] = {}
        self.dev = _digest()
        self.problems: list[str] = []

    def expected(self, block: RamBlock) -> int:
        """The offset of the block's next page (ranges left UNSENT skipped)."""
        at = self.next.get(block.idstr, 0)
        while (end := self.unsent.get((block.idstr, at))) is not None:
            at = end
        return at

    def _in_order(self, block: RamBlock, offset: int) -> None:
        expect = self.expected(block)
        if offset != expect and len(self.problems) < 10:
            self.problems.append(f"block {block.idstr!r}: page {offset:#x} where {expect:#x}")
        self.next[block.idstr] = offset + block.page_size

    def page(self, block: RamBlock, offset: int, data: bytes | memoryview | None) -> None:
        h = self.digests.get(block.idstr)
        if h is None:
            h = self.digests[block.idstr] = _digest()
        self._in_order(block, offset)
        if data is None:
            h.update(b"\x00")  # zero pages: a marker, not 4 KiB of zeros to hash
        else:
            h.update(b"\x01")
            h.update(data)

    def ram_page(self, block: RamBlock, offset: int, data: memoryview | None) -> None:
        self.page(block, offset, data)

    def device_section(self, record: SectionRecord, data: memoryview) -> None:
        self.dev.update(data)


class PageCheck(Protocol):
    """What the round trip checks the parsed-back pages against (see check_round_trip).

    Optional: ``pages(block, offset, data, count)``, as a sink's ``ram_pages``.
    """

    def page(self, block: RamBlock, offset: int, data: bytes | memoryview | None) -> None: ...

    def problems(self) -> list[str]: ...


class _CheckedSink(_DigestSink):
    """Order and completeness as :class:`_DigestSink`; page contents go to a PageCheck."""

    def __init__(self, check: PageCheck) -> None:
        super().__init__()
        self.check = check

    def page(self, block: RamBlock, offset: int, data: bytes | memoryview | None) -> None:
        self._in_order(block, offset)
        self.check.page(block, offset, data)

    def ram_pages(self, block: RamBlock, offset: int, data: bytes | None, count: int) -> None:
        run = getattr(self.check, "pages", None)
        if run is None:
            super().ram_pages(block, offset, data, count)
            return
        self._in_order(block, offset)  # the run's first page; the others follow from it
        self.next[block.idstr] = offset + count * block.page_size
        run(block, offset, data, count)


def _frozen(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as bytes, without a copy when it is (a whole view of) a bytes object: what
    a pipe read or a joined buffer is, and nobody can change it while it waits."""
    if type(data) is bytes:
        return data
    under = _bytes_under(data)
    if under is not None and memoryview(data).nbytes == len(under):
        return under
    return bytes(data)


class BufferPipe:
    """An in-process pipe of whole buffers between a writer thread and a parser thread.

    Each ``write`` (a copy) becomes the parser's reads as it is: no system call and no
    kernel copy per 64 KiB, as an OS pipe would cost.  At most ``depth`` buffers wait.  A
    reader that stops early (``reader_gone``) makes the writer fail with
    ``BrokenPipeError``, like a pipe.  Used by the round trip and the live capture.

    With a ``source`` the buffers are not written: the reading thread takes each from
    ``source()`` (``None`` or empty: the end), one hand-off fewer for a producer that
    queues its buffers anyway.
    """

    def __init__(self, depth: int = 4, source: Callable[[], bytes | None] | None = None) -> None:
        self._q: queue.Queue[bytes] = queue.Queue(depth)
        self._source = source
        self._cur = b""
        self._pos = 0
        self._eof = False
        self.reader_gone = False

    def _put(self, data: bytes) -> None:
        while True:
            if self.reader_gone:
                raise BrokenPipeError("the parser stopped reading")
            try:
                self._q.put(data, timeout=0.1)
                return
            except queue.Full:
                continue

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        n = len(data)
        if n:
            self._put(_frozen(data))
        return n

    def close_write(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self._put(b"")

    def read(self, n: int = -1, /) -> bytes:
        if self._pos >= len(self._cur):
            if self._eof:
                return b""
            self._cur = self._q.get() if self._source is None else self._source() or b""
            self._pos = 0
            if not self._cur:
                self._eof = True
                return b""
        if self._pos == 0 and (n < 0 or n >= len(self._cur)):
            out, self._cur = self._cur, b""
            return out
        end = len(self._cur) if n < 0 else self._pos + n
        out = self._cur[self._pos : end]
        self._pos += len(out)
        return out


def check_round_trip(
    layout: StreamLayout,
    devstate: bytes | bytearray | memoryview | _Readable,
    ram_source: RamSource,
    *,
    read_size: int = DEFAULT_READ_SIZE,
    page_check: PageCheck | None = None,
) -> RoundTripReport:
    """Regenerate a stream from stored parts, parse it back and compare, memory bounded.

    The regenerator runs in a thread writing buffers of ``read_size`` that the parser
    reads (:class:`BufferPipe`); digests of every page written and every page parsed
    (per block, in order), of the device bodies, and the two layouts must agree.  This is
    the capture's proof that what it stored restores.  Pages the source gives as
    :data:`UNSENT` are neither written nor expected back.  Never raises for a mismatch:
    see ``RoundTripReport.problems``.

    With ``page_check`` the pages parsed back go to it instead, and nothing is digested
    per page on the writing side: a check against what the capture recorded (the chunk
    ids of its slots) is stronger than comparing the regenerator with itself, and the
    per-page digest calls were most of the round trip's cost.
    """
    sent = _DigestSink()
    dev_sent = _digest()
    errors: list[BaseException] = []
    pipe = BufferPipe()

    class _Tee:
        def __init__(self, f: _Readable) -> None:
            self._f = f

        def read(self, n: int = -1, /) -> bytes | None:
            d = self._f.read(n)
            if d:
                dev_sent.update(d)
            return d

    if isinstance(devstate, bytes | bytearray | memoryview):
        dev_sent.update(devstate)
        dev_in: bytes | bytearray | memoryview | _Readable = devstate
    else:
        dev_in = _Tee(devstate)

    def noting_unsent(block: RamBlock) -> Iterator[RamExtent]:
        # what the parser must not expect back; noted before any later record is written
        ps = block.page_size
        for ext in ram_source(block):
            off, length, data = ext
            if isinstance(data, _Unsent) and length > 0:
                got.unsent[(block.idstr, off)] = off + length + (-(off + length) % ps)
            yield ext

    def writer() -> None:
        try:
            on_page = sent.page if page_check is None else None
            # Buffers no larger than the parser's reads: it then takes each one whole,
            # without slicing or joining (RAM records stay within flush_at, or overshoot it
            # by one record when written page by page; only a device section larger than
            # _MAX_RECORD is sliced).
            flush_at = max(read_size - _MAX_RECORD, _PAGE_REC)
            regenerate(layout, dev_in, noting_unsent, pipe, on_page=on_page, flush_at=flush_at)
        except BaseException as e:  # reported below; the thread must not die silently
            errors.append(e)
        finally:
            pipe.close_write()

    report = RoundTripReport()
    got = _DigestSink() if page_check is None else _CheckedSink(page_check)
    t = threading.Thread(target=writer, name="migstream-regenerate", daemon=True)
    t.start()
    try:
        back = parse_stream(pipe, got, read_size=read_size)
    except StreamError as e:
        report.problems.append(f"regenerated stream does not parse: {e}")
        back = None
    finally:
        pipe.reader_gone = True
        t.join()
    for err in errors:
        # a parse failure closes the pipe: the writer's broken pipe is a consequence
        if not (isinstance(err, BrokenPipeError) and report.problems):
            report.problems.append(f"regenerating failed: {err!r}")
    if back is None:
        return report
    report.stream_bytes = back.stats.stream_bytes
    report.pages = back.stats.page_records
    report.problems += got.problems
    for what, mine, theirs in (
        ("configuration", layout.configuration, back.configuration),
        ("RAM block list", layout.ram_blocks, back.ram_blocks),
        ("ram section", layout.ram, back.ram),
        ("device records", layout.records, back.records),
        ("vmdesc", layout.vmdesc, back.vmdesc),
    ):
        if mine != theirs:
            report.problems.append(f"{what} differs after the round trip")
    if page_check is not None:
        report.problems += page_check.problems()
    for blk in layout.ram_blocks:
        h1, h2 = sent.digests.get(blk.idstr), got.digests.get(blk.idstr)
        if page_check is None and (h1 is None or h2 is None or h1.digest() != h2.digest()):
            report.problems.append(f"RAM block {blk.idstr!r} differs after the round trip")
        if got.expected(blk) != blk.used_length:
            report.problems.append(f"RAM block {blk.idstr!r} incomplete after the round trip")
    if dev_sent.digest() != got.dev.digest():
        report.problems.append("device state differs after the round trip")
    return report


def _read_exact(f: _Readable, n: int) -> bytes:
    parts = []
    have = 0
    while have < n:
        d = f.read(n - have)
        if d is None:
            continue
        if not d:
            break
        parts.append(d)
        have += len(d)
    return b"".join(parts)


__all__ = [
    "DEFAULT_MAX_TAIL",
    "QEVM_MAGIC",
    "QEVM_VERSION",
    "TARGET_PAGE_SIZE",
    "UNSENT",
    "NullSink",
    "RamBlock",
    "RamExtent",
    "RamSection",
    "RamSource",
    "RoundTripReport",
    "SectionRecord",
    "StreamLayout",
    "StreamSink",
    "StreamStats",
    "check_round_trip",
    "parse_stream",
    "records_digest",
    "regenerate",
    "wire_digest",
]
