"""The checks every command that writes an output file makes first (ops layer)."""

from __future__ import annotations

from pathlib import Path

from vmarchive.errors import AlreadyExistsError, UsageError


def check_output(path: Path, replace: bool, *, flag: str = "--force") -> None:
    """Before anything is done: ``path`` may be written.

    Raises AlreadyExistsError (it exists and ``replace`` is false; ``flag`` is the option
    that allows it) and UsageError (a directory, or in a directory that does not exist).
    """
    if path.is_dir():
        raise UsageError(f"output {path} is a directory")
    if (path.exists() or path.is_symlink()) and not replace:
        raise AlreadyExistsError(f"output {path} exists (use {flag} to replace it)", path=str(path))
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} does not exist")
