"""The constants module adds up, agrees with the spec, and the vectors of v1 stay frozen."""

from __future__ import annotations

import hashlib
import json
import pathlib
import struct

from vmarchive.format import constants as C

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = (ROOT / "formats" / "FORMAT.md").read_text(encoding="utf-8")

#: Digest over the committed vector files of format version 1 as first released (name and
#: SHA-256 of each). Released vectors never change: a format change adds vectors under a new
#: version, or, for a feature bit (section 5), adds files of its own, frozen on their own.
FROZEN_V1 = "0eaba066d50e74748db780064b97e1903debad50a34750b34f7b3a8e0b29db5e"
#: Files added to version 1 since, each group frozen on its own digest.
ADDED: dict[str, tuple[frozenset[str], str]] = {
    "FEATURE_PACK_TAIL_ID (2026-11-26)": (
        frozenset(
            {
                "config-pack-tail-id.bin",
                "pack-tail-id-plain.bin",
                "pack-tail-id-encrypted.bin",
                "pack-tail-id-flipped-blob.bin",
            }
        ),
        "6fca7f13a11edea5ae5a5f23d6ca2d53d3a2a36891405d2e91a0c5698d43e372",
    ),
    "raw-block blob frames (2026-11-26)": (
        frozenset({"blob-raw-frame.bin"}),
        "fc828f91237d98560bf49f781ed639ee6283653f6b0e5926ddd8c395ec684a6c",
    ),
}


def test_struct_layouts_match_declared_sizes() -> None:
    assert struct.calcsize(C.HEADER_STRUCT) == C.HEADER_SIZE == 16
    assert struct.calcsize(C.BLOB_AAD_STRUCT) == C.BLOB_AAD_SIZE == 24
    assert C.HEADER_SIZE + struct.calcsize(C.KEYFILE_PARAMS_STRUCT) == C.KEYFILE_AAD_SIZE
    assert (
        C.KEYFILE_AAD_SIZE + C.NONCE_SIZE + C.MASTER_PLAINTEXT_SIZE + C.TAG_SIZE == C.KEYFILE_SIZE
    )
    assert C.HEADER_SIZE + struct.calcsize(C.PACK_FOOTER_STRUCT) == C.PACK_FOOTER_SIZE == 28
    assert C.PACK_TRAILER_AAD_SIZE == C.PACK_FOOTER_SIZE - 4
    assert struct.calcsize(C.PACK_ENTRY_STRUCT) == C.PACK_ENTRY_SIZE
    assert struct.calcsize(C.INDEX_ENTRY_STRUCT) == C.INDEX_ENTRY_SIZE
    assert C.SEAL_OVERHEAD == 28 and len(C.ZERO_ID) == C.CHUNK_ID_SIZE


def test_type_codes_are_distinct_letters() -> None:
    codes = [C.TYPE_CONFIG, C.TYPE_KEYFILE, C.TYPE_PACK, C.TYPE_INDEX, C.TYPE_MANIFEST, C.TYPE_BLOB]
    assert len(set(codes)) == len(codes)
    assert all(chr(c).isupper() for c in codes)


def test_versions_and_spec_agree() -> None:
    assert C.WRITE_VERSION in C.READ_VERSIONS
    assert f"`WRITE_VERSION = {C.WRITE_VERSION}`" in SPEC
    assert f"| {C.WRITE_VERSION} |" in SPEC.split("## 22. Changes", 1)[1]
    for name in (
        "HEADER_SIZE",
        "PACK_FOOTER_SIZE",
        "BLOB_AAD_SIZE",
        "INDEX_ENTRY_SIZE",
        "SEAL_OVERHEAD",
    ):
        assert f"`{name}`" in SPEC, name
    for kind in C.STREAM_KINDS:
        assert f"`{kind}`" in SPEC, kind
    for algorithm in C.ID_ALGORITHMS:
        assert f"`{algorithm}`" in SPEC, algorithm


def vector_digest(files: frozenset[str] | None = None) -> str:
    """Digest of ``files``, or of the first release's files (all but the added ones)."""
    doc = json.loads((ROOT / "formats" / "vectors" / "vectors.json").read_text(encoding="utf-8"))
    added = frozenset().union(*(f for f, _ in ADDED.values()))
    assert set(doc["files"]) >= added
    names = files if files is not None else frozenset(doc["files"]) - added
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(
            name.encode()
            + b"\0"
            + hashlib.sha256((ROOT / "formats" / "vectors" / name).read_bytes()).digest()
        )
    return h.hexdigest()


def test_vectors_of_version_1_are_frozen() -> None:
    assert vector_digest() == FROZEN_V1, (
        "the committed v1 vectors changed: a released format version never changes its bytes; "
        "bump WRITE_VERSION and add vectors for the new version instead (FORMAT.md, section 20)"
    )


def test_vectors_added_since_are_frozen() -> None:
    for what, (files, digest) in ADDED.items():
        assert vector_digest(files) == digest, (
            f"the committed vectors of {what} changed: released vectors never change their bytes"
        )
