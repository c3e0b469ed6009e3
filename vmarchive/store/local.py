"""Local-directory backend (store layer): one file per object, published atomically.

A put writes a temporary file next to the target (``.tmp-*``, invisible to listings),
fsyncs it, then publishes it with ``rename`` (replace) or ``link`` (create only: fails if
the name exists, so a content-named object is never replaced), and fsyncs the directory
so the new name survives a power loss.  A crash leaves at most a temporary file, which
is never listed and which :meth:`LocalBackend.clean_temporaries` removes.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator

from vmarchive.errors import BackendError
from vmarchive.format.pack import new_mapping
from vmarchive.store.backend import Backend, ObjectInfo, ObjectNotFoundError, check_key

_TMP_PREFIX = ".tmp-"


#: Objects at least this large (packs) are written with O_DIRECT where the file system
#: allows it: on the VMs we run on, buffered writes of fresh pages cost several times
#: more CPU than the copy into one reused aligned buffer, and packs are rarely re-read soon
#: (those that are, :meth:`LocalBackend.put_for_read_back`, are read back with O_DIRECT
#: too).
_DIRECT_MIN = 1 << 20
_ALIGN = 4096
_tls = threading.local()


def _aligned_buffer(n: int) -> mmap.mmap:
    """A page-aligned scratch buffer of at least ``n`` bytes, reused per thread."""
    buf: mmap.mmap | None = getattr(_tls, "buf", None)
    if buf is None or len(buf) < n:
        if buf is not None:
            buf.close()
        buf = new_mapping(-(-n // (1 << 20)) * (1 << 20))  # private: see new_mapping
        _tls.buf = buf
    return buf


def _write_direct(tmp: str, data: bytes | memoryview) -> bool:
    """Write ``data`` to the new file ``tmp`` with O_DIRECT and fsync it.

    Returns False, leaving no file, when the file system refuses O_DIRECT.
    Raises :class:`OSError` for real I/O errors.
    """
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flag, 0o644)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    src = memoryview(data).cast("B")
    n = src.nbytes
    view: memoryview | None = None
    try:
        # A pack built in a mapping (page-aligned, see PackBuilder) is written from there;
        # only its last partial block goes through the scratch buffer.
        head = _write_in_place(fd, src) if isinstance(src.obj, mmap.mmap) else 0
        rest = n - head
        padded = -(-rest // _ALIGN) * _ALIGN
        view = memoryview(_aligned_buffer(padded))
        view[:rest] = src[head:]
        done = 0
        while done < padded:
            done += os.write(fd, view[done:padded])
        os.ftruncate(fd, n)  # drop the alignment padding
        os.fsync(fd)
        return True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        os.unlink(tmp)
        return False
    finally:
        if view is not None:
            view.release()
        os.close(fd)


def _write_in_place(fd: int, src: memoryview) -> int:
    """Write the whole aligned blocks at the start of ``src`` to the O_DIRECT file ``fd``
    straight from its buffer; returns how many bytes were written: 0 when the buffer is
    not aligned as the device needs (the kernel refuses the first write, EINVAL)."""
    head = src.nbytes - src.nbytes % _ALIGN
    done = 0
    try:
        while done < head:
            done += os.write(fd, src[done:head])
    except OSError as e:
        if e.errno != errno.EINVAL or done:
            raise
    return done


def _read_direct(path: str, offset: int, length: int) -> bytes | None:
    """``length`` bytes at ``offset`` of the file ``path`` (fewer at its end), read with
    O_DIRECT: the aligned blocks around the range into this thread's aligned buffer, the
    range copied out.  None when the file system refuses O_DIRECT.  Raises
    :class:`OSError` for real I/O errors (``FileNotFoundError`` included)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    try:
        start = offset - offset % _ALIGN
        end = -(-(offset + length) // _ALIGN) * _ALIGN
        buf = _aligned_buffer(end - start)
        with memoryview(buf) as view:
            got = 0  # bytes read from ``start``
            while start + got < end:
                n = os.preadv(fd, [view[got : end - start]], start + got)
                if n <= 0:
                    break  # the end of the file
                got += n
                if n % _ALIGN:
                    break  # a short block: the end of the file
            skip = offset - start
            return bytes(view[skip : max(skip, min(got, skip + length))])
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    finally:
        os.close(fd)


def _read_buffered(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the file ``path`` (fewer at its end), through the
    page cache.  Raises :class:`OSError` (``FileNotFoundError`` included)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts: list[bytes] = []
        while length > 0:
            b = os.pread(fd, length, offset)
            if not b:
                break
            parts.append(b)
            offset += len(b)
            length -= len(b)
        return b"".join(parts)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(Backend):
    """Objects as files below ``root``; ``a/b/c`` is ``root/a/b/c``."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.location = self.root
        #: keys put for read-back and not yet said done with: read around the cache
        self._reading_back: set[str] = set()
        self._reading_back_lock = threading.Lock()

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def _makedirs(self, path: str) -> None:
        # Create missing parents one by one and fsync each parent, so a directory
        # created for a new object is itself durable.
        missing: list[str] = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            _fsync_dir(os.path.dirname(d))

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> bool:
        return self._put(key, data, create_only=create_only, direct=len(data) >= _DIRECT_MIN)

    def put_for_read_back(
        self, key: str, data: bytes | memoryview, *, create_only: bool = False
    ) -> bool:
        """Written like :meth:`put` (large objects with O_DIRECT), and read back with
        O_DIRECT by :meth:`get_range` until :meth:`done_reading_back`: a first capture's
        round trip reads its ~330 MiB of memory packs at once.  Through the page cache, the
        writes cost 0.1-0.9 CPU-s here (fresh pages: on this VM a page the host took back
        costs several microseconds to touch again) and the packs pushed out what the host
        had cached; read around it, each range comes from the device (~1.5 GB/s) while the
        round trip regenerates the one before."""
        with self._reading_back_lock:
            self._reading_back.add(key)
        return self._put(key, data, create_only=create_only, direct=len(data) >= _DIRECT_MIN)

    def done_reading_back(self, keys: Iterable[str]) -> None:
        """Reads of these objects go through the page cache again."""
        with self._reading_back_lock:
            self._reading_back.difference_update(keys)

    def _put(self, key: str, data: bytes | memoryview, *, create_only: bool, direct: bool) -> bool:
        path = self._path(key)
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f"{_TMP_PREFIX}{secrets.token_hex(8)}")
        try:
            self._makedirs(directory)
            if not direct or not _write_direct(tmp, data):
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if create_only:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
            else:
                os.replace(tmp, path)
            _fsync_dir(directory)
            return True
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise BackendError(f"cannot write {key!r} in {self.root}: {e.strerror}", key=key) from e

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise ObjectNotFoundError(key) from e
        except OSError as e:
            raise BackendError(f"cannot read {key!r} in {self.root}: {e.strerror}", key=key) from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        path = self._path(key)
        try:
            if length and key in self._reading_back:
                got = _read_direct(path, offset, length)
                if got is not None:
                    return got
            return _read_buffered(path, offset, length)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(key) from e
        except OSError as e:
            raise BackendError(f"cannot read {key!r} in {self.root}: {e.strerror}", key=key) from e

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError as e:
            raise ObjectNotFoundError(key) from e
        except OSError as e:
            raise BackendError(f"cannot stat {key!r} in {self.root}: {e.strerror}", key=key) from e
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the deepest directory the prefix fully names.
        head, _, _ = prefix.rpartition("/")
        start = os.path.join(self.root, *head.split("/")) if head else self.root
        if head:
            check_key(head)
        try:
            yield from self._walk(start, head, prefix)
        except OSError as e:
            raise BackendError(f"cannot list {prefix!r} in {self.root}: {e.strerror}") from e

    def _walk(self, directory: str, key_dir: str, prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return
        except NotADirectoryError:
            return
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            key = f"{key_dir}/{entry.name}" if key_dir else entry.name
            if entry.is_dir(follow_symlinks=False):
                if key.startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._walk(entry.path, key, prefix)
            elif key.startswith(prefix):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted while we listed
                yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise BackendError(
                f"cannot delete {key!r} in {self.root}: {e.strerror}", key=key
            ) from e
        try:
            _fsync_dir(os.path.dirname(path))
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise BackendError(f"cannot sync after deleting {key!r}: {e.strerror}") from e

    def clean_temporaries(self, older_than: float = 3600.0) -> int:
        """Remove temporaries left by crashed writers, older than ``older_than`` seconds.

        Returns how many were removed.  Raises :class:`BackendError`.
        """
        removed = 0
        now = time.time()
        try:
            for dirpath, _dirnames, filenames in os.walk(self.root):
                for name in filenames:
                    if not name.startswith(_TMP_PREFIX):
                        continue
                    p = os.path.join(dirpath, name)
                    try:
                        if now - os.stat(p).st_mtime >= older_than:
                            os.unlink(p)
                            removed += 1
                    except FileNotFoundError:
                        continue
        except OSError as e:
            raise BackendError(f"cannot clean temporaries in {self.root}: {e.strerror}") from e
        return removed
