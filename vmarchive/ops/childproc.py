"""What the capture's helper processes share (ops layer): how one is started, the JSON-lines
channel, and how it opens the capture's repository.

A helper is this interpreter running ``main()`` of one of vmarchive's modules
(:mod:`vmarchive.ops.disk_process`, :mod:`vmarchive.ops.check_process`), with the parent's
own vmarchive first on its path for that import.  It talks over its stdin and stdout.  Its
first message names the repository and carries the key material the parent unlocked
(encrypted repositories): a helper never derives the key again from the passphrase
(scrypt, 0.43 s of CPU here) and never sees the passphrase.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from typing import IO, Any

import vmarchive
from vmarchive.format import constants as C
from vmarchive.format.crypto import KeyMaterial

#: ``python -c``: its arguments are where the parent's vmarchive is and the module to run.
_PROGRAM = (
    "import sys, importlib; sys.path.insert(0, sys.argv[1]); import vmarchive; "
    "del sys.path[0]; importlib.import_module(sys.argv[2]).main()"
)


class Channel:
    """One end of a helper's protocol: one JSON object per line, from any thread.  A write
    to a peer that is gone or a pipe closed (cancelled) is dropped: the result decides."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj) + "\n").encode()
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._out.write(line)
            self._out.flush()


def spawn(module: str) -> subprocess.Popen[bytes]:
    """Start ``module``'s ``main()`` in a helper with pipes on its stdin and stdout.
    Raises OSError when it cannot be started."""
    # The helper imports this vmarchive, wherever it was imported from: its directory
    # first on the path for that import only (kept there, a site-packages directory
    # would shadow the standard library; the package's own path serves the rest).
    root = os.path.dirname(os.path.dirname(os.path.abspath(vmarchive.__file__)))
    return subprocess.Popen(
        [sys.executable, "-c", _PROGRAM, root, module],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )


def open_message(location: str, w: Any) -> dict[str, Any]:
    """The ``open`` message: the repository of the capture's writer ``w`` at
    ``location``, its key material (hex, id secret then data key; None when plain) and the
    log levels set in this process."""
    key = w.repo.codecs.key
    levels = {
        name: lg.level
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
    }
    levels[""] = logging.root.level
    secret = None if key is None else (key.id_secret + key.data_key).hex()
    return {"repo": location, "key": secret, "log": levels}


def open_repository(opened: dict[str, Any]) -> Any:
    """In the helper: set the parent's log levels and open the repository an
    :func:`open_message` names (``store.Repository``)."""
    from vmarchive.store import Repository

    for name, level in dict(opened.get("log") or {}).items():
        logging.getLogger(name or None).setLevel(int(level))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    secret = opened.get("key")
    key = None
    if secret is not None:
        raw = bytes.fromhex(str(secret))
        key = KeyMaterial(raw[: C.ID_SECRET_SIZE], raw[C.ID_SECRET_SIZE :])
    return Repository.open(str(opened["repo"]), key=key)
