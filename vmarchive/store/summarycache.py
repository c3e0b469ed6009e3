"""Local cache of archive summaries, so ``list``, ``prune`` and every capture's search for
its parent do not load every manifest of the repository (store layer).

Without it each of those decodes every manifest, slot tables included (~13 MB for a
200 GB disk): O(archives x disk size) before a capture may start.  An archive's id is the
hash of its manifest's bytes, so the summary of an id, once made, is right for ever; an
entry is dropped when its archive is no longer listed.  Only an optimisation: a missing,
unreadable or damaged entry is made again from the manifest, and a summary only chooses
which archive to load (a loaded manifest is checked against its id as always).

For an encrypted repository, whose manifests keep the archives' metadata (domain names,
tags, times) encrypted, each entry is sealed (AES-256-GCM, a random nonce, the archive id
as additional data) with a key derived from the repository's data key; an entry that does
not open is made again.

Where: ``VMARCHIVE_CACHE_DIR`` (``off``: no cache), else ``$XDG_CACHE_HOME/vmarchive``
(``~/.cache/vmarchive``), under ``summaries/<hash of the repository config>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from typing import Any

import msgspec

from vmarchive.errors import DamageError, FormatError
from vmarchive.format import crypto
from vmarchive.format.constants import NONCE_SIZE

log = logging.getLogger(__name__)

CACHE_ENV = "VMARCHIVE_CACHE_DIR"
#: Bumped when the summary's fields change: older entries are then made again.
VERSION = 1
_ARCHIVE_ID = re.compile(r"^[0-9a-f]{64}$")


def cache_root() -> str | None:
    """``VMARCHIVE_CACHE_DIR`` (``off`` or empty: no cache), else the XDG cache dir."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env in ("", "off") else env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "vmarchive")


def repository_cache(
    encoded_config: bytes, encrypted: bool, seal_key: bytes | None
) -> tuple[str, str, bytes | None] | None:
    """The cache directory, this repository's name in it (a hash of its config) and the
    key its cache files are sealed with (``seal_key`` for an encrypted repository, None
    for a plain one); or None: caching is off, or the repository is encrypted and there is
    no key to seal with."""
    root = cache_root()
    if root is None or (encrypted and seal_key is None):
        return None
    return root, hashlib.sha256(encoded_config).hexdigest()[:24], seal_key if encrypted else None


def derived_key(seal_key: bytes, purpose: bytes) -> bytes:
    """A key for one use (``purpose``) of a repository's local cache key."""
    return hmac.new(seal_key, b"vmarchive local cache: " + purpose, hashlib.sha256).digest()


class SummaryCache:
    """One repository's summaries, one small JSON file per archive id (sealed, for an
    encrypted repository: ``seal_key``, see :meth:`Codecs.local_cache_key`)."""

    def __init__(self, directory: str, seal_key: bytes | None = None) -> None:
        self.directory = directory
        self._key = None if seal_key is None else derived_key(seal_key, b"summaries")

    @classmethod
    def for_repository(
        cls, encoded_config: bytes, encrypted: bool, seal_key: bytes | None = None
    ) -> SummaryCache | None:
        """None when there is no cache for it (:func:`repository_cache`)."""
        where = repository_cache(encoded_config, encrypted, seal_key)
        if where is None:
            return None
        root, name, key = where
        return cls(os.path.join(root, "summaries", name), key)

    def _aad(self, archive_id: str) -> bytes:
        return b"vmarchive summary of " + archive_id.encode()

    def _path(self, archive_id: str) -> str:
        return os.path.join(self.directory, archive_id + ".json")

    @staticmethod
    def needle(value: str) -> bytes:
        """``value`` as a string in an entry's JSON, for :meth:`get`."""
        return json.dumps(value).encode()

    def get(
        self, archive_id: str, stamp: str, needle: bytes | None = None
    ) -> dict[str, Any] | bool | None:
        """The cached summary fields of ``archive_id``, or None (then make and ``put`` it).

        ``stamp`` says which manifest object the entry was made from (its size and time in
        the listing): an entry with another stamp is not served.

        ``needle``: what the entry of a wanted archive holds somewhere (:meth:`needle` of a
        string its summary has as a value).  False when the entry is this
        archive's and of this stamp but holds no ``needle``: the archive is not wanted and
        its entry is not decoded.  A capture looking for its parent among 2,000 archives of
        50 guests listed them in 75-127 ms decoding every entry, 39-63 ms so.
        """
        try:
            with open(self._path(archive_id), "rb") as f:
                raw = f.read()
            if self._key is not None:
                raw = crypto.unseal(self._key, raw, self._aad(archive_id))
            if (
                needle is not None
                and needle not in raw
                and raw.startswith(_entry_head(archive_id, stamp))
            ):
                return False
            # msgspec: 12 us for a capture's 3.4 KB summary against json's 28 us; every
            # capture lists every archive of the repository to find its parent
            entry = msgspec.json.decode(raw)
            if (
                isinstance(entry, dict)
                and entry.get("v") == VERSION
                and entry.get("id") == archive_id
                and entry.get("stamp") == stamp
                and isinstance(entry.get("summary"), dict)
            ):
                return dict(entry["summary"])
            log.debug("summary cache entry of %s is stale or damaged; remaking it", archive_id)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, DamageError, FormatError) as e:
            log.debug("summary cache entry of %s unreadable (%s); remaking it", archive_id, e)
        return None

    def put(self, archive_id: str, stamp: str, summary: dict[str, Any]) -> None:
        if not _ARCHIVE_ID.match(archive_id):
            return
        path = self._path(archive_id)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            os.makedirs(self.directory, exist_ok=True)
            # {"v", "id", "stamp", "summary"} as json.dumps writes it; the head is what
            # get() recognises an entry by without decoding it
            data = _entry_head(archive_id, stamp) + json.dumps(summary).encode() + b"}"
            if self._key is not None:
                data = crypto.seal(self._key, data, self._aad(archive_id), os.urandom(NONCE_SIZE))
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError) as e:
            log.debug("cannot cache the summary of %s: %s", archive_id, e)
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def keep_only(self, archive_ids: Iterable[str]) -> None:
        """Drop the entries of archives no longer listed (forgotten, pruned)."""
        keep = {a + ".json" for a in archive_ids}
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.endswith(".json") and name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, name))


def _entry_head(archive_id: str, stamp: str) -> bytes:
    """How :meth:`SummaryCache.put` starts the entry of ``archive_id`` at ``stamp``: an
    entry that starts so is that archive's at that stamp without decoding it (one that
    does not -- damaged, or written otherwise -- is decoded and checked as always)."""
    return f'{{"v": {VERSION}, "id": {json.dumps(archive_id)}, "stamp": {json.dumps(stamp)}, "summary": '.encode()


__all__ = ["CACHE_ENV", "SummaryCache", "cache_root", "repository_cache"]
