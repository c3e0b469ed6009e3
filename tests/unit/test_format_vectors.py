"""The committed format vectors (formats/vectors/) regenerate byte-for-byte and decode as listed.

Positive cases must decode to the value recorded in vectors.json; negative cases must raise
exactly the error class recorded (not merely a parent class: FormatError is a DamageError).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest
import zstandard

from vmarchive import errors
from vmarchive.format import constants as C
from vmarchive.format.blob import BlobCodec, decode_blob
from vmarchive.format.chunkid import make_id_function, verify_chunk
from vmarchive.format.config import decode_config
from vmarchive.format.crypto import KeyMaterial, open_keyfile
from vmarchive.format.header import object_id
from vmarchive.format.index import decode_index
from vmarchive.format.lock import decode_lock
from vmarchive.format.manifest import decode_manifest
from vmarchive.format.pack import decode_pack_trailer, pack_id, pack_tail_size, read_blob

ROOT = pathlib.Path(__file__).resolve().parents[2]
VECTORS = ROOT / "formats" / "vectors"
DOC: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text(encoding="utf-8"))
INPUTS = DOC["inputs"]
SECRET = bytes.fromhex(INPUTS["id_secret"])
SAME_ZSTD = DOC["zstd_library"] == ".".join(map(str, zstandard.ZSTD_VERSION))


def codec_for(key: str | None) -> BlobCodec:
    if key in (None, "none"):
        return BlobCodec()
    data_key = bytes.fromhex(INPUTS[key])
    return BlobCodec(key=KeyMaterial(SECRET, data_key))


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("vectors")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-vectors"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_regenerated_vectors_are_byte_identical(regenerated: pathlib.Path) -> None:
    committed = sorted(p.name for p in VECTORS.iterdir())
    assert sorted(p.name for p in regenerated.iterdir()) == committed
    for name in committed:
        info = DOC["files"].get(name)
        if info is not None and info["zstd"] and not SAME_ZSTD:
            continue  # libzstd may emit other (equally valid) frames; decoding is still checked
        if name in ("vectors.json", "README.md") and not SAME_ZSTD:
            continue  # they record the zstd version and file hashes
        assert (regenerated / name).read_bytes() == (VECTORS / name).read_bytes(), name


def test_files_match_recorded_hashes() -> None:
    for name, info in DOC["files"].items():
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == info["sha256"], name


def test_every_file_is_used_by_a_case() -> None:
    assert {c["file"] for c in DOC["cases"]} == set(DOC["files"])
    assert {c["expect"] for c in DOC["cases"]} >= {
        "ok",
        "FormatError",
        "UnsupportedVersionError",
        "DamageError",
        "WrongKeyError",
    }


def decode(case: dict[str, Any], data: bytes) -> Any:
    """Decode one vector the way a reader would; return a value comparable to case['value']."""
    kind = case["decoder"]
    if kind == "config":
        cfg = decode_config(data)
        return {
            "repository_id": cfg.repository_id.hex(),
            "id_algorithm": cfg.id_algorithm,
            "compression": cfg.compression,
            "compression_level": cfg.compression_level,
            "memory_chunk_size": cfg.memory_chunk_size,
            "disk_chunk_size": cfg.disk_chunk_size,
            "stream_chunk_size": cfg.stream_chunk_size,
            "pack_size": cfg.pack_size,
            "encryption": cfg.encryption,
            "secret": cfg.secret.hex() if cfg.secret is not None else None,
            "version": cfg.version,
            "required_features": cfg.required_features,
            "optional_features": cfg.optional_features,
        }
    if kind == "keyfile":
        km = open_keyfile(data, case["passphrase"])
        return {
            "id_secret": km.id_secret.hex(),
            "data_key": km.data_key.hex(),
            "key_id": object_id(data),
        }
    codec = codec_for(case.get("key"))
    if kind == "blob":
        chunk_id = bytes.fromhex(case["chunk_id"])
        out = decode_blob(codec, chunk_id, data, case["raw_length"])
        verify_chunk(make_id_function(C.ID_XXH3_128_KEYED, SECRET), chunk_id, out)
        return {"sha256": hashlib.sha256(out).hexdigest()}
    if kind == "pack":
        tail = data[-pack_tail_size(data[-C.PACK_FOOTER_SIZE :]) :]
        entries = decode_pack_trailer(codec, tail)
        assert decode_pack_trailer(codec, data, pack_length=len(data)) == entries
        idfn = make_id_function(C.ID_XXH3_128_KEYED, SECRET)
        for e in entries:
            verify_chunk(
                idfn, e.chunk_id, decode_blob(codec, e.chunk_id, read_blob(data, e), e.raw_length)
            )
        return {
            "pack_id": pack_id(data),
            "entries": [
                {
                    "chunk_id": e.chunk_id.hex(),
                    "offset": e.offset,
                    "length": e.length,
                    "raw_length": e.raw_length,
                }
                for e in entries
            ],
        }
    if kind == "index":
        return [
            {
                "chunk_id": e.chunk_id.hex(),
                "pack_id": e.pack_id.hex(),
                "offset": e.offset,
                "length": e.length,
                "raw_length": e.raw_length,
            }
            for e in decode_index(codec, data)
        ]
    if kind == "manifest":
        m = decode_manifest(codec, data)
        return {
            "archive_id": object_id(data),
            "metadata": m.metadata,
            "streams": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "size": s.size,
                    "chunk_size": s.chunk_size,
                    "attrs": s.attrs,
                    "table_sha256": hashlib.sha256(s.table).hexdigest(),
                    "data_slots": sum(1 for i in range(s.slots) if s.chunk_id(i) != C.ZERO_ID),
                }
                for s in m.streams
            ],
        }
    if kind == "lock":
        lk = decode_lock(data)
        return {
            "kind": lk.kind,
            "host": lk.host,
            "pid": lk.pid,
            "created": lk.created,
            "expires": lk.expires,
            "id": lk.id,
        }
    raise AssertionError(kind)


CASES = DOC["cases"]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c['file']}:{c['expect']}:{i}" for i, c in enumerate(CASES)]
)
def test_case(case: dict[str, Any]) -> None:
    data = (VECTORS / case["file"]).read_bytes()
    if case["expect"] == "ok":
        assert decode(case, data) == case["value"]
        return
    expected = getattr(errors, case["expect"])
    with pytest.raises(errors.VmarchiveError) as info:
        decode(case, data)
    assert type(info.value) is expected, (type(info.value).__name__, str(info.value))


def test_golden_chunk_ids() -> None:
    chunks = {"empty": b"", "abc": b"abc", "64 KiB of 0x01": b"\x01" * 65536}
    checked = 0
    for row in DOC["chunk_ids"]:
        fn = make_id_function(row["algorithm"], SECRET)
        if row["input"] in chunks:
            assert fn(chunks[row["input"]]).hex() == row["id"], row
            checked += 1
    assert checked == 2 * len(chunks)
    # Negative control: another secret gives other ids.
    other = make_id_function(C.ID_XXH3_128_KEYED, bytes(32))
    assert other(b"abc").hex() != next(r["id"] for r in DOC["chunk_ids"] if r["input"] == "abc")
