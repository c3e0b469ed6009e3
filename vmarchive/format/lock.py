"""Lock objects (``locks/<lock id>``): who holds which lock, until when.

Layer: format.  A lock is canonical JSON (no binary header: locks are tiny, short-lived
and meant to be read by a human who wonders who is holding a repository)::

    {"created": 1764100000.5, "expires": 1764100300.5, "format": "vmarchive-lock",
     "host": "hv1", "id": "<hex>", "kind": "shared", "pid": 4242, "version": 1}

Times are seconds since the Unix epoch (UTC) as JSON numbers.  Locks are never encrypted.
The rules (shared vs exclusive, lease refresh, staleness) are in FORMAT.md "Locking";
:func:`is_stale` is the staleness rule.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from vmarchive.errors import FormatError, UnsupportedVersionError
from vmarchive.format import constants as C
from vmarchive.format.config import canonical_json, parse_json


class LockInfo(msgspec.Struct, frozen=True):
    """One lock object.  ``id`` is also the object key under ``locks/``."""

    kind: str
    host: str
    pid: int
    created: float
    expires: float
    id: str


def encode_lock(lock: LockInfo) -> bytes:
    """The bytes of a lock object.  Raises ValueError for an unknown kind or bad id."""
    if lock.kind not in C.LOCK_KINDS:
        raise ValueError(f"unknown lock kind {lock.kind!r}")
    _check_id(lock.id, ValueError)
    return canonical_json(
        {
            "created": float(lock.created),
            "expires": float(lock.expires),
            "format": C.LOCK_FORMAT,
            "host": lock.host,
            "id": lock.id,
            "kind": lock.kind,
            "pid": lock.pid,
            "version": C.WRITE_VERSION,
        }
    )


def _check_id(lock_id: object, exc: type[Exception]) -> None:
    if not isinstance(lock_id, str) or not (1 <= len(lock_id) <= 64):
        raise exc("lock id must be 1-64 lowercase hex digits")
    if any(c not in "0123456789abcdef" for c in lock_id):
        raise exc("lock id must be 1-64 lowercase hex digits")


def decode_lock(data: bytes | memoryview) -> LockInfo:
    """Parse a lock object.

    Raises FormatError (not JSON, not a lock, fields missing or of the wrong type) and
    UnsupportedVersionError (a lock version this release does not read).
    """
    if len(data) > C.MAX_LOCK_SIZE:
        raise FormatError("lock: too large")
    doc = parse_json(bytes(data), "lock")
    if not isinstance(doc, dict) or doc.get("format") != C.LOCK_FORMAT:
        raise FormatError("lock: not a vmarchive lock")
    version = doc.get("version")
    if version not in C.READ_VERSIONS:
        raise UnsupportedVersionError(f"lock: version {version!r}", version=version)
    kind, host, pid = doc.get("kind"), doc.get("host"), doc.get("pid")
    created, expires = doc.get("created"), doc.get("expires")
    if kind not in C.LOCK_KINDS or not isinstance(host, str):
        raise FormatError("lock: bad kind or host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid < 0:
        raise FormatError("lock: bad pid")
    for t in (created, expires):
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise FormatError("lock: bad time")
    _check_id(doc.get("id"), FormatError)
    assert isinstance(created, int | float) and isinstance(expires, int | float)
    return LockInfo(str(kind), host, pid, float(created), float(expires), str(doc["id"]))


def is_stale(lock: LockInfo, now: float, this_host: str, pid_alive: Callable[[int], bool]) -> bool:
    """True when a lock no longer protects anything and may be removed.

    Stale when its lease has expired (``now > expires``), or when it was taken on this
    host by a process that no longer exists.  A lock from another host is trusted until
    its lease expires (we cannot see its processes).
    """
    if now > lock.expires:
        return True
    return lock.host == this_host and not pid_alive(lock.pid)
