"""Storage backend interface (store layer, lowest level): whole objects under string keys.

The interface is shaped for object stores (S3 / Ceph RGW), not for file systems: an
object is written whole and becomes visible atomically, nothing is appended or renamed
in place, and a "create only" put lets content-named objects never replace another
object.  The repository above relies on exactly these guarantees:

* ``put(key, data)`` publishes the whole object atomically and durably before it
  returns; a reader never sees a partial object.
* ``put(key, data, create_only=True)`` does not replace an existing object and says
  whether it created one.
* ``get_range`` returns the bytes of ``[offset, offset + length)`` clipped to the object.
* ``list(prefix)`` yields every published object whose key starts with ``prefix``
  (with its size and modification time, which gc uses for its grace period).
* ``delete`` of a missing object is not an error (object stores behave so).

Every backend must pass ``tests/store/backend_contract.py``.  Failures surface as
:class:`vmarchive.errors.BackendError` (or :class:`ObjectNotFoundError` for a missing
object); foreign exceptions never leak out of a backend.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator

import msgspec

from vmarchive.errors import BackendError, RepositoryError


class ObjectNotFoundError(BackendError):
    """The object does not exist in the backend."""

    title = "object not found"

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} does not exist", key=key)
        self.key = key


class ObjectInfo(msgspec.Struct, frozen=True):
    """What a listing says about one object."""

    key: str
    size: int
    #: Last modification, seconds since the epoch (backend clock).
    mtime: float


# Keys are "/"-separated segments of a safe alphabet; a segment never starts with a dot
# so that backends can keep temporaries (".tmp-...") out of listings.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]*"
_KEY_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key; raise :class:`ValueError` otherwise."""
    if not _KEY_RE.match(key) or len(key) > 512:
        raise ValueError(f"invalid object key {key!r}")
    return key


class Backend(ABC):
    """A flat namespace of immutable-once-published objects."""

    #: Human-readable location (a path or URL), for messages.
    location: str

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> bool:
        """Publish ``data`` under ``key`` atomically and durably.

        With ``create_only`` an existing object is left untouched and ``False`` is
        returned; otherwise the object is created or replaced and ``True`` returned.
        Raises :class:`BackendError`.
        """

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the whole object. Raises :class:`ObjectNotFoundError`, :class:`BackendError`."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` (fewer at the end of the object).

        Raises :class:`ObjectNotFoundError`, :class:`BackendError`, :class:`ValueError`
        for a negative offset or length.
        """

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of one object. Raises :class:`ObjectNotFoundError`."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield every object whose key starts with ``prefix`` (any order).

        Raises :class:`BackendError`.
        """

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; a missing object is not an error. Raises :class:`BackendError`."""

    def exists(self, key: str) -> bool:
        """Whether the object exists. Raises :class:`BackendError`."""
        try:
            self.stat(key)
        except ObjectNotFoundError:
            return False
        return True

    def set_read_order(self, following: Callable[[str], str | None]) -> None:  # noqa: B027
        """Hint for read-ahead: ``following(key)`` names the object a reader of ``key``
        will probably read next (or ``None``); it must be cheap and never raise.

        A backend with slow round trips may fetch that object in the background while
        ``key`` is read sequentially; the default ignores the hint.
        """

    def will_read_back(self, key: str, data: bytes | memoryview) -> None:  # noqa: B027
        """Hint after a put of ``data`` under ``key``: this process reads it back soon (a
        capture checks its memory image as soon as it is stored).  A remote backend may
        keep the bytes to serve those reads locally; the default ignores the hint."""

    def done_reading_back(self, keys: Iterable[str]) -> None:  # noqa: B027
        """Hint: the objects under ``keys``, put with :meth:`put_for_read_back`, were read
        back and will not be again soon.  A backend that treats them apart (S3 keeps a
        copy, the local one reads them around the page cache) may stop; the default
        ignores the hint.  Never raises."""

    def put_for_read_back(
        self, key: str, data: bytes | memoryview, *, create_only: bool = False
    ) -> bool:
        """:meth:`put` of an object this process reads back soon (see
        :meth:`will_read_back`, which the default passes the hint to after the put).  A
        backend may read such objects back its own way until :meth:`done_reading_back`.
        """
        done = self.put(key, data, create_only=create_only)
        self.will_read_back(key, data)
        return done

    def clean_temporaries(self, older_than: float) -> int:
        """Remove what crashed puts left behind, older than ``older_than`` seconds.

        Object stores publish atomically and leave nothing; the local backend overrides
        this.  Returns how many were removed.  Raises :class:`BackendError`.
        """
        return 0

    def close(self) -> None:  # noqa: B027  (optional hook, most backends hold nothing)
        """Release resources (connections); the backend is unusable afterwards."""


def open_backend(location: str) -> Backend:
    """Return the backend for ``location``: a local directory path or ``s3://BUCKET/PREFIX``.

    Raises :class:`RepositoryError` for an unsupported URL scheme.
    """
    from vmarchive.store.local import LocalBackend

    if "://" in location:
        scheme = location.split("://", 1)[0]
        if scheme == "file":
            return LocalBackend(location.split("://", 1)[1])
        if scheme == "s3":
            from vmarchive.store.s3 import open_s3

            return open_s3(location)
        raise RepositoryError(f"unsupported repository location scheme {scheme!r}: {location}")
    return LocalBackend(location)
