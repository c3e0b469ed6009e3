"""Command-line interface (top layer): parses arguments, calls ``ops``, renders results.

The CLI is thin: each command builds a typed options object, calls one function of the
``ops`` layer and renders what it returns (text or ``--json``).  It alone maps
:class:`vmarchive.errors.VmarchiveError` to one line on stderr and an exit code.
"""

from __future__ import annotations

from vmarchive.cli.app import app, load_commands, main, run

# The command modules register themselves on ``app`` when imported: ``main`` imports only
# the one it runs; ``load_commands()`` imports them all (help, tests).
__all__ = ["app", "load_commands", "main", "run"]
