"""Chunk ids: 16-byte keyed hashes of chunk contents, and fast zero detection.

Layer: format.  Two algorithms (``formats/FORMAT.md``, "Chunk ids"):

``xxh3-128-keyed`` (default)
    XXH3-128 with a 64-bit seed and a 64-byte prefix, both derived from the repository's
    32-byte id secret with keyed BLAKE2b::

        seed   = u64_le(BLAKE2b(key=secret, person="vmarchive-x3seed", digest_size=8))
        prefix = BLAKE2b(key=secret, person="vmarchive-x3pfx", digest_size=64)
        id     = XXH3_128(prefix || chunk, seed) as 16 big-endian bytes (xxhash's digest())

    Fast and keyed, but **not** a MAC: it stops a guest that does not know the secret from
    aiming blind collisions at other VMs' data; it does not resist a cryptanalytic attack.

``blake2b-128-keyed``
    ``hashlib.blake2b(chunk, digest_size=16, key=secret)``: a keyed cryptographic hash, for
    repositories shared between tenants.

The all-zero chunk is never hashed or stored; :data:`ZERO_ID` marks a hole in a manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import xxhash

from vmarchive.errors import DamageError
from vmarchive.format import constants as C

ZERO_ID: bytes = C.ZERO_ID
ALGORITHMS: tuple[str, ...] = C.ID_ALGORITHMS

#: ``idfn(data) -> 16-byte chunk id``.
IdFunction = Callable[[bytes | memoryview], bytes]


def _xxh3_keying(secret: bytes) -> tuple[int, bytes]:
    seed = hashlib.blake2b(key=secret, person=C.XXH3_SEED_PERSON, digest_size=8).digest()
    prefix = hashlib.blake2b(
        key=secret, person=C.XXH3_PREFIX_PERSON, digest_size=C.XXH3_PREFIX_SIZE
    ).digest()
    return int.from_bytes(seed, "little"), prefix


def make_id_function(algorithm: str, secret: bytes) -> IdFunction:
    """The chunk-id function of a repository.

    The returned function is thread-safe (it keeps no shared mutable state) and accepts
    bytes or a contiguous memoryview.  Raises ValueError for an unknown algorithm or a
    secret that is not 32 bytes.
    """
    if len(secret) != C.ID_SECRET_SIZE:
        raise ValueError(f"the id secret must be {C.ID_SECRET_SIZE} bytes")
    if algorithm == C.ID_XXH3_128_KEYED:
        seed, prefix = _xxh3_keying(secret)
        base = xxhash.xxh3_128(seed=seed)
        base.update(prefix)

        def xxh3_id(data: bytes | memoryview) -> bytes:
            h = base.copy()
            h.update(data)
            digest: bytes = h.digest()
            return digest

        return xxh3_id
    if algorithm == C.ID_BLAKE2B_128_KEYED:
        key = bytes(secret)

        def blake2b_id(data: bytes | memoryview) -> bytes:
            return hashlib.blake2b(data, digest_size=C.CHUNK_ID_SIZE, key=key).digest()

        return blake2b_id
    raise ValueError(f"unknown chunk id algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


_zeros: dict[int, bytes] = {}


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` is empty or holds only zero bytes.

    Compares against a cached zero buffer of the same length (a memcmp that stops at the
    first non-zero byte), so it costs far less than hashing.
    """
    plain = isinstance(data, bytes | bytearray)
    n = len(data) if plain else memoryview(data).nbytes
    if n == 0:
        return True
    zero = _zeros.get(n)
    if zero is None:
        zero = bytes(n)
        if len(_zeros) < 64:  # chunk sizes are few; bound the cache anyway
            _zeros[n] = zero
    if plain:
        return data == zero
    mv = memoryview(data)
    if mv.format == "B" and mv.ndim == 1 and mv[0] != 0:
        return False  # the common case for data pages: decided without a copy
    return mv.tobytes() == zero


def verify_chunk(idfn: IdFunction, chunk_id: bytes, data: bytes | memoryview) -> None:
    """Recompute the id of ``data``; raise DamageError when it is not ``chunk_id``."""
    got = idfn(data)
    if got != chunk_id:
        raise DamageError(
            f"chunk {chunk_id.hex()} has wrong contents (hashes to {got.hex()})",
            chunk_id=chunk_id.hex(),
        )
