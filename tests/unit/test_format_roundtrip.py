"""Property tests of the format codecs: every structure round-trips; damage is detected.

Encrypted objects must reject any single flipped byte and any truncation; plaintext
structures reject truncation (their contents are checked by the object id and, for bodies,
the zstd frame checksum).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import string
import struct
from collections.abc import Callable
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmarchive import errors
from vmarchive.format import constants as C
from vmarchive.format.blob import (
    INCOMPRESSIBLE_SAMPLE,
    BlobCodec,
    blob_aad,
    decode_blob,
    decode_blob_view,
    decompress_view,
    encode_blob,
    raw_frame,
    raw_frame_parts,
)
from vmarchive.format.chunkid import ALGORITHMS, ZERO_ID, is_zero, make_id_function, verify_chunk
from vmarchive.format.config import RepoConfig, decode_config, encode_config, new_config
from vmarchive.format.crypto import TEST_SCRYPT, KeyMaterial, make_keyfile, open_keyfile, seal
from vmarchive.format.header import make_header
from vmarchive.format.index import IndexEntry, decode_index, decode_index_packed, encode_index
from vmarchive.format.lock import LockInfo, decode_lock, encode_lock, is_stale
from vmarchive.format.manifest import (
    Manifest,
    StreamEntry,
    archive_id,
    decode_manifest,
    encode_manifest,
    is_safe_stream_name,
)
from vmarchive.format.pack import (
    PackBuilder,
    decode_pack_trailer,
    pack_id,
    pack_tail_size,
    read_blob,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = KeyMaterial(bytes(range(32)), bytes(range(32, 64)))
IDFN = make_id_function(C.ID_XXH3_128_KEYED, KEY.id_secret)
DETECTED = (errors.DamageError, errors.UnsupportedVersionError, errors.WrongKeyError)


def counter_rng(seed: int) -> Callable[[int], bytes]:
    state = [seed]

    def rng(n: int) -> bytes:
        state[0] += 1
        return hashlib.shake_256(state[0].to_bytes(8, "little")).digest(n)

    return rng


def codec(encrypted: bool, level: int = 3) -> BlobCodec:
    return BlobCodec(level, KEY if encrypted else None, rng=counter_rng(level))


chunk_data = st.binary(min_size=1, max_size=5000).filter(lambda b: not is_zero(b))
json_scalar = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
name_component = st.text(string.ascii_letters + string.digits + "_-:@", min_size=1, max_size=12)
stream_name = st.lists(name_component, min_size=1, max_size=3).map("/".join)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names = draw(st.lists(stream_name, min_size=0, max_size=5, unique=True))
    streams = []
    for name in names:
        chunk_size = draw(st.sampled_from([1, 7, 4096, 65536]))
        size = draw(st.integers(0, 20 * chunk_size))
        slots = -(-size // chunk_size)
        table = b"".join(
            draw(st.sampled_from([ZERO_ID, IDFN(b"a"), IDFN(b"b")])) for _ in range(slots)
        )
        attrs = draw(st.dictionaries(st.text(max_size=8), json_value, max_size=3))
        streams.append(
            StreamEntry(name, draw(st.sampled_from(C.STREAM_KINDS)), size, chunk_size, attrs, table)
        )
    metadata: dict[str, Any] = {
        "time": "2026-11-25T21:00:00Z",
        "domain": draw(st.text(max_size=10)),
        "kind": "full",
    }
    metadata.update(
        draw(
            st.dictionaries(
                st.text(max_size=8).filter(lambda k: k not in metadata), json_value, max_size=4
            )
        )
    )
    return Manifest(metadata, streams)


def assert_detected(decode: Callable[[bytes], object], data: bytes, at: int) -> None:
    damaged = bytearray(data)
    damaged[at % len(data)] ^= 0xFF
    with pytest.raises(DETECTED):
        decode(bytes(damaged))


# -- chunk ids --------------------------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=70000), algorithm=st.sampled_from(ALGORITHMS))
def test_chunk_ids_are_16_bytes_keyed_and_verifiable(data: bytes, algorithm: str) -> None:
    fn = make_id_function(algorithm, KEY.id_secret)
    cid = fn(data)
    assert len(cid) == 16 and fn(memoryview(data)) == cid
    assert make_id_function(algorithm, bytes(32))(data) != cid  # another secret, another id
    verify_chunk(fn, cid, data)
    with pytest.raises(errors.DamageError):
        verify_chunk(fn, cid, data + b"\x00")


@SETTINGS
@given(n=st.integers(0, 70000), poke=st.integers(0, 70000), value=st.integers(1, 255))
def test_is_zero_agrees_with_comparison(n: int, poke: int, value: int) -> None:
    zero = bytearray(n)
    assert is_zero(bytes(zero)) and is_zero(memoryview(zero))
    if n:
        zero[poke % n] = value
        assert not is_zero(bytes(zero)) and not is_zero(memoryview(zero))


def test_id_function_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_id_function("sha1", bytes(32))
    with pytest.raises(ValueError):
        make_id_function(C.ID_XXH3_128_KEYED, bytes(16))


# -- blobs ------------------------------------------------------------------------------------


@SETTINGS
@given(data=chunk_data, encrypted=st.booleans(), level=st.integers(1, 9))
def test_blob_round_trip(data: bytes, encrypted: bool, level: int) -> None:
    cd = codec(encrypted, level)
    cid = IDFN(data)
    blob = encode_blob(cd, cid, data)
    assert decode_blob(cd, cid, blob, len(data)) == data


@SETTINGS
@given(data=chunk_data, at=st.integers(0, 10**6), cut=st.integers(1, 10**6))
def test_encrypted_blob_detects_flip_truncation_and_swap(data: bytes, at: int, cut: int) -> None:
    cd = codec(True)
    cid = IDFN(data)
    blob = encode_blob(cd, cid, data)
    assert_detected(lambda b: decode_blob(cd, cid, b, len(data)), blob, at)
    with pytest.raises(DETECTED):
        decode_blob(cd, cid, blob[: len(blob) - 1 - cut % len(blob)], len(data))
    with pytest.raises(errors.DamageError):
        decode_blob(cd, IDFN(data + b"x"), blob, len(data))  # moved to another id


# -- raw-block frames ---------------------------------------------------------------------

#: Content sizes around raw_frame's switches: 1-/2-/4-byte content size, one block or more.
raw_sizes = st.one_of(
    st.integers(0, 300),
    st.integers(65_000, 66_000),
    st.sampled_from([128 * 1024 - 1, 128 * 1024, 128 * 1024 + 1, 3 * 128 * 1024 + 7]),
)


@SETTINGS
@given(
    size=raw_sizes,
    seed=st.integers(0, 2**32),
)
def test_raw_frame_is_a_zstd_frame_of_its_content(size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    frame = raw_frame(data)
    assert zstandard.get_frame_parameters(frame).content_size == size
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    blocks = max(1, -(-size // (128 * 1024)))
    assert (
        len(frame) == size + 4 + 1 + (1 if size < 256 else 2 if size <= 65791 else 4) + 3 * blocks
    )
    for encrypted in (False, True):  # what a reader of the repository does with it
        cd = codec(encrypted)
        blob = (
            frame
            if not encrypted
            else seal(KEY.data_key, frame, blob_aad(IDFN(data)), os.urandom(12))
        )
        assert decode_blob(cd, IDFN(data), blob, size) == data


@SETTINGS
@given(
    size=raw_sizes,
    seed=st.integers(0, 2**32),
    encrypted=st.booleans(),
)
def test_a_one_block_raw_frame_is_read_as_a_view_of_itself(
    size: int, seed: int, encrypted: bool
) -> None:
    """Up to one block (128 KiB) a raw frame's content comes back as a read-only view of
    the blob's bytes, equal to what zstd returns; larger frames (several blocks) and
    compressed ones are decompressed as before."""
    data = random.Random(seed).randbytes(size)
    cd = codec(encrypted)
    cid = IDFN(data) if data else ZERO_ID
    frame = raw_frame(data)
    blob = frame if not encrypted else seal(KEY.data_key, frame, blob_aad(cid), os.urandom(12))
    got = decode_blob_view(cd, cid, blob, size)
    assert got == data == decode_blob(cd, cid, blob, size)
    if size <= 128 * 1024:
        assert isinstance(got, memoryview) and got.readonly
    else:
        assert isinstance(got, bytes)
    compressible = bytes(size)[:-1] + b"x" if size else b""
    z = encode_blob(codec(encrypted), IDFN(compressible), compressible) if size > 300 else None
    if z is not None:  # control: a compressed frame is decompressed, not viewed
        back = decode_blob_view(cd, IDFN(compressible), z, size)
        assert isinstance(back, bytes) and back == compressible


@pytest.mark.parametrize(
    "damage",
    ["block size", "not last", "compressed block", "checksum flag", "short", "long", "magic"],
)
def test_a_raw_frame_that_is_not_whole_is_not_taken_as_a_view(damage: str) -> None:
    """The view is taken only for the exact shape raw_frame writes; anything else goes to
    zstd, which refuses it as decompress does (each case a control of the others: the
    undamaged frame is a view)."""
    data = random.Random(7).randbytes(65536)
    frame = bytearray(raw_frame(data))
    assert isinstance(decompress_view(bytes(frame), 65536, what="x"), memoryview)
    head = 4 + 1 + 2
    if damage == "block size":
        frame[head : head + 3] = ((65535 << 3) | 1).to_bytes(3, "little")
    elif damage == "not last":
        frame[head : head + 3] = (65536 << 3).to_bytes(3, "little")
    elif damage == "compressed block":
        frame[head : head + 3] = ((65536 << 3) | 0b101).to_bytes(3, "little")
    elif damage == "checksum flag":
        frame[4] |= 0x04
    elif damage == "short":
        del frame[-1]
    elif damage == "long":
        frame += b"\x00"
    elif damage == "magic":
        frame[0] ^= 1
    with pytest.raises((errors.DamageError, errors.FormatError)):
        decompress_view(bytes(frame), 65536, what="x")
    with pytest.raises((errors.DamageError, errors.FormatError)):
        decompress_view(bytes(raw_frame(data)), 65535, what="x")  # not the expected size


def _mixed(seed: int, size: int, compressible_at: str) -> bytes:
    """Random bytes with one compressible stretch (a sample's worth) at the given place."""
    b = bytearray(random.Random(seed).randbytes(size))
    n = INCOMPRESSIBLE_SAMPLE
    at = {"start": 0, "middle": (size - n) // 2, "end": size - n}[compressible_at]
    b[at : at + n] = bytes(n)
    return bytes(b)


@pytest.mark.parametrize("size", [4 * INCOMPRESSIBLE_SAMPLE, 64 * 1024, 256 * 1024])
def test_incompressible_judged_from_three_samples(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    compressed: list[int] = []
    real = BlobCodec.compress

    def spy(self: BlobCodec, data: bytes | memoryview, *, checksum: bool) -> bytes:
        compressed.append(len(data))
        return real(self, data, checksum=checksum)

    monkeypatch.setattr(BlobCodec, "compress", spy)
    cd = BlobCodec(3, None, skip_incompressible=True)
    rnd = random.Random(size).randbytes(size)
    assert cd.looks_incompressible(rnd)
    assert encode_blob(cd, IDFN(rnd), rnd) == raw_frame(rnd) and compressed == []
    # zstd itself emits the same bytes for random data: the shortcut changes no stored byte.
    plain = BlobCodec(3, None)
    assert encode_blob(plain, IDFN(rnd), rnd) == raw_frame(rnd) and compressed == [size]
    # Any one compressible sample keeps the compressor (each place is a control of its own).
    for where in ("start", "middle", "end"):
        data = _mixed(size, size, where)
        assert not cd.looks_incompressible(data), where
        blob = encode_blob(cd, IDFN(data), data)
        assert compressed[-1] == size  # the compressor ran on the whole chunk
        assert decode_blob(cd, IDFN(data), blob, size) == data
    assert not cd.looks_incompressible(bytes(size))
    # Below four samples a chunk is never judged.
    assert not cd.looks_incompressible(rnd[: 4 * INCOMPRESSIBLE_SAMPLE - 1])


# -- packs ------------------------------------------------------------------------------------


def build_pack(cd: BlobCodec, chunks: list[bytes], tail_id: bool = False) -> tuple[str, bytes]:
    pb = PackBuilder(cd, tail_id=tail_id)
    for c in chunks:
        pb.add(IDFN(c), encode_blob(cd, IDFN(c), c), len(c))
    assert pb.count == len(chunks) and pb.size >= C.HEADER_SIZE
    pid, data = pb.finish()
    return pid, bytes(data)


unique_chunks = st.lists(chunk_data, min_size=0, max_size=8, unique=True)


@SETTINGS
@given(chunks=unique_chunks, encrypted=st.booleans(), tail_id=st.booleans())
def test_pack_round_trip_from_tail_alone(
    chunks: list[bytes], encrypted: bool, tail_id: bool
) -> None:
    cd = codec(encrypted)
    pid, data = build_pack(cd, chunks, tail_id)
    tail = data[-pack_tail_size(data[-C.PACK_FOOTER_SIZE :]) :]
    # The id covers the tail alone when the header says so, else every byte.
    assert pid == hashlib.sha256(tail if tail_id else data).hexdigest() == pack_id(data)
    assert bool(struct.unpack_from("<I", data, 8)[0] & C.FEATURE_PACK_TAIL_ID) == tail_id
    entries = decode_pack_trailer(cd, tail)
    assert entries == decode_pack_trailer(cd, data, pack_length=len(data))
    assert [e.chunk_id for e in entries] == [IDFN(c) for c in chunks]
    for e, c in zip(entries, chunks, strict=True):
        assert decode_blob(cd, e.chunk_id, read_blob(data, e), e.raw_length) == c


@SETTINGS
@given(chunks=unique_chunks.filter(bool), encrypted=st.booleans(), at=st.integers(0, 10**6))
def test_tail_id_changes_with_any_tail_byte_and_blobs_stay_checked(
    chunks: list[bytes], encrypted: bool, at: int
) -> None:
    cd = codec(encrypted)
    pid, data = build_pack(cd, chunks, tail_id=True)
    trailer_offset = len(data) - pack_tail_size(data[-C.PACK_FOOTER_SIZE :])
    tail_byte = bytearray(data)
    tail_byte[trailer_offset + at % (len(data) - trailer_offset)] ^= 0x20
    # A footer no longer decodable (or claiming an unknown feature) is refused: caught too.
    with contextlib.suppress(errors.DamageError, errors.UnsupportedVersionError):
        assert pack_id(bytes(tail_byte)) != pid
    # A blob byte is outside the id: the chunk id check on reading is what catches it.
    blob_byte = bytearray(data)
    blob_byte[C.HEADER_SIZE + at % (trailer_offset - C.HEADER_SIZE)] ^= 0x20
    assert pack_id(bytes(blob_byte)) == pid
    entries = decode_pack_trailer(cd, bytes(blob_byte), pack_length=len(data))
    damaged = 0
    for e, c in zip(entries, chunks, strict=True):
        try:
            out = decode_blob(cd, e.chunk_id, read_blob(bytes(blob_byte), e), e.raw_length)
            verify_chunk(IDFN, e.chunk_id, out)
        except errors.DamageError:
            damaged += 1
        else:
            assert out == c
    assert damaged == 1


def test_whole_id_pack_covers_its_blobs() -> None:
    """Negative control for the test above: a pack of a repository without the feature."""
    cd = codec(False)
    pid, data = build_pack(cd, [b"x" * 5000, b"y" * 7000])
    flipped = bytearray(data)
    flipped[C.HEADER_SIZE + 3] ^= 0x20
    assert pack_id(data) == pid and pack_id(bytes(flipped)) != pid


def read_whole_pack(cd: BlobCodec, data: bytes) -> None:
    for e in decode_pack_trailer(cd, data, pack_length=len(data)):
        verify_chunk(
            IDFN, e.chunk_id, decode_blob(cd, e.chunk_id, read_blob(data, e), e.raw_length)
        )


@SETTINGS
@given(chunks=unique_chunks, at=st.integers(0, 10**6), cut=st.integers(1, 10**6))
def test_encrypted_pack_detects_any_flip_and_truncation(
    chunks: list[bytes], at: int, cut: int
) -> None:
    cd = codec(True)
    _, data = build_pack(cd, chunks)
    assert_detected(lambda b: read_whole_pack(cd, b), data, at)
    with pytest.raises(DETECTED):
        read_whole_pack(cd, data[: len(data) - 1 - cut % len(data)])


def test_pack_builder_refuses_duplicates_and_zero_id() -> None:
    pb = PackBuilder(codec(False))
    pb.add(IDFN(b"a"), b"x", 1)
    with pytest.raises(ValueError):
        pb.add(IDFN(b"a"), b"x", 1)
    with pytest.raises(ValueError):
        pb.add(ZERO_ID, b"x", 1)


def _spec_pack(cd: BlobCodec, header: bytes, blobs: list[tuple[bytes, bytes, int]]) -> bytes:
    """A plain pack assembled from the layout alone (header, blobs, trailer body as a
    checksummed zstd frame, footer), to hold the builder's in-place bytes against."""
    entries = bytearray(struct.pack("<I", len(blobs)))
    at = C.HEADER_SIZE
    for cid, blob, raw_length in blobs:
        entries += struct.pack(C.PACK_ENTRY_STRUCT, cid, at, len(blob), raw_length)
        at += len(blob)
    body = cd.seal_body(bytes(entries), b"")  # plain: a zstd frame, no AAD
    aad = header + struct.pack("<Q", at)
    return header + b"".join(b for _c, b, _n in blobs) + body + aad + struct.pack("<I", len(body))


@SETTINGS
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 300_000), st.integers(0, 2**32), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    capacity=st.sampled_from([0, 5000, 1 << 20]),
)
def test_pack_built_in_place_is_its_layout(
    shapes: list[tuple[int, int, bool]], capacity: int
) -> None:
    """Blobs added whole or as raw-frame pieces, in a mapping that may grow under them
    (capacity 0: at the first blob past a page): the pack is its layout byte for byte,
    and each blob's view taken along the way still reads that blob."""
    chunks = list(
        dict.fromkeys(  # unique, in order: random bytes or a repeated pattern
            random.Random(seed).randbytes(n) if rnd else (b"%d," % seed * n)[:n]
            for n, seed, rnd in shapes
        )
    )
    cd = BlobCodec(3, None, skip_incompressible=True)
    pb = PackBuilder(cd, tail_id=True, capacity=capacity)
    expected, views = [], []
    for i, c in enumerate(chunks):
        cid = IDFN(c)
        if i % 2:
            entry = pb.add_parts(cid, raw_frame_parts(c), len(c))
            blob = raw_frame(c)
        else:
            blob = encode_blob(cd, cid, c)
            entry = pb.add(cid, blob, len(c))
        expected.append((cid, blob, len(c)))
        views.append((pb.blob(entry), blob))
    header = make_header(C.TYPE_PACK, encrypted=False, required=C.FEATURE_PACK_TAIL_ID).encode()
    pid, data = pb.finish()
    assert bytes(data) == _spec_pack(cd, header, expected) and pid == pack_id(data)
    assert all(bytes(v) == blob for v, blob in views)
    with pytest.raises(TypeError):
        data[0] = 0  # the pack handed out cannot be written through


def test_large_pieces_are_copied_off_the_gil(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 16 KiB or more that are ``bytes`` or writable buffers are copied by
    ``ctypes.memmove`` (which releases the GIL); smaller ones, and read-only views, by
    slice assignment (the controls).  The pack is the same either way."""
    from vmarchive.format import pack as fpack

    moved: list[int] = []
    real = fpack._memmove

    def recording(dst: int, src: bytes, n: int) -> int:
        moved.append(n)
        return real(dst, src, n)

    monkeypatch.setattr(fpack, "_memmove", recording)
    cd = codec(False)
    big = random.Random(1).randbytes(64 << 10)
    small = random.Random(2).randbytes((16 << 10) - 1)
    pb = PackBuilder(cd, capacity=0)  # grown under the copies: the address follows
    pb.add_parts(IDFN(big), raw_frame_parts(big), len(big))
    pb.add_parts(IDFN(small), raw_frame_parts(small), len(small))
    view_of_big = big[1:] + b"!"
    pb.add_parts(IDFN(view_of_big), [memoryview(view_of_big)], len(view_of_big))
    writable = bytearray(big[2:] + b"!!")
    pb.add_parts(IDFN(bytes(writable)), raw_frame_parts(memoryview(writable)), len(writable))
    assert moved == [len(big), len(writable)]
    _pid, data = pb.finish()
    expected = [raw_frame(big), raw_frame(small), view_of_big, raw_frame(bytes(writable))]
    assert [bytes(data[e.offset : e.offset + e.length]) for e in pb.entries] == expected


def test_a_released_mapping_builds_the_next_pack_exactly() -> None:
    """A builder's mapping is given back only when no view of it is left anywhere (the
    control: while the pack's bytes or one blob's view are held, it is not); a pack built
    in it again carries nothing of the bigger pack it held before."""
    cd = codec(False)
    big = [random.Random(i).randbytes(200_000) for i in range(4)]
    pb = PackBuilder(cd)
    with pytest.raises(ValueError):
        pb.release()  # not finished
    entry = pb.add(IDFN(big[0]), encode_blob(cd, IDFN(big[0]), big[0]), len(big[0]))
    for c in big[1:]:
        pb.add(IDFN(c), encode_blob(cd, IDFN(c), c), len(c))
    held = pb.blob(entry)
    _pid, data = pb.finish()
    del data
    assert pb.release() is None  # a blob's view is held
    del held
    mapping = pb.release()
    assert mapping is not None
    small = [b"x" * 70_000, b"y" * 10]
    again = PackBuilder(cd, mapping=mapping)
    fresh = PackBuilder(cd)
    for b in (again, fresh):
        for c in small:
            b.add(IDFN(c), encode_blob(cd, IDFN(c), c), len(c))
    pid, data = again.finish()
    fresh_pid, fresh_data = fresh.finish()
    assert pid == fresh_pid and bytes(data) == bytes(fresh_data)
    assert again.release() is None  # ``data`` is still held


# -- index ------------------------------------------------------------------------------------


index_entries = st.lists(
    st.builds(
        IndexEntry,
        chunk_id=st.binary(min_size=16, max_size=16).filter(lambda b: b != ZERO_ID),
        pack_id=st.sampled_from([bytes([i]) * 32 for i in range(3)]),
        offset=st.integers(16, 2**32 - 1),
        length=st.integers(0, 2**32 - 1),
        raw_length=st.integers(0, C.MAX_CHUNK_SIZE),
    ),
    max_size=40,
    unique_by=lambda e: e.chunk_id,
)


@SETTINGS
@given(entries=index_entries, encrypted=st.booleans())
def test_index_round_trip_sorted(entries: list[IndexEntry], encrypted: bool) -> None:
    cd = codec(encrypted)
    assert decode_index(cd, encode_index(cd, entries)) == sorted(entries, key=lambda e: e.chunk_id)


@SETTINGS
@given(entries=index_entries, encrypted=st.booleans())
def test_index_packed_is_the_same_entries(entries: list[IndexEntry], encrypted: bool) -> None:
    """The packed form (what a repository loads its index from) says what decode_index says."""
    cd = codec(encrypted)
    packs, body = decode_index_packed(cd, encode_index(cd, entries))
    assert packs == sorted({e.pack_id for e in entries})
    got = [
        IndexEntry(cid, packs[n], off, ln, raw)
        for cid, n, off, ln, raw in struct.iter_unpack(C.INDEX_ENTRY_STRUCT, body)
    ]
    assert got == sorted(entries, key=lambda e: e.chunk_id)


@SETTINGS
@given(
    entries=index_entries,
    at=st.integers(0, 10**6),
    cut=st.integers(1, 10**6),
    encrypted=st.booleans(),
)
def test_index_detects_damage(
    entries: list[IndexEntry], at: int, cut: int, encrypted: bool
) -> None:
    cd = codec(encrypted)
    data = encode_index(cd, entries)
    if encrypted:
        assert_detected(lambda b: decode_index(cd, b), data, at)
    with pytest.raises(DETECTED):
        decode_index(cd, data[: len(data) - 1 - cut % len(data)])


_GOOD = IndexEntry(b"\x01" * 16, b"\x02" * 32, 64, 10, 20)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([_GOOD, _GOOD], "appears twice"),
        ([IndexEntry(ZERO_ID, b"\x02" * 32, 64, 10, 20)], "bad chunk id"),
        ([IndexEntry(b"\x01" * 15, b"\x02" * 32, 64, 10, 20)], "bad chunk id"),
        ([IndexEntry(b"\x01" * 16, b"\x02" * 31, 64, 10, 20)], "pack ids must be 32 bytes"),
        ([IndexEntry(b"\x01" * 16, b"\x02" * 32, 2**32, 10, 20)], "out of range"),
        ([IndexEntry(b"\x01" * 16, b"\x02" * 32, 64, -1, 20)], "out of range"),
    ],
)
def test_index_encoder_refuses_what_no_reader_accepts(bad: list[IndexEntry], message: str) -> None:
    """A repeated or zero or short chunk id, a short pack id, a field beyond 32 bits: the
    encoder says so rather than write an object decode_index would refuse (the control:
    one good entry encodes and decodes)."""
    cd = codec(False)
    assert decode_index(cd, encode_index(cd, [_GOOD])) == [_GOOD]
    with pytest.raises(ValueError, match=message):
        encode_index(cd, bad)


# -- manifests --------------------------------------------------------------------------------


@SETTINGS
@given(m=manifests(), encrypted=st.booleans())
def test_manifest_round_trip(m: Manifest, encrypted: bool) -> None:
    cd = codec(encrypted)
    data = encode_manifest(cd, m)
    assert decode_manifest(cd, data) == m
    assert archive_id(data) == hashlib.sha256(data).hexdigest()


@SETTINGS
@given(m=manifests(), at=st.integers(0, 10**6), cut=st.integers(1, 10**6), encrypted=st.booleans())
def test_manifest_detects_damage(m: Manifest, at: int, cut: int, encrypted: bool) -> None:
    cd = codec(encrypted)
    data = encode_manifest(cd, m)
    if encrypted:
        assert_detected(lambda b: decode_manifest(cd, b), data, at)
    with pytest.raises(DETECTED):
        decode_manifest(cd, data[: len(data) - 1 - cut % len(data)])


@pytest.mark.parametrize(
    "name", ["", "/abs", "a//b", "a/", "..", "a/../b", ".hidden", "a/.b", "sp ace", "x" * 256, "é"]
)
def test_unsafe_stream_names_are_refused(name: str) -> None:
    assert not is_safe_stream_name(name)
    m = Manifest(
        {"time": "t", "domain": "d", "kind": "k"}, [StreamEntry(name, "meta", 0, 1, {}, b"")]
    )
    with pytest.raises(errors.FormatError):
        encode_manifest(codec(False), m)


@pytest.mark.parametrize(
    "name", ["domain.xml", "ram/pc.ram", "ram/0000:00:02.0/vga.vram", "disk/vda", "a-b_c+d@e"]
)
def test_safe_stream_names_are_accepted(name: str) -> None:
    assert is_safe_stream_name(name)


# -- config, key file, lock -------------------------------------------------------------------


@SETTINGS
@given(
    encryption=st.sampled_from(C.ENCRYPTIONS),
    algorithm=st.sampled_from(ALGORITHMS),
    level=st.integers(1, 19),
    seed=st.integers(0, 1000),
)
def test_config_round_trip(encryption: str, algorithm: str, level: int, seed: int) -> None:
    cfg, key = new_config(
        encryption=encryption,
        id_algorithm=algorithm,
        compression_level=level,
        rng=counter_rng(seed),
    )
    assert decode_config(encode_config(cfg)) == cfg
    assert (cfg.secret is None) == (encryption != C.ENCRYPTION_NONE)
    if cfg.secret is not None:
        assert cfg.secret == key.id_secret


@SETTINGS
@given(cut=st.integers(1, 10**6))
def test_config_truncation_detected(cut: int) -> None:
    cfg, _ = new_config(rng=counter_rng(1))
    data = encode_config(cfg)
    with pytest.raises(errors.FormatError):
        decode_config(data[: len(data) - 1 - cut % len(data)])


def test_config_refuses_secret_in_encrypted_repo() -> None:
    cfg = RepoConfig(
        repository_id=bytes(32),
        encryption=C.ENCRYPTION_AES256GCM,
        secret=bytes(32),
        required_features=C.FEATURE_AES256GCM,
    )
    with pytest.raises(errors.FormatError):
        encode_config(cfg)


KEYFILE = make_keyfile(KEY, "pass", counter_rng(7), TEST_SCRYPT)


@settings(max_examples=40, deadline=None)
@given(at=st.integers(0, C.KEYFILE_SIZE - 1))
def test_keyfile_detects_any_flip(at: int) -> None:
    assert open_keyfile(KEYFILE, "pass") == KEY
    with pytest.raises((errors.WrongKeyError, errors.FormatError, errors.UnsupportedVersionError)):
        damaged = bytearray(KEYFILE)
        damaged[at] ^= 0x01
        open_keyfile(bytes(damaged), "pass")


def test_keyfile_wrong_passphrase_and_fresh_salt() -> None:
    with pytest.raises(errors.WrongKeyError):
        open_keyfile(KEYFILE, "Pass")
    again = make_keyfile(KEY, "pass", os.urandom, TEST_SCRYPT)
    assert again != KEYFILE and open_keyfile(again, "pass") == KEY


@SETTINGS
@given(
    kind=st.sampled_from(C.LOCK_KINDS),
    host=st.text(max_size=30),
    pid=st.integers(0, 2**31),
    created=st.floats(0, 2e9),
    lease=st.floats(0, 1e6),
    lock_id=st.text("0123456789abcdef", min_size=1, max_size=64),
)
def test_lock_round_trip(
    kind: str, host: str, pid: int, created: float, lease: float, lock_id: str
) -> None:
    lock = LockInfo(kind, host, pid, created, created + lease, lock_id)
    assert decode_lock(encode_lock(lock)) == lock


def test_lock_staleness_rule() -> None:
    lock = LockInfo("shared", "hv1", 42, 100.0, 400.0, "ab")
    alive: Callable[[int], bool] = lambda pid: True  # noqa: E731
    dead: Callable[[int], bool] = lambda pid: False  # noqa: E731
    assert not is_stale(lock, 200.0, "hv1", alive)
    assert is_stale(lock, 200.0, "hv1", dead)  # same host, process gone
    assert not is_stale(lock, 200.0, "hv2", dead)  # other host: trust the lease
    assert is_stale(lock, 401.0, "hv2", alive)  # lease expired
