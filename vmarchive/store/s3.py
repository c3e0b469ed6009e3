"""S3 backend (store layer): objects in one bucket under a key prefix, through boto3.

Works with any S3-compatible store; tested against Ceph's radosgw (``scripts/ceph``).
How the :class:`~vmarchive.store.backend.Backend` guarantees map onto S3:

* A PUT is atomic and durable when it returns: S3 never shows a partial object.
* ``create_only`` is a conditional PUT (``If-None-Match: *``): the store itself refuses
  to replace an existing key (HTTP 412), so two writers racing for one key cannot both
  win and no check-then-put window exists.  Objects above the multipart threshold send
  the same condition with the multipart completion; a store that ignores it there could
  replace the object, which is harmless for the only objects that large: packs, whose
  key is the hash of their bytes (a replacement has the same bytes).
* A create-only PUT whose reply was lost is retried and then answered 412: it reports
  "already existed" although it created the object.  Content-named objects do not care;
  ``init`` may then say the repository was created concurrently (it was, by that call).
* Large objects move in parallel: multipart uploads, and GETs split into ranged requests
  on a thread pool.  Small reads (a blob, a pack trailer) are one ranged GET; a pack read
  a third time is fetched whole into memory, and while it is read that way the pack the
  repository names as next in the stream (:meth:`Backend.set_read_order`) is fetched in
  the background, so a restore overlaps the network with decoding.  Packs this process
  uploaded and said it will read back (:meth:`Backend.will_read_back`) are read from
  nameless local copies (:class:`_WrittenPacks`).
* Transient failures (connection errors, 5xx, throttling) are retried by botocore's
  "standard" mode with exponential backoff and jitter (``max_attempts`` counts every
  request, the first included); once the gateway has answered, a request it does not
  accept at all is tried again for up to ``unreachable_wait`` seconds (a gateway
  restarting, :class:`_GatewayWait`); a body that breaks off while it is read is
  fetched again.  What is left is translated into :class:`BackendError` subclasses
  with one clear line: :class:`S3BucketNotFoundError`, :class:`S3AccessError`.
* Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, config files, instance roles); they are
  never part of a message, a log line or a ``repr``.

Only this module imports boto3/botocore (checked by import-linter).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, cast

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
)
from botocore.loaders import Loader, create_loader

from vmarchive.errors import BackendError, RepositoryError
from vmarchive.store.backend import Backend, ObjectInfo, ObjectNotFoundError, check_key
from vmarchive.store.summarycache import cache_root

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

#: Environment variable naming the S3 endpoint URL (e.g. ``http://rgw.example:7480``).
#: boto3's own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` work as well.
ENDPOINT_ENV = "VMARCHIVE_S3_ENDPOINT"
#: Seconds a request the gateway does not accept is tried again (see :class:`_GatewayWait`).
UNREACHABLE_WAIT_ENV = "VMARCHIVE_S3_UNREACHABLE_WAIT"
DEFAULT_UNREACHABLE_WAIT = 20.0

MiB = 1 << 20
_MIN_PART = 5 * MiB
_T = TypeVar("_T")

# Bucket names as S3 allows them (RGW accepts the same set by default).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class S3AccessError(BackendError):
    """The S3 store refused our credentials or this request (or none were found)."""

    title = "S3 access denied"


class S3BucketNotFoundError(BackendError):
    """The bucket of an ``s3://`` location does not exist."""

    title = "no such bucket"


@dataclass(frozen=True)
class S3Options:
    """Where the store is and how to talk to it; credentials are never held here."""

    #: Endpoint URL; ``None``: ``VMARCHIVE_S3_ENDPOINT``, else boto3's own resolution
    #: (``AWS_ENDPOINT_URL_S3``, profile, or AWS itself).
    endpoint: str | None = None
    region: str | None = None
    #: A profile of ``~/.aws/config``; ``None``: boto3's default (``AWS_PROFILE``).
    profile: str | None = None
    #: ``path`` for most S3-compatible stores; AWS prefers ``virtual``.  ``None``:
    #: path style when an endpoint is given, boto3's choice otherwise.
    addressing_style: str | None = None
    #: Concurrent connections, also the size of the transfer thread pool.
    connections: int = 16
    #: Size of one multipart part and of one ranged GET of a large read.
    part_size: int = 8 * MiB
    #: PUTs above this size are multipart uploads.
    multipart_threshold: int = 64 * MiB
    #: Attempts per request (botocore "standard" retry mode: backoff with jitter);
    #: ``None``: ``AWS_MAX_ATTEMPTS`` when set, else 6.
    max_attempts: int | None = None
    #: Seconds a request the gateway does not accept (connection refused, not
    #: established, name not resolved) is tried again once the gateway has answered: a
    #: gateway restarting (:class:`_GatewayWait`); ``None``:
    #: ``VMARCHIVE_S3_UNREACHABLE_WAIT`` when set, else 20; 0: only botocore's attempts.
    unreachable_wait: float | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    #: Memory for whole packs kept once a pack is read a third time (0: off).
    pack_cache_bytes: int = 64 * MiB
    #: While a pack is read whole, fetch the pack the reader names as next in the
    #: background (:meth:`Backend.read_ahead`); needs the pack cache.
    read_ahead: bool = True
    #: Directory for local copies of index files and manifests (``None``: no cache).
    cache_dir: str | None = None
    #: Local disk for copies of uploaded packs that this process reads back (the hint
    #: :meth:`Backend.will_read_back`; 0: none; see :class:`_WrittenPacks`).
    written_copy_bytes: int = 2048 * MiB

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Options:
        """Options with the endpoint from ``VMARCHIVE_S3_ENDPOINT`` when set and the cache in
        ``VMARCHIVE_CACHE_DIR`` (``off``: none), else ``$XDG_CACHE_HOME/vmarchive``."""
        opts = cls(endpoint=os.environ.get(ENDPOINT_ENV) or None, cache_dir=cache_root())
        return replace(opts, **overrides) if overrides else opts


def parse_location(location: str) -> tuple[str, str]:
    """Split ``s3://BUCKET/PREFIX`` into the bucket and a key prefix ending in ``/``
    (or empty).  Raises :class:`RepositoryError` for a malformed location."""
    if not location.startswith("s3://"):
        raise RepositoryError(f"not an s3:// location: {location}")
    bucket, _, prefix = location[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET_RE.match(bucket):
        raise RepositoryError(f"invalid S3 bucket name {bucket!r} in {location}")
    if prefix:
        try:
            check_key(prefix)
        except ValueError as e:
            raise RepositoryError(f"invalid key prefix {prefix!r} in {location}") from e
        prefix += "/"
    return bucket, prefix


def _attempts(value: int | None) -> int:
    if value is not None:
        return value
    try:
        return max(1, int(os.environ.get("AWS_MAX_ATTEMPTS", "6")))
    except ValueError:
        return 6


#: botocore's errors for a connection it could not establish (refused, timed out, name
#: not resolved, proxy down): the request was not sent.  Not SSLError, which waiting
#: does not mend.
_NOT_ACCEPTED = (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError)


def _unreachable_wait(value: float | None) -> float:
    if value is not None:
        return max(0.0, value)
    try:
        return max(0.0, float(os.environ.get(UNREACHABLE_WAIT_ENV, DEFAULT_UNREACHABLE_WAIT)))
    except ValueError:
        return DEFAULT_UNREACHABLE_WAIT


class _GatewayWait:
    """A botocore ``needs-retry`` handler, asked before the retry mode's own: once the
    gateway has answered this client, a request it does not accept is sent again until
    ``seconds`` have passed since that request's first such failure, 0.25 s apart
    doubling to 4 s (jitter: half to all of it).

    Such a request never reached the gateway (the connection was refused or not
    established, or the name not resolved), so sending it again is safe even for a
    conditional PUT.  botocore's "standard" mode alone backs off from 50 ms on such
    errors (its base for all but throttling, botocore 1.44): six attempts span at most
    1.55 s, less than a gateway takes to restart.  A gateway never reached is not waited
    for: a mistyped endpoint is one line at once.  Anything else, and this error after
    ``seconds``, is left to the retry mode (its attempts count on meanwhile).
    """

    def __init__(
        self,
        seconds: float,
        location: str,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.seconds = seconds
        self.location = location
        self._clock = clock
        self._rand = rand
        #: the gateway answered a request of this client (any status)
        self.reached = False
        self._said = False

    def __call__(
        self,
        attempts: int = 1,
        response: Any = None,
        caught_exception: Exception | None = None,
        request_dict: dict[str, Any] | None = None,
        **_: Any,
    ) -> float | None:
        if response is not None:
            self.reached = True
        if self.seconds <= 0 or not self.reached or not isinstance(caught_exception, _NOT_ACCEPTED):
            return None
        context = request_dict.setdefault("context", {}) if request_dict is not None else {}
        now = self._clock()
        since = float(context.setdefault("vmarchive_unreachable_since", now))
        left = since + self.seconds - now
        if left <= 0:
            return None
        if not self._said:
            self._said = True  # once per client: every request in flight meets it
            log.warning(
                "S3 gateway of %s not reachable (%s); trying again for up to %g s",
                self.location,
                caught_exception,
                self.seconds,
            )
        step = min(0.25 * 2.0 ** max(0, attempts - 1), 4.0)
        return min(left, step * (0.5 + self._rand() / 2))


def _mtime(value: datetime) -> float:
    return value.timestamp()


_LOADER_LOCK = threading.Lock()
_LOADER: Loader | None = None


def _shared_loader() -> Loader:
    """botocore's loader of service models, shared by every client of this process: a new
    session would parse the S3 model again (~0.1 s per repository opened; a fresh session
    still resolves credentials itself, so changed AWS_* variables are honoured)."""
    global _LOADER
    if _LOADER is None:
        _LOADER = create_loader()
    return _LOADER


#: Reads of one pack served by plain ranged GETs before the pack is fetched whole.
_PLAIN_READS = 2


class _PackCache:
    """Whole packs held in memory, so a restore reading one pack's blobs one after another
    costs one parallel fetch of the pack instead of a request per blob.

    The first two reads of a pack are left to plain ranged GETs (a lone chunk read, or a
    trailer read in two steps, must not pull 16 MiB); the third read of the same pack
    fetches it whole, once, however many threads ask at the same moment.  While a pack is
    read that way (sequentially), :meth:`prefetch` fetches the one the reader names as
    next in the background, so the network and the decoding overlap instead of taking
    turns.  Packs are immutable (named by their hash), so a cached pack never holds wrong
    bytes; least recently used packs leave first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._packs: OrderedDict[str, bytes | bytearray] = OrderedDict()
        self._bytes = 0
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._loading: dict[str, Future[bytes | bytearray | None]] = {}

    def read(
        self, key: str, offset: int, length: int, fetch: Callable[[str], bytes | bytearray | None]
    ) -> bytes | None:
        """The bytes, or ``None`` when the caller should do a plain ranged GET."""
        with self._lock:
            data = self._packs.get(key)
            if data is not None:
                self._packs.move_to_end(key)
                return bytes(memoryview(data)[offset : offset + length])
            fut = self._loading.get(key)
            owner = fut is None
            if fut is None:
                touches = self._seen.get(key, 0)
                if touches < _PLAIN_READS:
                    self._seen[key] = touches + 1
                    self._seen.move_to_end(key)
                    while len(self._seen) > 4096:
                        self._seen.popitem(last=False)
                    return None
                fut = Future()
                self._loading[key] = fut
        if owner:
            try:
                data = fetch(key)
            except BaseException as e:
                with self._lock:
                    del self._loading[key]
                fut.set_exception(e)
                raise
            with self._lock:
                del self._loading[key]
                self._keep(key, data)
            fut.set_result(data)
        else:
            data = fut.result()
        return None if data is None else bytes(memoryview(data)[offset : offset + length])

    def _keep(self, key: str, data: bytes | bytearray | None) -> None:
        """Cache ``data`` (with the lock held); the least recently used packs leave."""
        if data is None:
            return
        self._packs[key] = data
        self._bytes += len(data)
        while self._bytes > self.capacity and self._packs:
            self._bytes -= len(self._packs.popitem(last=False)[1])

    def streaming(self, key: str) -> bool:
        """Whether ``key`` is read whole (cached or being fetched): a sequential reader."""
        with self._lock:
            return key in self._packs or key in self._loading

    def prefetch(
        self,
        key: str,
        fetch: Callable[[str], bytes | bytearray | None],
        submit: Callable[[Callable[[], None]], object],
    ) -> bool:
        """Start fetching ``key`` whole in the background unless cached or under way.

        Readers arriving meanwhile wait for it.  A failed prefetch is only logged: its
        waiters fall back to plain ranged GETs, which report the error properly.
        """
        with self._lock:
            if key in self._packs or key in self._loading:
                return False
            fut: Future[bytes | bytearray | None] = Future()
            self._loading[key] = fut
            self._seen.pop(key, None)

        def run() -> None:
            data: bytes | bytearray | None = None
            try:
                data = fetch(key)
            except Exception as e:
                log.debug("read-ahead of %s failed: %s", key, e)
            finally:
                with self._lock:
                    del self._loading[key]
                    self._keep(key, data)
                fut.set_result(data)

        try:
            submit(run)
        except RuntimeError:  # the backend is closing
            with self._lock:
                del self._loading[key]
            fut.set_result(None)
            return False
        return True

    def forget(self, key: str) -> None:
        with self._lock:
            data = self._packs.pop(key, None)
            if data is not None:
                self._bytes -= len(data)


#: How long a copy of an uploaded pack is served: far below gc's grace period (6 hours),
#: within which no gc deletes a pack this young, so a copy never outlives its object.
_WRITTEN_COPY_TTL = 3600.0
#: Free space a copy must leave on its file system (besides 5 % of it).
_WRITTEN_COPY_RESERVE = 256 * MiB


class _WrittenPacks:
    """Local copies of packs this backend uploaded, read instead of the store.

    A capture reads its memory image back as soon as it is stored (the round trip
    regenerates the migration stream from the archive); without copies that is the whole
    image downloaded again right after it was uploaded -- a second transfer of the largest
    part of the capture, and on a shared host the gateway's CPU as well.  Only packs the
    writer says it will read back are kept (its memory streams' packs): a disk's packs
    would fill the budget and push the memory image out.  A copy holds the
    exact bytes the store acknowledged, and every chunk read from it is still checked
    against its id by the repository, as one read from the store would be.

    Each copy is an unlinked temporary file: it has no name, and the kernel frees it when
    the backend closes or the process dies, so no crash leaves one behind.  The oldest
    copies leave first once ``capacity`` bytes are held; a copy is not kept when its file
    system would be left with less than 5 % + 256 MiB free, nor when writing it fails --
    it is only an optimisation.  Copies are served for :data:`_WRITTEN_COPY_TTL` at most.
    """

    def __init__(self, directory: str | None, capacity: int) -> None:
        self.directory = directory
        self.capacity = capacity
        self._lock = threading.Lock()
        # key -> (file, size, time kept)
        self._files: OrderedDict[str, tuple[Any, int, float]] = OrderedDict()
        self._bytes = 0
        self._closed = False

    def keep(self, key: str, body: bytes | memoryview) -> None:
        if len(body) > self.capacity or self._closed:
            return
        f = None
        try:
            if self.directory:
                os.makedirs(self.directory, exist_ok=True)
            st = os.statvfs(self.directory or tempfile.gettempdir())
            free = st.f_bavail * st.f_frsize
            if free - len(body) < _WRITTEN_COPY_RESERVE + st.f_blocks * st.f_frsize // 20:
                return
            # Open for as long as the copy is held: closed by _drop or close.
            f = tempfile.TemporaryFile(dir=self.directory or None, buffering=0)  # noqa: SIM115
            view = memoryview(body)
            while view:
                view = view[f.write(view) :]
        except OSError as e:
            log.debug("no local copy of %s: %s", key, e)
            if f is not None:
                f.close()
            return
        with self._lock:
            if self._closed or key in self._files:
                f.close()
                return
            self._files[key] = (f, len(body), time.monotonic())
            self._bytes += len(body)
            while self._bytes > self.capacity:
                self._drop(next(iter(self._files)))

    def read(self, key: str, offset: int, length: int) -> bytes | None:
        """Bytes of the copy of ``key`` (short at its end, like a ranged GET), or ``None``."""
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return None
            f, size, kept = entry
            if time.monotonic() - kept > _WRITTEN_COPY_TTL:
                self._drop(key)
                return None
            # Under the lock: eviction must not close the file during the read (a copy
            # is in the page cache; the read is a memory copy).
            return os.pread(f.fileno(), max(0, min(length, size - offset)), offset)

    def forget(self, key: str) -> None:
        with self._lock:
            if key in self._files:
                self._drop(key)

    def _drop(self, key: str) -> None:
        f, size, _ = self._files.pop(key)
        self._bytes -= size
        f.close()

    def held(self) -> int:
        """Bytes of copies held."""
        with self._lock:
            return self._bytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._files:
                self._drop(next(iter(self._files)))


_CACHED_PREFIXES = ("index/", "archives/")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class _ObjectCache:
    """Local copies of index files and manifests, so ``list``, ``info`` and the dedup
    index cost a LIST of the bucket and no GET per object.

    Only an optimisation: both kinds are named by the SHA-256 of their bytes, a copy is
    served only when the latest listing showed the same ETag for the key and its bytes
    still hash to the name; anything else (missing, stale, damaged copy) is fetched again.
    A complete listing of a prefix removes the copies of objects no longer there.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._etags: dict[str, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def wants(key: str) -> bool:
        return key.startswith(_CACHED_PREFIXES) and bool(_HEX64.match(key.rsplit("/", 1)[1]))

    @staticmethod
    def _tag(etag: str) -> str:
        return re.sub(r"[^0-9A-Za-z-]", "", etag)

    def _path(self, key: str, etag: str) -> str:
        return os.path.join(self.root, *key.split("/")) + "." + self._tag(etag)

    def saw(self, key: str, etag: str) -> None:
        with self._lock:
            self._etags[key] = etag

    def lookup(self, key: str) -> bytes | None:
        with self._lock:
            etag = self._etags.get(key)
        if etag is None:
            return None
        path = self._path(key, etag)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != key.rsplit("/", 1)[1]:
            log.warning("cached copy of %s is damaged; fetching it again", key)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        return data

    def store(self, key: str, etag: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != key.rsplit("/", 1)[1]:
            return  # never keep bytes that do not match their name
        path = self._path(key, etag)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("cannot cache %s: %s", key, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self.saw(key, etag)

    def drop(self, key: str) -> None:
        directory = os.path.join(self.root, *key.split("/")[:-1])
        name = key.rsplit("/", 1)[1] + "."
        with self._lock:
            self._etags.pop(key, None)
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if entry.name.startswith(name):
                    os.unlink(entry.path)

    def prune(self, listed_prefix: str, present: set[tuple[str, str]]) -> None:
        """After a complete listing of ``listed_prefix``: drop copies of vanished objects."""
        keep = {self._path(k, e) for k, e in present}
        for p in _CACHED_PREFIXES:
            if not p.startswith(listed_prefix):
                continue
            for dirpath, _dirs, files in os.walk(os.path.join(self.root, p)):
                for f in files:
                    path = os.path.join(dirpath, f)
                    if path not in keep:
                        with contextlib.suppress(OSError):
                            os.unlink(path)


class S3Backend(Backend):
    """Objects as ``s3://bucket/prefix/<key>``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        options: S3Options | None = None,
        *,
        client: S3Client | None = None,
    ) -> None:
        self.options = options or S3Options.from_env()
        self.bucket = bucket
        self.prefix = prefix
        self.location = f"s3://{bucket}/{prefix}".rstrip("/")
        if client is None:
            client = self._make_client(self.options)
            wait = _GatewayWait(_unreachable_wait(self.options.unreachable_wait), self.location)
            # (the stubs type event handlers as returning None; needs-retry's return a delay)
            client.meta.events.register_first("needs-retry.s3", cast(Any, wait))
        self._client = client
        self._endpoint = str(client.meta.endpoint_url)
        put_shape = client.meta.service_model.operation_model("PutObject").input_shape
        if put_shape is None or "IfNoneMatch" not in put_shape.members:
            # Without conditional puts two writers could replace each other's objects.
            raise RepositoryError(
                f"boto3 {boto3.__version__} is too old for S3 repositories: "
                "it cannot send If-None-Match (need boto3 >= 1.35.10)"
            )
        self._pool: ThreadPoolExecutor | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        self._following: Callable[[str], str | None] | None = None
        self._pack_sizes: dict[str, int] = {}
        self._pool_lock = threading.Lock()
        self._packs = _PackCache(self.options.pack_cache_bytes)
        self._cache: _ObjectCache | None = None
        if self.options.cache_dir:
            ident = f"{self._endpoint}|{bucket}|{prefix}".encode()
            self._cache = _ObjectCache(
                os.path.join(self.options.cache_dir, "s3", hashlib.sha256(ident).hexdigest()[:24])
            )
        self._written = _WrittenPacks(
            os.path.join(self.options.cache_dir, "s3") if self.options.cache_dir else None,
            self.options.written_copy_bytes,
        )

    @classmethod
    def from_location(cls, location: str, options: S3Options | None = None) -> S3Backend:
        """Raises :class:`RepositoryError` for a malformed location, :class:`S3AccessError`
        when boto3 cannot be configured (e.g. an unknown profile)."""
        bucket, prefix = parse_location(location)
        return cls(bucket, prefix, options)

    @staticmethod
    def _make_client(opts: S3Options) -> S3Client:
        style = opts.addressing_style or ("path" if opts.endpoint else "auto")
        config = Config(
            signature_version="s3v4",
            # total_max_attempts counts the first try; botocore's max_attempts would
            # count only the retries (AWS_MAX_ATTEMPTS=1 meant two requests).
            retries={"total_max_attempts": _attempts(opts.max_attempts), "mode": "standard"},
            max_pool_connections=opts.connections + 4,
            connect_timeout=opts.connect_timeout,
            read_timeout=opts.read_timeout,
            # Blobs are checked by their chunk ids and packs by their names; hashing
            # every payload again for the signature (the default over plain http) or
            # adding CRC trailers costs CPU and older gateways reject the trailers.
            s3=cast(Any, {"addressing_style": style, "payload_signing_enabled": False}),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            with _LOADER_LOCK:  # sessions are not thread-safe; clients are
                bc = botocore.session.get_session()
                bc.register_component("data_loader", _shared_loader())
                session = boto3.session.Session(botocore_session=bc, profile_name=opts.profile)
                return session.client(
                    "s3", endpoint_url=opts.endpoint, region_name=opts.region, config=config
                )
        except BotoCoreError as e:
            raise S3AccessError(f"cannot configure the S3 client: {e}") from e

    def __repr__(self) -> str:
        return f"S3Backend({self.location!r}, endpoint={self._endpoint!r})"

    # -- plumbing ------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @property
    def pool(self) -> ThreadPoolExecutor:
        """Threads for the parts of large transfers (created on first need)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.options.connections, thread_name_prefix="vmarchive-s3"
                )
            return self._pool

    def _get_broke_off(self, attempt: int, last: int, e: Exception, key: str) -> None:
        """A GET that broke off mid-body: raise when it was the ``last`` attempt or the
        credentials are missing, else wait before the next attempt (0.1 s, doubling).
        A GET the gateway did not accept raises at once: botocore's attempts and the
        gateway wait (:class:`_GatewayWait`) were spent on it already."""
        if attempt == last or isinstance(
            e, (NoCredentialsError, PartialCredentialsError, *_NOT_ACCEPTED)
        ):
            raise self._error(e, "get", key) from e
        log.debug("GET of %s broke off (%s); again", key, e)
        time.sleep(0.1 * 2**attempt)

    def _error(self, e: Exception, op: str, key: str | None) -> BackendError:
        """One clear line for a failed request; never mentions credentials."""
        what = f"{key!r} in {self.location}" if key is not None else self.location
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return S3BucketNotFoundError(
                    f"S3 bucket {self.bucket!r} does not exist at {self._endpoint}",
                    bucket=self.bucket,
                )
            if code in ("NoSuchKey", "404", "NotFound") and key is not None:
                return ObjectNotFoundError(key)
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "403",
                "Forbidden",
            ):
                return S3AccessError(
                    f"S3 refused {op} of {what} at {self._endpoint}: {code} "
                    "(wrong access key or secret, or no permission)",
                    bucket=self.bucket,
                )
            return BackendError(f"S3 {op} of {what} failed: {code} (HTTP {status})", key=key)
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return S3AccessError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        return BackendError(f"S3 {op} of {what} failed: {e}", key=key)

    def _call(self, op: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, op, key) from e

    @staticmethod
    def _code(e: ClientError) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    @staticmethod
    def _status(e: ClientError) -> int:
        return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))

    # -- writing -------------------------------------------------------------------------
    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> bool:
        full = self._key(key)
        self._pack_sizes.pop(key, None)
        body = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
        if len(body) > self.options.multipart_threshold:
            return self._put_multipart(key, full, body, create_only)
        extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
        for attempt in range(8):
            try:
                r = self._client.put_object(Bucket=self.bucket, Key=full, Body=body, **extra)
                if self._cache is not None and self._cache.wants(key):
                    self._cache.store(key, str(r.get("ETag", "")), body)
                return True
            except ClientError as e:
                if create_only and self._status(e) == 412:
                    return False
                if create_only and self._status(e) == 409 and attempt < 7:
                    # A concurrent conditional write to the same key is in progress
                    # (AWS says retry): the next attempt sees it done -> 412, or succeeds.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                raise self._error(e, "put", key) from e
            except BotoCoreError as e:
                raise self._error(e, "put", key) from e
        raise BackendError(f"S3 put of {key!r} in {self.location}: conflict persisted", key=key)

    def _put_multipart(self, key: str, full: str, body: bytes, create_only: bool) -> bool:
        if create_only and self.exists(key):
            return False
        upload = self._call(
            "put",
            key,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full),
        )
        upload_id = upload["UploadId"]
        # S3 wants parts of at least 5 MiB (all but the last) and at most 10 000 of them.
        size = max(self.options.part_size, _MIN_PART, -(-len(body) // 10_000))
        view = memoryview(body)

        def part(n: int) -> dict[str, Any]:
            chunk = view[n * size : (n + 1) * size].tobytes()
            r = self._call(
                "put",
                key,
                lambda: self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=n + 1,
                    Body=chunk,
                ),
            )
            return {"ETag": r["ETag"], "PartNumber": n + 1}

        try:
            parts = list(self.pool.map(part, range(-(-len(body) // size))))
            extra: dict[str, Any] = {"IfNoneMatch": "*"} if create_only else {}
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                    **extra,
                )
            except ClientError as e:
                if create_only and self._status(e) == 412:
                    self._abort(full, upload_id)
                    return False
                raise self._error(e, "put", key) from e
            except BotoCoreError as e:
                raise self._error(e, "put", key) from e
        except BaseException:
            self._abort(full, upload_id)
            raise
        return True

    def _abort(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, BotoCoreError) as e:
            # The parts stay invisible; clean_temporaries (gc) aborts them later.
            log.warning("cannot abort multipart upload of %s: %s", full, e)

    def will_read_back(self, key: str, data: bytes | memoryview) -> None:
        """Keep a local copy of pack ``key`` (only packs: they are what is read back)."""
        if key.startswith("data/") and self.options.written_copy_bytes:
            self._written.keep(key, data)

    def delete(self, key: str) -> None:
        full = self._key(key)
        self._packs.forget(key)
        self._written.forget(key)
        self._pack_sizes.pop(key, None)
        if self._cache is not None:
            self._cache.drop(key)
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def clean_temporaries(self, older_than: float) -> int:
        """Abort multipart uploads under our prefix started more than ``older_than``
        seconds ago (crashed writers leave them; they are never objects)."""
        now = time.time()
        removed = 0
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for up in page.get("Uploads", []):
                    if now - _mtime(up["Initiated"]) >= older_than:
                        self._abort(up["Key"], up["UploadId"])
                        removed += 1
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "clean temporaries", None) from e
        return removed

    # -- reading -------------------------------------------------------------------------
    def _get(self, key: str, first: int | None, last: int | None) -> tuple[bytes, int | None]:
        """One GET (ranged when ``first`` is given); returns the bytes and the object's
        total size when the reply says it.  An unsatisfiable range (past the end of an
        existing object) gives ``b""``.  A body that breaks off is fetched again."""
        full = self._key(key)
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
        if first is not None:
            kwargs["Range"] = f"bytes={first}-{'' if last is None else last}"
        for attempt in range(4):
            try:
                resp = self._client.get_object(**kwargs)
                data = resp["Body"].read()
            except ClientError as e:
                if self._code(e) == "InvalidRange" or self._status(e) == 416:
                    return b"", None
                raise self._error(e, "get", key) from e
            except (BotoCoreError, OSError) as e:
                self._get_broke_off(attempt, 3, e, key)
                continue
            total: int | None = None
            m = _CONTENT_RANGE_RE.match(str(resp.get("ContentRange", "")))
            if m and m.group(3) != "*":
                total = int(m.group(3))
            elif first is None:
                total = len(data)
            return data, total
        raise AssertionError("unreachable")

    def _get_parallel(self, key: str, start: int, end: int) -> list[bytes]:
        """Bytes ``[start, end)`` (all within the object) as parallel ranged GETs."""
        size = self.options.part_size
        ranges = [(a, min(a + size, end) - 1) for a in range(start, end, size)]
        return list(self.pool.map(lambda r: self._get(key, r[0], r[1])[0], ranges))

    def get(self, key: str) -> bytes:
        check_key(key)
        if self._cache is not None and self._cache.wants(key):
            data = self._cache.lookup(key)
            if data is not None:
                return data
            full = self._key(key)
            resp = self._call(
                "get", key, lambda: self._client.get_object(Bucket=self.bucket, Key=full)
            )
            data = self._call("get", key, lambda: resp["Body"].read())
            self._cache.store(key, str(resp.get("ETag", "")), data)
            return data
        return self._get_range(key, 0, 1 << 62)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        check_key(key)
        if length == 0:
            self.stat(key)  # a missing object is still an error
            return b""
        if key.startswith("data/"):
            copy = self._written.read(key, offset, length)
            if copy is not None:
                return copy
        if self.options.pack_cache_bytes and key.startswith("data/"):
            self._read_ahead(key)
            cached = self._packs.read(key, offset, length, self._fetch_pack)
            if cached is not None:
                return cached
        return self._get_range(key, offset, length)

    def set_read_order(self, following: Callable[[str], str | None]) -> None:
        self._following = following

    def _read_ahead(self, key: str) -> None:
        """While pack ``key`` is read whole (a sequential reader: restore), fetch the pack
        the read order names next in the background."""
        following = self._following
        if following is None or not self.options.read_ahead or not self._packs.streaming(key):
            return
        nxt = following(key)
        if nxt is None or not nxt.startswith("data/"):
            return
        check_key(nxt)
        self._packs.prefetch(nxt, self._fetch_pack, self._submit_prefetch)

    def _submit_prefetch(self, fn: Callable[[], None]) -> None:
        # Its own thread: a prefetch waits on parts running in self.pool, so it must
        # never occupy a thread of that pool.
        with self._pool_lock:
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="vmarchive-s3-ahead")
            self._prefetcher.submit(fn)

    def _fetch_pack(self, key: str) -> bytearray | None:
        """A whole pack for the cache (``None`` if it is too large to be worth it).

        The size is known from a HEAD, so all parts are requested at once and each is
        received straight into its place in one buffer: no part waits for the first, and
        no 16 MiB join copies the pack again (measured: the join was as costly as zstd).
        """
        size = self._pack_sizes.get(key)
        if size is None:
            size = self.stat(key).size
        if size > self.options.pack_cache_bytes // 2:
            return None
        buf = bytearray(size)
        view = memoryview(buf)
        parts = max(1, -(-size // self.options.part_size))
        step = -(-size // parts)
        ranges = [(a, min(a + step, size)) for a in range(0, size, step)]
        if len(ranges) <= 1:
            for a, b in ranges:
                self._get_into(key, a, view[a:b])
        else:
            list(self.pool.map(lambda r: self._get_into(key, r[0], view[r[0] : r[1]]), ranges))
        return buf

    def _get_into(self, key: str, first: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``first`` (one ranged GET, read in place; a body
        that breaks off is fetched again).  A short object is a :class:`BackendError`."""
        full = self._key(key)
        rng = f"bytes={first}-{first + len(out) - 1}"
        for attempt in range(4):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=full, Range=rng)
                body = resp["Body"]
                got = 0
                while got < len(out):
                    n = body.readinto(cast(Any, out[got:]))  # stubs say IO[bytes]
                    if not n:
                        break
                    got += n
                body.close()
            except ClientError as e:
                raise self._error(e, "get", key) from e
            except (BotoCoreError, OSError) as e:
                self._get_broke_off(attempt, 3, e, key)
                continue
            if got != len(out):
                raise BackendError(
                    f"S3 get of {key!r} in {self.location}: {got} of {len(out)} bytes", key=key
                )
            return
        raise AssertionError("unreachable")

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        size = self.options.part_size
        first_len = min(length, size)
        data, total = self._get(key, offset, offset + first_len - 1)
        if len(data) < first_len or total is None:
            return data
        end = min(offset + length, total)
        if offset + len(data) >= end:
            return data
        rest = self._get_parallel(key, offset + len(data), end)
        return b"".join([data, *rest])

    def stat(self, key: str) -> ObjectInfo:
        full = self._key(key)
        r = self._call("stat", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full))
        info = ObjectInfo(key, int(r["ContentLength"]), _mtime(r["LastModified"]))
        self._saw_size(info)
        return info

    def _saw_size(self, info: ObjectInfo) -> None:
        """Remember a pack's size (packs never change), so fetching it whole needs no HEAD
        after a stat or a listing has shown it (restore's presence check stats every pack)."""
        if info.key.startswith("data/"):
            if len(self._pack_sizes) >= 1 << 17:
                self._pack_sizes.clear()
            self._pack_sizes[info.key] = info.size

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        strip = len(self.prefix)
        cache = self._cache
        present: set[tuple[str, str]] = set()
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][strip:]
                    if any(part.startswith(".") for part in key.split("/")):
                        continue  # not ours: our keys never have dot segments
                    if cache is not None and cache.wants(key):
                        etag = str(obj.get("ETag", ""))
                        cache.saw(key, etag)
                        present.add((key, etag))
                    info = ObjectInfo(key, int(obj["Size"]), _mtime(obj["LastModified"]))
                    self._saw_size(info)
                    yield info
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "list", prefix or None) from e
        if cache is not None:
            cache.prune(prefix, present)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
            ahead, self._prefetcher = self._prefetcher, None
        if ahead is not None:
            ahead.shutdown(wait=True)  # running prefetches need the pool
        if pool is not None:
            pool.shutdown(wait=True)
        self._written.close()
        self._client.close()


def open_s3(location: str, options: S3Options | None = None) -> Backend:
    """The backend for an ``s3://BUCKET/PREFIX`` location (see :class:`S3Options`).

    Raises :class:`RepositoryError` for a malformed location.
    """
    return S3Backend.from_location(location, options)
