"""Repository key material, AES-256-GCM sealing and the passphrase-wrapped key file.

Layer: format.  Sealed bytes are ``nonce (12) || ciphertext || tag (16)``; the nonce comes
from an injectable ``rng`` so that test vectors are reproducible.  The key file wraps the
64 bytes of :class:`KeyMaterial` with a key derived from the passphrase by scrypt
(``hashlib.scrypt``).  See ``formats/FORMAT.md`` sections "Encryption" and "Key file".
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from vmarchive.errors import DamageError, FormatError, WrongKeyError
from vmarchive.format import constants as C
from vmarchive.format.header import decode_header, make_header

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: A source of random bytes: ``rng(n)`` returns ``n`` bytes.
Rng = Callable[[int], bytes]


@dataclass(frozen=True, repr=False)
class KeyMaterial:
    """The secrets of a repository: the chunk-id secret and the data encryption key."""

    id_secret: bytes
    data_key: bytes

    def __post_init__(self) -> None:
        if len(self.id_secret) != C.ID_SECRET_SIZE or len(self.data_key) != C.KEY_SIZE:
            raise ValueError("KeyMaterial needs a 32-byte id secret and a 32-byte data key")

    def __repr__(self) -> str:  # never print secrets into logs
        return "KeyMaterial(<secret>)"

    @classmethod
    def generate(cls, rng: Rng = os.urandom) -> KeyMaterial:
        """Fresh random key material (id secret first, then data key, from ``rng``)."""
        return cls(rng(C.ID_SECRET_SIZE), rng(C.KEY_SIZE))

    @property
    def raw(self) -> bytes:
        """The 64 bytes a key file wraps: id secret, then data key."""
        return self.id_secret + self.data_key

    @classmethod
    def from_raw(cls, raw: bytes) -> KeyMaterial:
        """The key material of :attr:`raw` bytes (ValueError when they are not 64)."""
        return cls(raw[: C.ID_SECRET_SIZE], raw[C.ID_SECRET_SIZE :])


class ScryptParams(msgspec.Struct, frozen=True):
    """scrypt cost parameters; N = 2**log2_n."""

    log2_n: int = C.DEFAULT_SCRYPT_LOG2_N
    r: int = C.DEFAULT_SCRYPT_R
    p: int = C.DEFAULT_SCRYPT_P

    def check(self) -> None:
        """Raise FormatError when the parameters are outside what a reader accepts."""
        if not (C.MIN_SCRYPT_LOG2_N <= self.log2_n <= C.MAX_SCRYPT_LOG2_N):
            raise FormatError(f"key file: scrypt log2(N)={self.log2_n} out of range")
        if not (1 <= self.r <= C.MAX_SCRYPT_R) or not (1 <= self.p <= C.MAX_SCRYPT_P):
            raise FormatError(f"key file: scrypt r={self.r} p={self.p} out of range")


#: Cheap parameters for tests and vectors only (N = 2**10); never for real repositories.
TEST_SCRYPT = ScryptParams(log2_n=10, r=8, p=1)


def _aead(key: bytes) -> AESGCM:
    # Imported here: only encrypted repositories need it, and it costs every command of
    # every other repository ~17 ms of start-up.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(key) != C.KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes | memoryview, aad: bytes, nonce: bytes) -> bytes:
    """Encrypt and authenticate: returns ``nonce || ciphertext || tag``.

    The caller supplies a fresh random 12-byte nonce (never reuse one under the same key).
    Raises ValueError for a key or nonce of the wrong size.
    """
    if len(nonce) != C.NONCE_SIZE:
        raise ValueError("AES-GCM nonce must be 12 bytes")
    return nonce + _aead(key).encrypt(nonce, bytes(plaintext), aad)


def unseal(key: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes:
    """Check and decrypt ``nonce || ciphertext || tag``.

    Raises DamageError when the tag does not verify (damaged bytes, wrong key, wrong AAD)
    and FormatError when ``sealed`` is shorter than nonce + tag.
    """
    if len(sealed) < C.SEAL_OVERHEAD:
        raise FormatError(f"sealed data truncated ({len(sealed)} bytes)")
    from cryptography.exceptions import InvalidTag

    mv = memoryview(sealed)
    try:
        return _aead(key).decrypt(bytes(mv[: C.NONCE_SIZE]), bytes(mv[C.NONCE_SIZE :]), aad)
    except InvalidTag as e:
        raise DamageError("authentication failed (damaged data or wrong key)") from e


def _derive(passphrase: str, salt: bytes, params: ScryptParams) -> bytes:
    n = 1 << params.log2_n
    maxmem = 128 * params.r * (n + params.p + 2) + (1 << 20)
    return hashlib.scrypt(
        passphrase.encode("utf-8"),
        salt=salt,
        n=n,
        r=params.r,
        p=params.p,
        maxmem=maxmem,
        dklen=C.KEY_SIZE,
    )


def make_keyfile(
    master: KeyMaterial,
    passphrase: str,
    rng: Rng = os.urandom,
    params: ScryptParams | None = None,
) -> bytes:
    """Wrap ``master`` under ``passphrase``: the 144 bytes of a ``keys/<id>`` object.

    ``rng`` supplies the salt (32 bytes) then the nonce (12 bytes).  Raises FormatError when
    ``params`` are outside the bounds a reader accepts.
    """
    params = params or ScryptParams()
    params.check()
    salt = rng(C.SALT_SIZE)
    nonce = rng(C.NONCE_SIZE)
    head = make_header(C.TYPE_KEYFILE, encrypted=False).encode() + struct.pack(
        C.KEYFILE_PARAMS_STRUCT, params.log2_n, params.r, params.p, 0, salt
    )
    kek = _derive(passphrase, salt, params)
    out = head + seal(kek, master.raw, head, nonce)
    assert len(out) == C.KEYFILE_SIZE
    return out


def keyfile_params(data: bytes | memoryview) -> ScryptParams:
    """The scrypt parameters of a key file, without the passphrase.

    Raises FormatError / UnsupportedVersionError like :func:`open_keyfile`.
    """
    decode_header(data, C.TYPE_KEYFILE)
    if len(data) != C.KEYFILE_SIZE:
        raise FormatError(f"key file: {len(data)} bytes, expected {C.KEYFILE_SIZE}")
    log2_n, r, p, reserved, _salt = struct.unpack_from(C.KEYFILE_PARAMS_STRUCT, data, C.HEADER_SIZE)
    if reserved:
        raise FormatError("key file: reserved byte set")
    params = ScryptParams(log2_n, r, p)
    params.check()
    return params


def open_keyfile(data: bytes | memoryview, passphrase: str) -> KeyMaterial:
    """Unwrap a key file.

    Raises FormatError (bad magic, wrong size, parameters out of bounds),
    UnsupportedVersionError (future version, unknown required feature) and WrongKeyError when
    the passphrase does not open it (a damaged key file is indistinguishable from a wrong
    passphrase and raises WrongKeyError too).
    """
    params = keyfile_params(data)
    raw = bytes(data)
    salt = raw[C.KEYFILE_AAD_SIZE - C.SALT_SIZE : C.KEYFILE_AAD_SIZE]
    kek = _derive(passphrase, salt, params)
    try:
        plain = unseal(kek, raw[C.KEYFILE_AAD_SIZE :], raw[: C.KEYFILE_AAD_SIZE])
    except DamageError as e:
        raise WrongKeyError("the passphrase does not open this key file") from e
    return KeyMaterial.from_raw(plain)


def keyfile_id(data: bytes) -> str:
    """The object id of a key file: SHA-256 of its bytes, hex (``keys/<id>``)."""
    return hashlib.sha256(data).hexdigest()
