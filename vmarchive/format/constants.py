"""Every magic, version, feature bit, type code and size of the on-disk format, in one place.

Layer: format (imports nothing).  ``formats/FORMAT.md`` is the source of truth; this module
mirrors its tables.  A change here that alters bytes on disk needs a version bump, a new entry
in the spec's changes section and regenerated vectors (``scripts/gen-vectors``).
"""

from __future__ import annotations

from typing import Final

# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------

#: The format version this release writes into every object header.
WRITE_VERSION: Final = 1
#: The format versions this release can read.  Anything else -> UnsupportedVersionError.
READ_VERSIONS: Final = frozenset({1})

# --------------------------------------------------------------------------------------------
# Common object header (config, key file, pack head + pack footer, index, manifest)
# --------------------------------------------------------------------------------------------

#: First four bytes of every binary object of a repository.
MAGIC: Final = b"VMAR"

# Header fields, little-endian:
#   offset  size  field
#        0     4  magic  b"VMAR"
#        4     1  type code (one ASCII letter, below)
#        5     1  reserved, must be 0
#        6     2  format version (u16)
#        8     4  required feature bits (u32): a reader refuses an object with a bit it lacks
#       12     4  optional feature bits (u32): a reader ignores bits it does not know
#   4 + 1 + 1 + 2 + 4 + 4 = 16 bytes
HEADER_STRUCT: Final = "<4sBBHII"
HEADER_SIZE: Final = 16

# Type codes (ASCII letters so a hexdump is readable: "VMARM" starts a manifest).
TYPE_CONFIG: Final = ord("C")
TYPE_KEYFILE: Final = ord("K")
TYPE_PACK: Final = ord("P")
TYPE_INDEX: Final = ord("I")
TYPE_MANIFEST: Final = ord("M")
#: Blobs have no header of their own; this code only appears in the blob AAD (below).
TYPE_BLOB: Final = ord("B")
TYPE_NAMES: Final = {
    TYPE_CONFIG: "config",
    TYPE_KEYFILE: "key file",
    TYPE_PACK: "pack",
    TYPE_INDEX: "index",
    TYPE_MANIFEST: "manifest",
    TYPE_BLOB: "blob",
}

# --------------------------------------------------------------------------------------------
# Feature bits
# --------------------------------------------------------------------------------------------

#: Required feature: the object body is sealed with AES-256-GCM under the repository data key.
#: Set on index, manifest and pack objects of encrypted repositories (and on the config of an
#: encrypted repository, so an old reader that cannot decrypt refuses the whole repository).
FEATURE_AES256GCM: Final = 1 << 0
#: Required feature: on a pack, its id is the SHA-256 of its tail (trailer body and footer),
#: not of all its bytes; on the config, writers of this repository name their packs so.
#: Hashing a whole pack cost a third of a capture's CPU (SHA-256 at ~370 MiB/s without SHA
#: extensions), and the blobs are checked by their chunk ids anyway.
FEATURE_PACK_TAIL_ID: Final = 1 << 1
#: Required feature bits this release understands.
KNOWN_REQUIRED_FEATURES: Final = FEATURE_AES256GCM | FEATURE_PACK_TAIL_ID
#: Optional feature bits this release understands (none yet: v1 defines none).
KNOWN_OPTIONAL_FEATURES: Final = 0

# --------------------------------------------------------------------------------------------
# Chunk ids
# --------------------------------------------------------------------------------------------

CHUNK_ID_SIZE: Final = 16
ZERO_ID: Final = bytes(CHUNK_ID_SIZE)
ID_XXH3_128_KEYED: Final = "xxh3-128-keyed"
ID_BLAKE2B_128_KEYED: Final = "blake2b-128-keyed"
ID_ALGORITHMS: Final = (ID_XXH3_128_KEYED, ID_BLAKE2B_128_KEYED)
#: The per-repository id secret.
ID_SECRET_SIZE: Final = 32
#: BLAKE2b personalisation strings (16 bytes max) for deriving the XXH3 seed and prefix.
XXH3_SEED_PERSON: Final = b"vmarchive-x3seed"
XXH3_PREFIX_PERSON: Final = b"vmarchive-x3pfx"
#: Length of the secret-derived prefix hashed before each chunk (one XXH3 stripe).
XXH3_PREFIX_SIZE: Final = 64

#: Object ids (packs, indexes, manifests, key files): SHA-256 of the object bytes, 32 bytes.
OBJECT_ID_SIZE: Final = 32

# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------

COMPRESSION_ZSTD: Final = "zstd"
COMPRESSIONS: Final = (COMPRESSION_ZSTD,)
DEFAULT_ZSTD_LEVEL: Final = 3
MIN_ZSTD_LEVEL: Final = 1
MAX_ZSTD_LEVEL: Final = 19
#: Upper bound on any decompressed structure (index, manifest, pack trailer body): a
#: frame header claiming more is refused before allocating.
MAX_BODY_SIZE: Final = 1 << 30

# --------------------------------------------------------------------------------------------
# Encryption (AES-256-GCM)
# --------------------------------------------------------------------------------------------

ENCRYPTION_NONE: Final = "none"
ENCRYPTION_AES256GCM: Final = "aes-256-gcm"
ENCRYPTIONS: Final = (ENCRYPTION_NONE, ENCRYPTION_AES256GCM)
KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
#: Sealed bytes = nonce (12) || ciphertext (len(plaintext)) || tag (16): 28 bytes of overhead.
SEAL_OVERHEAD: Final = NONCE_SIZE + TAG_SIZE

# Blob AAD (encrypted repositories): binds a blob to its chunk id, its kind and the version.
#   offset  size  field
#        0     4  magic b"VMAR"
#        4     1  type code "B"
#        5     1  reserved 0
#        6     2  format version (u16 LE)
#        8    16  chunk id
#   4 + 1 + 1 + 2 + 16 = 24 bytes
BLOB_AAD_STRUCT: Final = "<4sBBH16s"
BLOB_AAD_SIZE: Final = 24

# --------------------------------------------------------------------------------------------
# Key file
# --------------------------------------------------------------------------------------------

#   offset  size  field
#        0    16  common header (type "K", required bits 0)
#       16     1  log2 of scrypt N (u8)
#       17     1  scrypt r (u8)
#       18     1  scrypt p (u8)
#       19     1  reserved, must be 0
#       20    32  scrypt salt
#       52    12  AES-GCM nonce
#       64    64  ciphertext of id secret (32) || data key (32)
#      128    16  GCM tag          (AAD = bytes 0..52)
#   16 + 1 + 1 + 1 + 1 + 32 + 12 + 64 + 16 = 144 bytes
KEYFILE_PARAMS_STRUCT: Final = "<BBBB32s"
KEYFILE_AAD_SIZE: Final = 52
KEYFILE_SIZE: Final = 144
SALT_SIZE: Final = 32
MASTER_PLAINTEXT_SIZE: Final = 64
#: Defaults: N = 2**17, r = 8, p = 1 -> 128 MiB of memory, about 0.3-0.5 s per unlock.
DEFAULT_SCRYPT_LOG2_N: Final = 17
DEFAULT_SCRYPT_R: Final = 8
DEFAULT_SCRYPT_P: Final = 1
#: Readers refuse parameters outside these bounds (a forged key file must not exhaust memory).
MIN_SCRYPT_LOG2_N: Final = 10
MAX_SCRYPT_LOG2_N: Final = 22
MAX_SCRYPT_R: Final = 32
MAX_SCRYPT_P: Final = 16

# --------------------------------------------------------------------------------------------
# Pack
# --------------------------------------------------------------------------------------------

# A pack is:  header (16) || blob* || trailer body || footer (28)
# Footer, at the very end of the pack:
#   offset  size  field
#        0    16  common header again (type "P"; same bytes as the pack header)
#       16     8  trailer offset: where the trailer body starts (u64 LE)
#       24     4  trailer body length (u32 LE)   <- the last four bytes of the pack
#   16 + 8 + 4 = 28 bytes
PACK_FOOTER_STRUCT: Final = "<QI"
PACK_FOOTER_SIZE: Final = 28
#: Trailer body AAD = footer bytes 0..24 (header + trailer offset).
PACK_TRAILER_AAD_SIZE: Final = 24
# Trailer plaintext (before zstd and sealing):
#   u32 entry count, then per entry (28 bytes, LE):
#     chunk id (16) || offset in pack (u32) || stored length (u32) || raw length (u32)
PACK_ENTRY_STRUCT: Final = "<16sIII"
PACK_ENTRY_SIZE: Final = 28
#: A first range GET of this many tail bytes holds the whole trailer of a typical pack
#: (16 MiB of 64 KiB chunks = 256 entries = 7 KiB).
PACK_TAIL_FIRST_FETCH: Final = 64 * 1024
#: Offsets and lengths in a pack are u32: a pack never reaches 4 GiB.
MAX_PACK_SIZE: Final = (1 << 32) - 1

# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

# Index plaintext body (before zstd and sealing), LE:
#   u32 pack count P, u32 entry count N
#   P x 32-byte pack ids (sorted, unique)
#   N x entry (32 bytes): chunk id (16) || pack number (u32, into the pack list)
#                         || offset (u32) || stored length (u32) || raw length (u32)
#   entries sorted by chunk id, unique
INDEX_COUNTS_STRUCT: Final = "<II"
INDEX_ENTRY_STRUCT: Final = "<16sIIII"
INDEX_ENTRY_SIZE: Final = 32

# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

# Manifest plaintext body (before zstd and sealing):
#   u32 LE length J of the JSON document, J bytes of canonical JSON (UTF-8),
#   then the slot tables of all streams, in stream order, 16 bytes per slot.
MANIFEST_JSON_LENGTH_STRUCT: Final = "<I"
KIND_META: Final = "meta"
KIND_RAM: Final = "ram"
KIND_DEVSTATE: Final = "devstate"
KIND_STREAM: Final = "stream"
KIND_DISK: Final = "disk"
STREAM_KINDS: Final = (KIND_META, KIND_RAM, KIND_DEVSTATE, KIND_STREAM, KIND_DISK)
#: Metadata keys every manifest must have (string values).
REQUIRED_METADATA_KEYS: Final = ("time", "domain", "kind")
MAX_STREAM_NAME: Final = 255
MAX_CHUNK_SIZE: Final = 1 << 30

# --------------------------------------------------------------------------------------------
# Repository defaults (config)
# --------------------------------------------------------------------------------------------

REPOSITORY_ID_SIZE: Final = 32
DEFAULT_MEMORY_CHUNK: Final = 64 * 1024
DEFAULT_DISK_CHUNK: Final = 256 * 1024
DEFAULT_STREAM_CHUNK: Final = 1024 * 1024
DEFAULT_PACK_SIZE: Final = 16 * 1024 * 1024
MIN_CHUNK_SIZE: Final = 4 * 1024
MAX_CONFIG_SIZE: Final = 64 * 1024

# --------------------------------------------------------------------------------------------
# Locks
# --------------------------------------------------------------------------------------------

LOCK_FORMAT: Final = "vmarchive-lock"
LOCK_SHARED: Final = "shared"
LOCK_EXCLUSIVE: Final = "exclusive"
LOCK_KINDS: Final = (LOCK_SHARED, LOCK_EXCLUSIVE)
MAX_LOCK_SIZE: Final = 4096
#: A lock is refreshed by its holder at least every LOCK_REFRESH seconds and lives
#: LOCK_LEASE seconds past its last refresh.
DEFAULT_LOCK_LEASE: Final = 300.0
DEFAULT_LOCK_REFRESH: Final = 60.0
#: gc never deletes a pack or index younger than this (seconds), whatever the marks say.
GC_GRACE_PERIOD: Final = 6 * 3600.0
