"""Unit tests of the migration stream parser/regenerator on synthetic streams.

The streams are built by a small test-only writer below that follows the byte layout
in the module docstring of ``vmarchive.format.migstream`` -- independent of the
regenerator, so the two check each other.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmarchive.errors import StreamError, StreamRefusedError
from vmarchive.format import migstream as ms

PAGE = 4096

# --- test-only stream writer ------------------------------------------------------------------


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def name(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


@dataclass
class Dev:
    idstr: str
    instance: int
    body: bytes
    version: int = 1
    sid: int = 0


@dataclass
class W:
    """Builds a stream: blocks, a list of ram sections (lists of page ops), devices."""

    blocks: list[tuple[str, int]] = field(
        default_factory=lambda: [("pc.ram", 16 * PAGE), ("vga.vram", 4 * PAGE)]
    )
    sections: list[list[tuple[int, int, bytes | None]]] = field(default_factory=list)
    devices: list[Dev] = field(
        default_factory=lambda: [
            Dev("timer", 0, b"\x01" * 24),
            Dev("cpu", 0, bytes(range(200))),
            Dev("cpu", 1, b"\x7e\x00\x00\x00\x09" + bytes(40)),  # a footer look-alike
            Dev("0000:00:03.0/virtio-blk", 0, b"\x00" * 7 + b"\x04"),
        ]
    )
    magic: int = ms.QEVM_MAGIC
    version: int = 3
    config: bytes = be32(12) + b"pc-i440fx-7.2"[:12]
    ram_version: int = 4
    ram_sid: int = 2
    footers: bool = True
    vmdesc_devices: list[tuple[str, int]] | None = None
    extra_flags: int = 0
    zero_fill: int = 0
    with_vmdesc: bool = True

    def build(self) -> bytes:
        out = bytearray(be32(self.magic) + be32(self.version))
        out += b"\x07" + self.config
        sid = self.ram_sid
        total = sum(n for _, n in self.blocks)
        out += b"\x01" + be32(sid) + name("ram") + be32(0) + be32(self.ram_version)
        out += be64(total | 0x04)
        for b, n in self.blocks:
            out += name(b) + be64(n)
        out += be64(0x10)
        if self.footers:
            out += b"\x7e" + be32(sid)
        last = None
        for k, sec in enumerate(self.sections):
            out += bytes([3 if k == len(self.sections) - 1 else 2]) + be32(sid)
            for bi, pi, data in sec:
                bname = self.blocks[bi][0]
                flags = (0x02 if data is None else 0x08) | self.extra_flags
                if bname == last:
                    out += be64(pi * PAGE | flags | 0x20)
                else:
                    out += be64(pi * PAGE | flags) + name(bname)
                last = bname
                out += bytes([self.zero_fill]) if data is None else data
            out += be64(0x10)
            if self.footers:
                out += b"\x7e" + be32(sid)
        for i, d in enumerate(self.devices):
            d.sid = d.sid or 3 + i
            out += b"\x04" + be32(d.sid) + name(d.idstr) + be32(d.instance) + be32(d.version)
            out += d.body + b"\x7e" + be32(d.sid)
        out += b"\x00"
        if self.with_vmdesc:
            listed = self.vmdesc_devices
            if listed is None:
                listed = [(d.idstr, d.instance) for d in self.devices]
            desc = json.dumps(
                {"page_size": PAGE, "devices": [{"name": n, "instance_id": i} for n, i in listed]}
            ).encode()
            out += b"\x06" + be32(len(desc)) + desc
        return bytes(out)

    def final_images(self) -> dict[str, bytearray]:
        img = {b: bytearray(n) for b, n in self.blocks}
        for sec in self.sections:
            for bi, pi, data in sec:
                img[self.blocks[bi][0]][pi * PAGE : (pi + 1) * PAGE] = data or bytes(PAGE)
        return img


def page(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * 8 + bytes(range(256)) * 15 + bytes(PAGE - 8 - 3840)


# --- a sink that keeps everything (tests only: small RAM) --------------------------------------


class Recorder(ms.NullSink):
    def __init__(self) -> None:
        self.img: dict[str, bytearray] = {}
        self.dev = bytearray()
        self.events: list[str] = []

    def header(self, version: int) -> None:
        self.events.append("header")

    def configuration(self, data: bytes) -> None:
        self.events.append("configuration")

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        self.events.append("ram_blocks")
        for b in blocks:
            self.img[b.idstr] = bytearray(b.used_length)

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        assert offset % PAGE == 0
        self.img[block.idstr][offset : offset + PAGE] = bytes(PAGE) if data is None else data

    def device_section(self, record: ms.SectionRecord, data: memoryview) -> None:
        self.events.append("device")
        assert record.offset == len(self.dev)
        self.dev += data

    def vmdesc(self, data: bytes) -> None:
        self.events.append("vmdesc")

    def source(self, block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        yield (0, block.used_length, self.img[block.idstr])


class Dribble(io.RawIOBase):
    """A reader returning random short reads, like a pipe."""

    def __init__(self, data: bytes, seed: int, max_read: int = 7000) -> None:
        self._d = data
        self._p = 0
        self._r = random.Random(seed)
        self._max = max_read

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        k = min(n if n >= 0 else len(self._d), self._r.randint(1, self._max))
        out = self._d[self._p : self._p + k]
        self._p += len(out)
        return out


def parse(data: bytes, **kw: Any) -> tuple[ms.StreamLayout, Recorder]:
    rec = Recorder()
    return ms.parse_stream(io.BytesIO(data), rec, **kw), rec


def regen(layout: ms.StreamLayout, rec: Recorder, **kw: Any) -> bytes:
    out = io.BytesIO()
    n = ms.regenerate(layout, bytes(rec.dev), rec.source, out, **kw)
    assert n == len(out.getvalue())
    return out.getvalue()


def sample() -> W:
    return W(
        sections=[
            [(0, 0, page(1)), (0, 1, None), (0, 5, page(2)), (1, 0, page(3)), (0, 5, page(9))],
            [(0, 1, page(4)), (1, 3, None), (0, 15, page(5))],
            [(0, 0, None), (1, 3, page(6))],
        ]
    )


# --- round trips -----------------------------------------------------------------------------


def test_parse_gives_final_pages_devices_and_layout() -> None:
    w = sample()
    layout, rec = parse(w.build())
    assert rec.img == w.final_images()
    assert rec.dev == b"".join(d.body for d in w.devices)
    assert [(r.idstr, r.instance_id, r.length) for r in layout.records] == [
        (d.idstr, d.instance, len(d.body)) for d in w.devices
    ]
    assert [b.idstr for b in layout.ram_blocks] == ["pc.ram", "vga.vram"]
    assert layout.stats.resent_pages == 4
    assert layout.stats.unsent_pages == 20 - 6
    assert rec.events[:3] == ["header", "configuration", "ram_blocks"]
    assert rec.events[-1] == "vmdesc"


def test_a_sink_that_asks_is_told_the_ram_section_before_the_block_list() -> None:
    class Asks(Recorder):
        def ram_section(self, ram: ms.RamSection) -> None:
            self.events.append("ram_section")
            self.ram = ram

    rec = Asks()
    layout = ms.parse_stream(io.BytesIO(sample().build()), rec)
    assert rec.events[:4] == ["header", "configuration", "ram_section", "ram_blocks"]
    assert rec.ram == layout.ram
    plain = Recorder()  # the control: a sink without it is not asked
    ms.parse_stream(io.BytesIO(sample().build()), plain)
    assert "ram_section" not in plain.events


def test_regenerate_round_trips_and_is_canonical() -> None:
    w = sample()
    layout, rec = parse(w.build())
    out1 = regen(layout, rec)
    layout2, rec2 = parse(out1)
    assert rec2.img == rec.img
    assert rec2.dev == rec.dev
    assert layout2.records == layout.records
    assert layout2.configuration == layout.configuration
    assert layout2.vmdesc == layout.vmdesc
    assert regen(layout2, rec2) == out1  # canonical form is a fixed point
    assert layout2.stats.unsent_pages == 0  # regenerated streams send every page


def test_regenerate_without_zero_pages_still_parses_to_same_image() -> None:
    layout, rec = parse(sample().build())
    out = regen(layout, rec, send_zero_pages=False)
    layout2, rec2 = parse(out)
    assert rec2.img == rec.img
    assert layout2.stats.zero_records == 0


def test_regenerate_reads_devstate_from_a_reader_and_sparse_extents() -> None:
    layout, rec = parse(sample().build())

    def sparse(block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        img = rec.img[block.idstr]
        for off in range(0, block.used_length, 2 * PAGE):
            chunk = bytes(img[off : off + 2 * PAGE])
            yield (off, len(chunk), None if not any(chunk) else memoryview(chunk))

    out = io.BytesIO()
    ms.regenerate(layout, io.BytesIO(bytes(rec.dev)), sparse, out)
    assert out.getvalue() == regen(layout, rec)


class _Chunks:
    """Writes that remember their sizes (how the output was cut into buffers)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, b: bytes | bytearray | memoryview, /) -> int:
        self.parts.append(bytes(b))
        return len(b)


@st.composite
def _ram_extents(draw: st.DrawFn) -> tuple[list[tuple[str, int]], dict[str, list[ms.RamExtent]]]:
    """Blocks and, per block, extents mixing data runs (with zero pages inside), holes,
    gaps, UNSENT runs and a short zero tail; data as bytes or memoryview."""
    blocks = [(f"b{i}", draw(st.integers(1, 70)) * PAGE) for i in range(draw(st.integers(1, 3)))]
    extents: dict[str, list[ms.RamExtent]] = {}
    for bname, size in blocks:
        pages = size // PAGE
        cuts = sorted(set(draw(st.lists(st.integers(0, pages), max_size=8))) | {0, pages})
        ext: list[ms.RamExtent] = []
        for a, b in itertools.pairwise(cuts):
            kind = draw(st.sampled_from(["data", "hole", "gap", "unsent"]))
            if kind == "gap":
                continue
            length = (b - a) * PAGE
            if kind == "unsent":
                ext.append((a * PAGE, length, ms.UNSENT))
                continue
            if kind == "hole":
                if b == pages and draw(st.booleans()):
                    length -= draw(st.integers(0, PAGE - 1))  # a short tail is still a page
                ext.append((a * PAGE, length, None))
                continue
            data = b"".join(
                bytes(PAGE) if draw(st.booleans()) else page(draw(st.integers(1, 250)))
                for _ in range(b - a)
            )
            ext.append((a * PAGE, length, memoryview(data) if draw(st.booleans()) else data))
        extents[bname] = ext
    return blocks, extents


@settings(max_examples=150, deadline=None)
@given(_ram_extents(), st.booleans(), st.sampled_from([1, 5000, 40000, 1 << 20]))
def test_bulk_regenerate_writes_what_the_page_by_page_writer_writes(
    shape: tuple[list[tuple[str, int]], dict[str, list[ms.RamExtent]]],
    send_zero_pages: bool,
    flush_at: int,
) -> None:
    """The regenerator writes RAM records in groups of pages; with ``on_page`` it goes
    page by page (the plain reading of the format).  Same bytes, and no buffer above
    ``flush_at`` unless one record is larger."""
    blocks, extents = shape
    w = W(blocks=blocks, sections=[[(0, 0, page(1))]])
    layout, rec = parse(w.build())
    source = lambda b: iter(extents[b.idstr])  # noqa: E731
    fast, slow = _Chunks(), _Chunks()
    kw = {"send_zero_pages": send_zero_pages, "flush_at": flush_at}
    n_fast = ms.regenerate(layout, bytes(rec.dev), source, fast, **kw)  # type: ignore[arg-type]
    seen: list[int] = []
    n_slow = ms.regenerate(
        layout,
        bytes(rec.dev),
        source,
        slow,
        on_page=lambda b, o, p: seen.append(o),
        **kw,  # type: ignore[arg-type]
    )
    assert b"".join(fast.parts) == b"".join(slow.parts)
    assert n_fast == n_slow == len(b"".join(fast.parts))
    unsent = sum(n // PAGE for ext in extents.values() for _o, n, d in ext if d is ms.UNSENT)
    assert len(seen) == sum(-(-size // PAGE) for _, size in blocks) - unsent
    record = 8 + 1 + 2 + PAGE  # the largest record here: a block's first, named (b0..b2)
    slack = 300  # pieces other than RAM records are added, then flushed: at most a device's
    assert all(len(p) <= max(flush_at, record) + slack for p in fast.parts)
    _, rec2 = parse(b"".join(fast.parts))  # the regenerated image is the extents' image
    for bname, size in blocks:
        want = bytearray(size)
        for off, length, data in extents[bname]:
            if isinstance(data, bytes | bytearray | memoryview):
                want[off : off + length] = data
        assert rec2.img[bname] == want


def test_regenerate_copies_data_its_source_may_change_and_not_immutable_data() -> None:
    """Pages are written as views of the source's data and copied once, when a buffer is
    flushed: a bytearray (which the source may refill for its next extent), or any view of
    one, is copied at once; bytes and views of bytes are taken as they are."""
    layout, rec = parse(sample().build())
    want = regen(layout, rec)
    for kind in ("bytearray", "writable view", "read-only view of a bytearray", "bytes", "view"):

        def source(block: ms.RamBlock, kind: str = kind) -> Iterable[ms.RamExtent]:
            img = rec.img[block.idstr]
            for off in range(0, block.used_length, PAGE):
                chunk = bytes(img[off : off + PAGE])
                data: Any = {
                    "bytearray": bytearray(chunk),
                    "writable view": memoryview(bytearray(chunk)),
                    "read-only view of a bytearray": memoryview(bytearray(chunk)).toreadonly(),
                    "bytes": chunk,
                    "view": memoryview(chunk),
                }[kind]
                yield off, PAGE, data
                owner = data if isinstance(data, bytearray) else getattr(data, "obj", None)
                if isinstance(owner, bytearray):
                    owner[:] = b"\xee" * PAGE  # refilled: must not show in the output

        out = io.BytesIO()
        ms.regenerate(layout, bytes(rec.dev), source, out, flush_at=1 << 20)
        assert out.getvalue() == want, kind


def test_layout_json_round_trip() -> None:
    layout, _ = parse(sample().build())
    obj = json.loads(json.dumps(layout.to_json()))
    back = ms.StreamLayout.from_json(obj)
    assert back == layout
    with pytest.raises(StreamError):
        ms.StreamLayout.from_json({"layout_version": 1})
    with pytest.raises(StreamError):
        ms.StreamLayout.from_json({**obj, "layout_version": 99})


def test_short_reads_give_the_same_result() -> None:
    data = sample().build()
    layout, rec = parse(data)
    for seed in range(5):
        rec2 = Recorder()
        layout2 = ms.parse_stream(Dribble(data, seed), rec2, read_size=1000)
        assert rec2.img == rec.img and rec2.dev == rec.dev and layout2 == layout


# --- property: any page sequence, with re-sends, gives the final contents ------------------------

ops = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.integers(0, 3),
        st.one_of(st.none(), st.integers(1, 255)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(ops, min_size=1, max_size=4), st.integers(0, 2**16), st.integers(1, 9000))
def test_property_final_pages(
    sections: list[list[tuple[int, int, int | None]]], seed: int, max_read: int
) -> None:
    w = W(
        blocks=[("pc.ram", 4 * PAGE), ("b", 4 * PAGE)],
        sections=[[(b, p, None if t is None else page(t)) for b, p, t in s] for s in sections],
    )
    rec = Recorder()
    layout = ms.parse_stream(Dribble(w.build(), seed, max_read), rec, read_size=max_read)
    assert rec.img == w.final_images()
    assert layout.stats.page_records == sum(len(s) for s in sections)
    _, rec2 = parse(regen(layout, rec))
    assert rec2.img == rec.img and rec2.dev == rec.dev


# --- negative controls: truncation and missing/misplaced device sections -----------------------


def test_every_truncation_raises_stream_error() -> None:
    data = sample().build()
    cuts = sorted({*range(0, 64), *range(0, len(data), 97), len(data) - 1, len(data) - 30})
    for cut in cuts:
        with pytest.raises(StreamError):
            parse(data[:cut])
    parse(data)  # the control: the whole stream parses


def test_trailing_garbage_is_an_error() -> None:
    with pytest.raises(StreamError):
        parse(sample().build() + b"x")


def test_missing_device_section_is_detected() -> None:
    w = sample()
    listed = [(d.idstr, d.instance) for d in w.devices]
    del w.devices[1]
    w.vmdesc_devices = listed
    with pytest.raises(StreamError, match="cpu"):
        parse(w.build())


def test_extra_device_section_is_detected() -> None:
    w = sample()
    w.vmdesc_devices = [(d.idstr, d.instance) for d in w.devices[:-1]]
    with pytest.raises(StreamError):
        parse(w.build())


def _contiguous(records: list[ms.SectionRecord]) -> list[ms.SectionRecord]:
    out, off = [], 0
    for r in records:
        out.append(
            ms.SectionRecord(
                r.section_type, r.section_id, r.idstr, r.instance_id, r.version_id, off, r.length
            )
        )
        off += r.length
    return out


def test_layout_validation_catches_a_dropped_record() -> None:
    layout, rec = parse(sample().build())
    layout.validate()  # control
    dropped = ms.StreamLayout(
        version=layout.version,
        configuration=layout.configuration,
        ram=layout.ram,
        ram_blocks=layout.ram_blocks,
        records=_contiguous([layout.records[0], *layout.records[2:]]),
        vmdesc=layout.vmdesc,
    )
    with pytest.raises(StreamError, match="do not match vmdesc"):
        dropped.validate()
    with pytest.raises(StreamError):
        ms.regenerate(dropped, bytes(rec.dev), rec.source, io.BytesIO())
    no_mem = ms.StreamLayout(
        layout.version, layout.configuration, layout.ram, [], layout.records, layout.vmdesc
    )
    with pytest.raises(StreamError, match="MEM_SIZE"):
        no_mem.validate()
    gap = ms.StreamLayout(
        layout.version,
        layout.configuration,
        layout.ram,
        layout.ram_blocks,
        [layout.records[0], *layout.records[2:]],
        layout.vmdesc,
    )
    with pytest.raises(StreamError, match="contiguous"):
        gap.validate()


def test_ambiguous_device_boundary_is_refused_not_guessed() -> None:
    w = sample()
    # cpu 0's body contains its own footer followed by a perfect copy of cpu 1's header
    sid0 = 3 + 1
    sid1 = 3 + 2
    fake = b"\x7e" + be32(sid0) + b"\x04" + be32(sid1) + name("cpu") + be32(1) + be32(1)
    w.devices[1].body = b"abc" + fake + b"def"
    with pytest.raises(StreamRefusedError, match="ambiguous"):
        parse(w.build())
    w.devices[1].body = b"abc" + fake[:-5] + b"def"  # control: one byte short of ambiguous
    parse(w.build())


def test_a_later_boundary_look_alike_in_an_earlier_body_is_not_a_candidate() -> None:
    # The timer's body holds cpu 0's footer followed by a perfect copy of cpu 1's header:
    # before cpu 0's body begins, so never where cpu 0 ends (each section's end is looked
    # for from its own body on).  The stream splits exactly, as without the look-alike.
    w = sample()
    sid1, sid2 = 3 + 1, 3 + 2
    fake = b"\x7e" + be32(sid1) + b"\x04" + be32(sid2) + name("cpu") + be32(1) + be32(1)
    w.devices[0].body = b"abc" + fake + b"def"
    _, rec = parse(w.build())
    assert rec.dev == b"".join(d.body for d in w.devices)
    # control: the same bytes inside cpu 0's own body are a second candidate
    w.devices[0].body = b"\x01" * 24
    w.devices[1].body = b"abc" + fake + b"def"
    with pytest.raises(StreamRefusedError, match="ambiguous"):
        parse(w.build())


# --- negative controls: the allow-list ----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda w: setattr(w, "magic", 0x12345678), "magic"),
        (lambda w: setattr(w, "version", 2), "version 2"),
        (lambda w: setattr(w, "ram_version", 3), "ram section version 3"),
        (lambda w: setattr(w, "extra_flags", 0x40), "XBZRLE"),
        (lambda w: setattr(w, "extra_flags", 0x100), "COMPRESS_PAGE"),
        (lambda w: setattr(w, "extra_flags", 0x200), "MULTIFD_FLUSH"),
        (lambda w: setattr(w, "extra_flags", 0x80), "HOOK"),
        (lambda w: setattr(w, "extra_flags", 0x01), "FULL"),
        (lambda w: setattr(w, "extra_flags", 0x800), "unknown"),
        (lambda w: setattr(w, "zero_fill", 0xAA), "fill byte"),
        (lambda w: setattr(w, "footers", False), "footer"),
        (lambda w: setattr(w, "with_vmdesc", False), "vmdesc"),
        (
            lambda w: setattr(
                w,
                "config",
                w.config + b"\x05" + name("configuration/target-page-bits") + be32(1) + be32(16),
            ),
            "target-page-bits",
        ),
        (
            lambda w: setattr(
                w,
                "config",
                w.config + b"\x05" + name("configuration/capabilities") + be32(1) + be32(0),
            ),
            "capabilities",
        ),
    ],
)
def test_allow_list_refusals(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    w = sample()
    change(w)
    with pytest.raises(StreamRefusedError, match=reason):
        parse(w.build())


def test_allow_list_control_uuid_subsection_is_accepted() -> None:
    w = sample()
    w.config += b"\x05" + name("configuration/uuid") + be32(1) + bytes(range(16))
    layout, rec = parse(w.build())
    assert layout.configuration == w.config
    _, rec2 = parse(regen(layout, rec))
    assert rec2.img == rec.img


def _splice_after_config(w: W, blob: bytes) -> bytes:
    data = w.build()
    at = 8 + 1 + len(w.config)
    return data[:at] + blob + data[at:]


def test_refuses_command_section() -> None:
    # QEMU_VM_COMMAND, be16 cmd 2 (POSTCOPY_ADVISE), be16 len 16
    with pytest.raises(StreamRefusedError, match="COMMAND 2"):
        parse(_splice_after_config(sample(), b"\x08\x00\x02\x00\x10" + bytes(16)))


def test_refuses_unknown_section_type() -> None:
    with pytest.raises(StreamRefusedError, match="0x09"):
        parse(_splice_after_config(sample(), b"\x09"))


def test_refuses_other_iterable_sections() -> None:
    blob = b"\x01" + be32(9) + name("block") + be32(0) + be32(1)
    with pytest.raises(StreamRefusedError, match="'block'"):
        parse(_splice_after_config(sample(), blob))


def test_refuses_missing_configuration() -> None:
    data = sample().build()
    with pytest.raises(StreamRefusedError, match="configuration"):
        parse(data[:8] + data[8 + 1 + 16 :])


def test_page_for_unknown_block_and_offset_out_of_range_are_errors() -> None:
    w = sample()
    w.sections = [[(0, 16, page(1))]]  # pc.ram has 16 pages: index 16 is outside
    with pytest.raises(StreamError, match="beyond"):
        parse(w.build())


# --- the capture's round-trip check -------------------------------------------------------------


def test_check_round_trip_ok_with_bytes_and_reader_devstate() -> None:
    layout, rec = parse(sample().build())
    report = ms.check_round_trip(layout, bytes(rec.dev), rec.source)
    assert report.ok, report.problems
    assert report.pages == 20
    report = ms.check_round_trip(layout, io.BytesIO(bytes(rec.dev)), rec.source, read_size=999)
    assert report.ok, report.problems


def test_check_round_trip_reports_a_lying_regenerator(monkeypatch: pytest.MonkeyPatch) -> None:
    layout, rec = parse(sample().build())
    real = ms.regenerate

    def lying(*args, on_page, **kw):  # type: ignore[no-untyped-def]
        # claims every page it writes is zero: the digests must then disagree
        return real(*args, on_page=lambda b, o, p: on_page(b, o, None), **kw)

    monkeypatch.setattr(ms, "regenerate", lying)
    report = ms.check_round_trip(layout, bytes(rec.dev), rec.source)
    assert not report.ok
    assert any("'pc.ram' differs" in p for p in report.problems)


def test_check_round_trip_reports_bad_parts() -> None:
    layout, rec = parse(sample().build())
    short = ms.check_round_trip(layout, io.BytesIO(bytes(rec.dev)[:-3]), rec.source)
    assert not short.ok and any("devstate too short" in p for p in short.problems)

    def bad_source(block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        yield (0, block.used_length + PAGE, bytes(block.used_length + PAGE))

    bad = ms.check_round_trip(layout, bytes(rec.dev), bad_source)
    assert not bad.ok and any("out of range" in p for p in bad.problems)


def _leaving_out(rec: Recorder, first: int, count: int) -> Any:
    """rec.source with pc.ram's pages first..first+count-1 given as UNSENT."""

    def source(block: ms.RamBlock) -> Iterable[ms.RamExtent]:
        if block.idstr != "pc.ram":
            yield from rec.source(block)
            return
        img = rec.img[block.idstr]
        a, b = first * PAGE, (first + count) * PAGE
        yield (0, a, bytes(img[:a]))
        yield (a, b - a, ms.UNSENT)
        yield (b, block.used_length - b, bytes(img[b : block.used_length]))

    return source


def test_unsent_pages_get_no_records_and_the_check_expects_none() -> None:
    layout, rec = parse(sample().build())
    out = io.BytesIO()
    ms.regenerate(layout, bytes(rec.dev), _leaving_out(rec, 4, 8), out)
    layout2, rec2 = parse(out.getvalue())
    assert layout2.stats.unsent_pages == 8  # the parser saw no record of them
    img = rec.img["pc.ram"]
    assert rec2.img["pc.ram"] == img[: 4 * PAGE] + bytes(8 * PAGE) + img[12 * PAGE :]
    assert rec2.img["vga.vram"] == rec.img["vga.vram"]
    report = ms.check_round_trip(layout, bytes(rec.dev), _leaving_out(rec, 4, 8))
    assert report.ok, report.problems
    assert report.pages == 20 - 8
    # the page at 0 names the block: leaving it out moves the name to the next record
    report = ms.check_round_trip(layout, bytes(rec.dev), _leaving_out(rec, 0, 3))
    assert report.ok and report.pages == 20 - 3, report.problems


def test_check_round_trip_sees_records_missing_without_unsent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pages the source gave but the regenerator left out are missing, not excused."""
    layout, rec = parse(sample().build())
    real = ms.regenerate

    def dropping(layout_: Any, dev: Any, source: Any, out: Any, **kw: Any) -> int:
        def src(block: ms.RamBlock) -> Iterable[ms.RamExtent]:
            for off, n, data in source(block):  # the check has seen these as data
                yield (off, n, ms.UNSENT if block.idstr == "pc.ram" and off == 0 else data)

        return real(layout_, dev, src, out, **kw)

    monkeypatch.setattr(ms, "regenerate", dropping)
    report = ms.check_round_trip(layout, bytes(rec.dev), _leaving_out(rec, 4, 8))
    assert not report.ok
    assert any("'pc.ram'" in p and "where 0x0" in p for p in report.problems), report.problems


def test_round_trip_pipe_passes_buffers_and_frees_a_writer_when_the_reader_stops() -> None:
    pipe = ms.BufferPipe(depth=2)
    pipe.write(b"abc")
    pipe.write(memoryview(b"defgh"))
    assert pipe.read(2) == b"ab"
    assert pipe.read(-1) == b"c"
    assert pipe.read(100) == b"defgh"

    outcome: list[BaseException | None] = []

    def writer() -> None:
        try:
            for _ in range(10):
                pipe.write(b"x" * 10)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # negative control: a full pipe blocks while its reader lives
    pipe.reader_gone = True
    t.join(30)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BrokenPipeError)
    pipe.close_write()  # never raises, even with the reader gone


def test_buffer_pipe_reads_what_its_source_gives_until_it_ends() -> None:
    """With a source the reading thread takes the buffers itself: as they are when read
    whole, in pieces otherwise; None ends the stream and nothing is asked after it."""
    whole = b"q" * 1000
    given: list[bytes | None] = [whole, b"abcdef", None, b"never"]
    pipe = ms.BufferPipe(source=lambda: given.pop(0))
    assert pipe.read() is whole
    assert pipe.read(4) == b"abcd" and pipe.read(100) == b"ef"
    assert pipe.read() == b"" and pipe.read(5) == b""
    assert given == [b"never"]


def test_buffer_pipe_hands_on_bytes_without_copying_and_copies_what_can_change() -> None:
    pipe = ms.BufferPipe(depth=8)
    whole = b"a" * 1000
    pipe.write(whole)
    pipe.write(memoryview(whole))  # a pipe read as the capture's feeder passes it
    part = memoryview(whole)[10:20]
    pipe.write(part)
    buf = bytearray(b"mutable")
    pipe.write(buf)
    buf[0:1] = b"M"  # the writer reuses its buffer: the pipe must hold a copy
    assert pipe.read() is whole and pipe.read() is whole
    got = pipe.read()
    assert got == whole[10:20] and got is not whole
    assert pipe.read() == b"mutable"


def test_progress_counts_every_byte_read() -> None:
    data = sample().build()

    class Task:
        n = 0

        def advance(self, n: int) -> None:
            self.n += n

        def set_total(self, total: int | None) -> None:
            pass

        def close(self) -> None:
            pass

    task = Task()
    ms.parse_stream(Dribble(data, 3), Recorder(), read_size=4000, progress=task)
    assert task.n == len(data)


def test_non_ascii_block_name_is_refused() -> None:
    w = sample()
    w.blocks[1] = ("vga.vr\xe4m", 4 * PAGE)
    data = w.build().replace("vga.vr\xe4m".encode(), b"vga.vr\xe4m")  # latin-1 byte
    with pytest.raises(StreamRefusedError, match="non-ASCII"):
        parse(data)


# --- property: device bodies full of footer look-alikes are split exactly or refused -----------

look_alikes = st.sampled_from(
    [
        b"\x7e\x00\x00\x00\x03",
        b"\x7e\x00\x00\x00\x04",
        b"\x7e\x00\x00\x00\x05",
        b"\x04\x00\x00\x00\x04\x03cpu\x00\x00\x00\x01\x00\x00\x00\x01",
        b"\x04\x00\x00\x00\x05\x03cpu",
        b"\x00\x06\x00\x00\x00\x10",
        b"\x00",
    ]
)
bodies = st.lists(st.one_of(st.binary(max_size=12), look_alikes), max_size=8).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(bodies, min_size=3, max_size=3))
def test_property_device_bodies_split_exactly_or_refused(parts: list[bytes]) -> None:
    w = W(
        sections=[[(0, 0, page(1))]],
        devices=[Dev("timer", 0, parts[0]), Dev("cpu", 0, parts[1]), Dev("cpu", 1, parts[2])],
    )
    try:
        _, rec = parse(w.build())
    except StreamRefusedError as e:
        assert "ambiguous" in str(e)
        return
    assert rec.dev == b"".join(parts)


def _ends_by_search(
    tail: bytes, body: int, sid: int, nxt: tuple[str, int] | None, vm_at: int
) -> list[int]:
    """Where section ``sid`` (body at ``body``) may end, found the plain way: every place
    of its 5-byte footer from the body on, followed by the next expected thing."""
    footer = b"\x7e" + be32(sid)
    out = []
    for i in range(body, vm_at - 4):
        if tail[i : i + 5] != footer:
            continue
        if nxt is None:
            if i + 5 == vm_at:
                out.append(i)
            continue
        n = len(nxt[0])
        header = tail[i + 5 : i + 19 + n]  # FULL, id, name length, name, instance, version
        if (
            len(header) == 14 + n
            and header[0] == 0x04
            and header[5] == n
            and header[6 : 6 + n] == nxt[0].encode()
            and header[6 + n : 10 + n] == be32(nxt[1])
        ):
            out.append(i)
    return out


end_pieces = st.sampled_from(
    [
        b"\x7e" + be32(4),
        b"\x7e" + be32(5),
        b"\x04" + be32(5) + name("cpu") + be32(1) + be32(1),
        b"\x04" + be32(5) + name("cpu") + be32(0) + be32(1),
        b"\x04",
        b"\x7e",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=3), end_pieces), max_size=12).map(b"".join),
    st.integers(min_value=0, max_value=40),
    st.sampled_from([None, ("cpu", 1)]),
)
def test_property_section_end_is_the_one_place_a_plain_search_finds(
    device_area: bytes, body: int, nxt: tuple[str, int] | None
) -> None:
    # The footers are indexed in one pass (_footers); the answer is the one a search
    # for section 4's footer from its body on gives: that place, none, or refused.
    vm_at = len(device_area)
    tail = device_area + b"\x00\x06" + be32(2) + b"{}"
    body = min(body, vm_at)
    want = _ends_by_search(tail, body, 4, nxt, vm_at)
    footers = ms._footers(tail, vm_at).get(4, ())
    if len(want) == 1:
        assert ms._find_section_end(tail, body, 4, nxt, vm_at, "cpu", footers) == want[0]
    else:
        with pytest.raises(StreamError) as e:
            ms._find_section_end(tail, body, 4, nxt, vm_at, "cpu", footers)
        assert isinstance(e.value, StreamRefusedError) == bool(want), e.value


# --- runs: the parser takes 16 CONTINUE records of one kind at once -------------------------


class RunRecorder(Recorder):
    """A Recorder that also takes whole runs (``ram_pages``), and counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.offsets: list[int] = []

    def ram_pages(self, block: ms.RamBlock, offset: int, data: bytes | None, count: int) -> None:
        self.runs += 1
        self.offsets.append(offset)
        n = count * PAGE
        assert data is None or len(data) == n
        self.img[block.idstr][offset : offset + n] = bytes(n) if data is None else data


class WiredRecorder(RunRecorder):
    """A RunRecorder that also takes data runs with their records (``ram_pages_wired``),
    and checks each against the regenerator: the records it writes for the run's pages
    where the block continues must be the very bytes read."""

    def __init__(self) -> None:
        super().__init__()
        self.wired = 0

    def ram_pages_wired(
        self, block: ms.RamBlock, offset: int, data: bytes, count: int, wire: memoryview
    ) -> None:
        self.wired += 1
        assert bytes(wire) == b"".join(
            be64((offset + i * PAGE) | 0x08 | 0x20) + data[i * PAGE : (i + 1) * PAGE]
            for i in range(count)
        )
        assert ms.records_digest(block, offset, data) == ms.wire_digest(wire)
        self.ram_pages(block, offset, data, count)


segments = st.lists(
    st.tuples(
        st.integers(0, 1),  # block
        st.integers(0, 63),  # first page
        st.integers(1, 40),  # pages, in order
        st.one_of(st.none(), st.integers(1, 255)),  # zero pages, or data pages of this tag
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(segments, st.integers(0, 2**16), st.integers(1, 70000))
def test_property_runs_parse_as_single_records(
    segs: list[tuple[int, int, int, int | None]], seed: int, max_read: int
) -> None:
    ops: list[tuple[int, int, bytes | None]] = []
    for b, first, n, tag in segs:
        ops += [
            (b, p, None if tag is None else page(tag + p)) for p in range(first, min(first + n, 64))
        ]
    w = W(blocks=[("pc.ram", 64 * PAGE), ("b", 64 * PAGE)], sections=[ops])
    seen: set[tuple[int, int]] = set()
    resent = 0
    for b, p, _d in ops:
        resent += (b, p) in seen
        seen.add((b, p))
    data = w.build()
    for rec in (Recorder(), RunRecorder(), WiredRecorder()):
        layout = ms.parse_stream(Dribble(data, seed, max_read), rec, read_size=max_read)
        assert rec.img == w.final_images()
        if isinstance(rec, RunRecorder):  # runs start at whole chunks of the image only
            assert all(off % (16 * PAGE) == 0 for off in rec.offsets), rec.offsets
        st_ = layout.stats
        assert st_.page_records == len(ops)
        assert st_.zero_records == sum(d is None for _b, _p, d in ops)
        assert st_.resent_pages == resent
        _, rec2 = parse(regen(layout, rec))
        assert rec2.img == rec.img


def test_runs_are_taken_and_a_broken_run_is_not() -> None:
    """The run path is used for long in-order runs (else the property above proves
    nothing about it), and not where one header in the run breaks the sequence."""
    seq: list[tuple[int, int, bytes | None]] = [(0, p, page(p + 1)) for p in range(48)]
    seq += [(0, p, None) for p in range(48, 128)]
    w = W(blocks=[("pc.ram", 128 * PAGE)], sections=[seq])
    rec = RunRecorder()
    ms.parse_stream(io.BytesIO(w.build()), rec)
    # page 0 names the block, 1-15 go one by one up to the first multiple of 16; then
    # data runs 16-31, 32-47 and zero runs from 48
    assert rec.runs >= 4 and rec.offsets[:2] == [16 * PAGE, 32 * PAGE], rec.offsets
    assert rec.img == w.final_images()
    # Negative control: page 20 swapped with page 21 -- no run may cover pages 16..31
    # (and 32 is the last page: too few for another).
    broken = list(seq[:33])
    broken[20], broken[21] = broken[21], broken[20]
    w = W(blocks=[("pc.ram", 64 * PAGE)], sections=[broken])
    rec = RunRecorder()
    ms.parse_stream(io.BytesIO(w.build()), rec)
    assert rec.runs == 0
    assert rec.img == w.final_images()


def test_data_runs_come_with_their_records_and_the_regenerator_writes_them_again() -> None:
    """Data runs reach ``ram_pages_wired`` with the records they were read from, which the
    regenerator writes again byte for byte (WiredRecorder checks both); zero runs keep
    ``ram_pages``.  Negative controls: the digest of the same pages elsewhere, of other
    content, or of a zero page the stream sent as data (written as a ZERO record)
    differs."""
    seq: list[tuple[int, int, bytes | None]] = [(0, p, page(p + 1)) for p in range(48)]
    seq += [(0, p, None) for p in range(48, 64)]
    w = W(blocks=[("pc.ram", 64 * PAGE)], sections=[seq])
    rec = WiredRecorder()
    ms.parse_stream(io.BytesIO(w.build()), rec)
    assert rec.wired == 2 and rec.runs == 3, (rec.wired, rec.runs)  # 16-31, 32-47; zeros
    assert rec.img == w.final_images()
    block = ms.RamBlock(0, "pc.ram", 64 * PAGE)
    run = b"".join(page(p + 1) for p in range(16, 32))
    wire = b"".join(be64(p * PAGE | 0x28) + page(p + 1) for p in range(16, 32))
    assert ms.records_digest(block, 16 * PAGE, run) == ms.wire_digest(wire)
    assert ms.records_digest(block, 32 * PAGE, run) != ms.wire_digest(wire)
    assert ms.records_digest(block, 16 * PAGE, run[:-1] + b"?") != ms.wire_digest(wire)
    with_zero = run[: 3 * PAGE] + bytes(PAGE) + run[4 * PAGE :]  # a ZERO record there
    wire_zero = wire[: 3 * (PAGE + 8)] + be64(19 * PAGE | 0x28) + bytes(PAGE)
    wire_zero += wire[4 * (PAGE + 8) :]
    assert ms.records_digest(block, 16 * PAGE, with_zero) != ms.wire_digest(wire_zero)


def test_run_of_zero_records_with_a_fill_byte_is_refused() -> None:
    w = W(blocks=[("pc.ram", 64 * PAGE)], sections=[[(0, p, None) for p in range(40)]], zero_fill=1)
    with pytest.raises(StreamRefusedError, match="fill byte"):
        ms.parse_stream(io.BytesIO(w.build()), RunRecorder())


# --- zero runs of 2 MiB: untouched RAM taken 512 records at a time -------------------------


class CallRecorder(RunRecorder):
    """A RunRecorder that keeps each run's (offset, pages)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def ram_pages(self, block: ms.RamBlock, offset: int, data: bytes | None, count: int) -> None:
        self.calls.append((offset, count))
        super().ram_pages(block, offset, data, count)


_BIG = 512  # records in a 2 MiB zero run


def _zero_tail_stream(
    change: Callable[[list[tuple[int, int, bytes | None]]], None] | None = None, **kw: Any
) -> W:
    """4 MiB of RAM: data pages 0-99, then zero records up to the end (from page 100:
    16-page runs up to page 512, then the 2 MiB run 512-1023)."""
    seq: list[tuple[int, int, bytes | None]] = [(0, p, page(p + 1)) for p in range(100)]
    seq += [(0, p, None) for p in range(100, 2 * _BIG)]
    if change is not None:
        change(seq)
    return W(blocks=[("pc.ram", 2 * _BIG * PAGE)], sections=[seq], **kw)


def test_a_2_mib_zero_run_is_taken_at_once() -> None:
    w = _zero_tail_stream()
    rec = CallRecorder()
    layout = ms.parse_stream(io.BytesIO(w.build()), rec)
    assert (_BIG * PAGE, _BIG) in rec.calls, rec.calls
    assert rec.img == w.final_images()
    assert layout.stats.zero_records == 2 * _BIG - 100 and layout.stats.resent_pages == 0
    # read in small random pieces, the run is taken where the buffer holds it, or not
    for seed in range(5):
        rec = CallRecorder()
        ms.parse_stream(Dribble(w.build(), seed, 6000), rec, read_size=6000)
        assert rec.img == w.final_images()
    # a sink without ram_pages gets the run page by page
    plain = Recorder()
    ms.parse_stream(io.BytesIO(w.build()), plain)
    assert plain.img == w.final_images()


def _data_inside(seq: list[tuple[int, int, bytes | None]]) -> None:
    seq[700] = (0, 700, page(7))


def _swapped(seq: list[tuple[int, int, bytes | None]]) -> None:
    seq[700], seq[701] = seq[701], seq[700]


@pytest.mark.parametrize("change", [_data_inside, _swapped], ids=["data-page", "out-of-order"])
def test_a_2_mib_run_with_one_record_different_is_not_taken(
    change: Callable[[list[tuple[int, int, bytes | None]]], None],
) -> None:
    """Negative controls: one record inside the run differs, so no 2 MiB run may cover
    it; the pages still come out right."""
    w = _zero_tail_stream(change)
    rec = CallRecorder()
    layout = ms.parse_stream(io.BytesIO(w.build()), rec)
    assert (_BIG * PAGE, _BIG) not in rec.calls
    assert rec.img == w.final_images()
    assert layout.stats.resent_pages == 0


def test_a_2_mib_zero_run_with_a_fill_byte_is_refused() -> None:
    """Only page 700's fill byte is not 0: the run is not taken, the record is refused."""
    data = bytearray(_zero_tail_stream().build())
    head = struct.pack(">Q", 700 * PAGE | 0x02 | 0x20)
    at = data.index(head) + len(head)
    assert data[at] == 0 and data.count(head) == 1
    data[at] = 1
    with pytest.raises(StreamRefusedError, match="fill byte 0x01"):
        ms.parse_stream(io.BytesIO(bytes(data)), CallRecorder())


def test_a_zero_run_past_the_block_end_is_not_taken_as_one() -> None:
    """A block ending 1 MiB into a 2 MiB span: the records up to its end are parsed in
    16-page runs, the page beyond its end is refused."""
    seq: list[tuple[int, int, bytes | None]] = [(0, p, None) for p in range(_BIG + 257)]
    w = W(blocks=[("pc.ram", (_BIG + 256) * PAGE)], sections=[seq])
    rec = CallRecorder()
    with pytest.raises(StreamError, match="beyond RAM block"):
        ms.parse_stream(io.BytesIO(w.build()), rec)
    assert all(count < _BIG for off, count in rec.calls if off >= _BIG * PAGE), rec.calls


class _Reads(io.RawIOBase):
    """A reader returning exactly ``size`` bytes per read (the last one shorter), and
    remembering the ids of the objects it returned."""

    def __init__(self, data: bytes, size: int) -> None:
        self._d, self._p, self._size = data, 0, size
        self.returned: set[int] = set()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        out = self._d[self._p : self._p + min(n, self._size)]
        self._p += len(out)
        self.returned.add(id(out))
        return out


def test_records_across_reads_are_bridged_not_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 MiB of RAM (mostly distinct data pages, some zero) read 256 KiB at a time: nearly
    # every read ends inside a record.  The parser may copy the straddling records, not
    # whole reads: the buffers it builds itself hold a small share of the stream.
    n = 1024
    w = W(
        blocks=[("pc.ram", n * PAGE)],
        sections=[[(0, i, None if i % 7 == 0 else page(i)) for i in range(n)]],
    )
    data = w.build()
    src = _Reads(data, 256 << 10)
    built = 0
    real_set = ms._Input._set

    def spy(self: ms._Input, buf: bytes, pos: int) -> None:
        nonlocal built
        if id(buf) not in src.returned:
            built += len(buf)
        real_set(self, buf, pos)

    monkeypatch.setattr(ms._Input, "_set", spy)
    rec = Recorder()
    ms.parse_stream(src, rec, read_size=256 << 10)
    assert rec.img == w.final_images()  # same pages as ever
    assert len(data) > (n * 6 // 7) * PAGE
    # ~16 straddles, each bridging at most two runs' worth (2 x 65 KiB): well under 2 MiB;
    # joining each remainder to the whole next read would build ~the whole 4 MiB again
    assert built < len(data) // 2, (built, len(data))


def test_a_run_that_starts_in_a_bridge_extends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the read sizes, no buffer the parser builds itself is longer than two runs
    # and two records: a run starting in a bridge's old bytes gets a longer bridge, not
    # the old bytes joined to the whole next read.
    n = 512
    w = W(blocks=[("pc.ram", n * PAGE)], sections=[[(0, i, page(i)) for i in range(n)]])
    data = w.build()
    biggest = 0
    real_set = ms._Input._set
    for size in range(200_000, 300_000, 3_331):
        src = _Reads(data, size)

        def spy(self: ms._Input, buf: bytes, pos: int, src: _Reads = src) -> None:
            nonlocal biggest
            if id(buf) not in src.returned:
                biggest = max(biggest, len(buf))
            real_set(self, buf, pos)

        monkeypatch.setattr(ms._Input, "_set", spy)
        rec = Recorder()
        ms.parse_stream(src, rec, read_size=size)
        assert rec.img == w.final_images(), size
    limit = 2 * 16 * (8 + PAGE) + 2 * ms._MAX_RECORD
    assert biggest <= limit, (biggest, limit)
