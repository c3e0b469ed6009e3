"""Command-line interface (top layer): parses arguments, calls ``ops``, renders results.

The CLI is thin: each command builds a typed options object, calls one function of the
``ops`` layer and renders what it returns (text or ``--json``).  It alone maps
:class:`vmarchive.errors.VmarchiveError` to one line on stderr and an exit code.
"""

from __future__ import annotations

from vmarchive.cli import capture as _capture  # noqa: F401
from vmarchive.cli import doctor as _doctor  # noqa: F401  (registers commands)
from vmarchive.cli import export as _export  # noqa: F401
from vmarchive.cli import repo as _repo  # noqa: F401
from vmarchive.cli import restore as _restore  # noqa: F401
from vmarchive.cli.app import app, main

__all__ = ["app", "main"]
