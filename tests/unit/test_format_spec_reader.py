"""A second, minimal reader written from formats/FORMAT.md alone decodes the committed vectors.

It uses no vmarchive code: only struct, hashlib, zstandard, xxhash and cryptography, and
the offsets of the spec's byte tables.  If the spec and the codec disagree, this fails.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct
from typing import Any

import xxhash
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VECTORS = pathlib.Path(__file__).resolve().parents[2] / "formats" / "vectors"
DOC: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))
SECRET = bytes.fromhex(DOC["inputs"]["id_secret"])
DATA_KEY = bytes.fromhex(DOC["inputs"]["data_key"])


def case(file: str) -> dict[str, Any]:
    return next(c for c in DOC["cases"] if c["file"] == file and c["expect"] == "ok")


def header(data: bytes) -> tuple[str, int, int, int]:
    """Section 4: magic, type, reserved, version, required, optional (16 bytes, LE)."""
    assert data[0:4] == b"VMAR" and data[5] == 0
    version, required, optional = struct.unpack("<HII", data[6:16])
    return chr(data[4]), version, required, optional


def open_sealed(sealed: bytes, aad: bytes) -> bytes:
    """Section 9: nonce (12) || ciphertext || tag (16)."""
    return AESGCM(DATA_KEY).decrypt(sealed[:12], sealed[12:], aad)


def body(data: bytes, sealed: bool, aad: bytes) -> bytes:
    """Sections 8, 13, 14: one zstd frame with content size, sealed when encrypted."""
    frame = open_sealed(data, aad) if sealed else data
    return zstandard.ZstdDecompressor().decompress(frame)


def xxh3_id(chunk: bytes) -> bytes:
    """Section 7, xxh3-128-keyed."""
    seed = hashlib.blake2b(key=SECRET, person=b"vmarchive-x3seed", digest_size=8).digest()
    prefix = hashlib.blake2b(key=SECRET, person=b"vmarchive-x3pfx", digest_size=64).digest()
    return xxhash.xxh3_128(prefix + chunk, seed=int.from_bytes(seed, "little")).digest()


def test_chunk_ids_from_the_spec() -> None:
    assert (
        DOC["xxh3_keying"]["prefix"]
        == hashlib.blake2b(key=SECRET, person=b"vmarchive-x3pfx", digest_size=64).hexdigest()
    )
    rows = {(r["algorithm"], r["input"]): r["id"] for r in DOC["chunk_ids"]}
    assert xxh3_id(b"abc").hex() == rows[("xxh3-128-keyed", "abc")]
    assert (
        hashlib.blake2b(b"abc", key=SECRET, digest_size=16).hexdigest()
        == rows[("blake2b-128-keyed", "abc")]
    )


def test_config_from_the_spec() -> None:
    for name, required in (
        ("config-plain.bin", 0),
        ("config-encrypted.bin", 1),
        ("config-pack-tail-id.bin", 2),
    ):
        data = (VECTORS / name).read_bytes()
        assert header(data) == ("C", 1, required, 0)
        doc = json.loads(data[16:])
        assert doc["repository_id"] == case(name)["value"]["repository_id"]
        assert ("id_secret" in doc) == (required & 1 == 0)


def test_keyfile_from_the_spec() -> None:
    data = (VECTORS / "keyfile.bin").read_bytes()
    assert len(data) == 144 and header(data) == ("K", 1, 0, 0)
    log2_n, r, p, reserved = data[16], data[17], data[18], data[19]
    salt = data[20:52]
    kek = hashlib.scrypt(
        DOC["inputs"]["passphrase"].encode(), salt=salt, n=1 << log2_n, r=r, p=p, dklen=32
    )
    plain = AESGCM(kek).decrypt(data[52:64], data[64:144], data[:52])
    assert reserved == 0 and plain == SECRET + DATA_KEY


def test_raw_block_frame_from_the_spec() -> None:
    """Section 8: built by hand from the layout there, then read by zstandard and compared."""
    data = (VECTORS / "blob-raw-frame.bin").read_bytes()
    want = case("blob-raw-frame.bin")
    chunk = zstandard.ZstdDecompressor().decompress(data)
    assert hashlib.sha256(chunk).hexdigest() == want["value"]["sha256"]
    assert xxh3_id(chunk).hex() == want["chunk_id"] and len(chunk) == want["raw_length"]
    size = len(chunk)
    assert 256 <= size <= 65791 and size <= 128 * 1024  # the 2-byte size, one block
    head = b"\x28\xb5\x2f\xfd" + bytes([0x60]) + struct.pack("<H", size - 256)
    assert data == head + (size << 3 | 1).to_bytes(3, "little") + chunk


def test_packs_from_the_spec() -> None:
    for name, sealed, tail_id in (
        ("pack-plain.bin", False, False),
        ("pack-encrypted.bin", True, False),
        ("pack-tail-id-plain.bin", False, True),
        ("pack-tail-id-encrypted.bin", True, True),
    ):
        data = (VECTORS / name).read_bytes()
        footer = data[-28:]
        assert (
            footer[:16] == data[:16]
            and header(data)[0] == "P"
            and header(data)[2] & 1 == int(sealed)
        )
        trailer_offset, trailer_length = struct.unpack("<QI", footer[16:28])
        assert trailer_offset + trailer_length + 28 == len(data)
        plain = body(data[trailer_offset : trailer_offset + trailer_length], sealed, footer[:24])
        (count,) = struct.unpack("<I", plain[:4])
        entries = [struct.unpack("<16sIII", plain[4 + 28 * i : 32 + 28 * i]) for i in range(count)]
        want = case(name)["value"]
        # Section 12: required feature bit 1 names the pack by its tail, else by all its bytes.
        required = struct.unpack("<I", data[8:12])[0]
        assert bool(required & 2) == tail_id
        named = data[trailer_offset:] if tail_id else data
        assert hashlib.sha256(named).hexdigest() == want["pack_id"]
        assert [(e[0].hex(), e[1], e[2], e[3]) for e in entries] == [
            (w["chunk_id"], w["offset"], w["length"], w["raw_length"]) for w in want["entries"]
        ]
        for chunk_id, offset, length, raw_length in entries:
            blob = data[offset : offset + length]
            aad = b"VMAR" + b"B" + b"\0" + struct.pack("<H", 1) + chunk_id  # section 11
            chunk = body(blob, sealed, aad)
            assert len(chunk) == raw_length and xxh3_id(chunk) == chunk_id


def test_index_from_the_spec() -> None:
    for name, sealed in (("index-plain.bin", False), ("index-encrypted.bin", True)):
        data = (VECTORS / name).read_bytes()
        assert header(data)[0] == "I"
        plain = body(data[16:], sealed, data[:16])
        npacks, nentries = struct.unpack("<II", plain[:8])
        packs = [plain[8 + 32 * j : 40 + 32 * j] for j in range(npacks)]
        base = 8 + 32 * npacks
        got = []
        for i in range(nentries):
            cid, pno, off, length, raw = struct.unpack(
                "<16sIIII", plain[base + 32 * i : base + 32 * (i + 1)]
            )
            got.append(
                {
                    "chunk_id": cid.hex(),
                    "pack_id": packs[pno].hex(),
                    "offset": off,
                    "length": length,
                    "raw_length": raw,
                }
            )
        assert len(plain) == base + 32 * nentries and got == case(name)["value"]


def test_manifests_from_the_spec() -> None:
    for name, sealed in (("manifest-plain.bin", False), ("manifest-encrypted.bin", True)):
        data = (VECTORS / name).read_bytes()
        assert header(data)[0] == "M"
        plain = body(data[16:], sealed, data[:16])
        (jlen,) = struct.unpack("<I", plain[:4])
        doc = json.loads(plain[4 : 4 + jlen])
        position = 4 + jlen
        want = case(name)["value"]
        assert doc["metadata"] == want["metadata"]
        for s, w in zip(doc["streams"], want["streams"], strict=True):
            assert s["slots"] == -(-s["size"] // s["chunk_size"])
            table = plain[position : position + 16 * s["slots"]]
            position += 16 * s["slots"]
            assert hashlib.sha256(table).hexdigest() == w["table_sha256"]
            assert (s["name"], s["kind"], s["size"], s["attrs"]) == (
                w["name"],
                w["kind"],
                w["size"],
                w["attrs"],
            )
        assert position == len(plain)
