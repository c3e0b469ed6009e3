"""The one error tree of vmarchive (bottom layer: imports nothing from the package).

Every error meant for a user derives from :class:`VmarchiveError`, carries a one-line
message and an exit code.  The CLI alone turns them into output and exit status; the
core raises them and never prints.  Errors from libvirt, QMP, the OS or a storage
backend are translated at the boundary where they happen (``raise X(...) from e``).

Exit codes (the README's table is generated from :data:`EXIT_CODES`)::

    0  success
    1  unexpected internal error (a bug: the CLI prints a short line and logs the traceback)
    2  usage error: bad arguments, bad input file, bad archive name
    3  repository error: missing, not a repository, unsupported version, locked
    4  data damage: a chunk, pack, index or manifest failed verification
    5  hypervisor error: libvirt or QEMU refused or failed
    6  the operation was interrupted (Ctrl-C, signal) and cleaned up
    7  a precondition of the host is not met (missing capability, see `vmarchive doctor`)
"""

from __future__ import annotations

from typing import Any, ClassVar


class VmarchiveError(Exception):
    """Root of every error vmarchive reports to a user."""

    exit_code: ClassVar[int] = 1
    #: A short human title of the error class, used in docs.
    title: ClassVar[str] = "error"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Structured context (domain, chunk id, QMP error class, ...), for logs and --json.
        self.fields: dict[str, Any] = fields

    def __str__(self) -> str:
        return self.message


class UsageError(VmarchiveError):
    """Bad arguments or input that the user can correct."""

    exit_code = 2
    title = "usage error"


class NotFoundError(UsageError):
    """A named thing (archive, domain, disk target, file) does not exist."""

    title = "not found"


class AmbiguousError(UsageError):
    """A prefix or name matches more than one thing."""

    title = "ambiguous name"


class AlreadyExistsError(UsageError):
    """Refusing to overwrite something that exists (use --force / --replace)."""

    title = "already exists"


class RepositoryError(VmarchiveError):
    """The repository cannot be used as asked."""

    exit_code = 3
    title = "repository error"


class RepositoryNotFoundError(RepositoryError):
    title = "no repository"


class UnsupportedVersionError(RepositoryError):
    """A format version or required feature this release cannot read."""

    title = "unsupported format"


class LockedError(RepositoryError):
    """Another process holds a conflicting lock."""

    title = "locked"


class WrongKeyError(RepositoryError):
    """The passphrase or key does not open the repository."""

    title = "wrong key"


class BackendError(RepositoryError):
    """The storage backend failed (I/O error, disk full, network)."""

    title = "storage error"


class DamageError(VmarchiveError):
    """Data failed verification: wrong id, bad checksum or MAC, truncation, bad magic."""

    exit_code = 4
    title = "damaged data"


class FormatError(DamageError):
    """A structure does not decode: bad magic, truncated, inconsistent fields."""

    title = "format error"


class ChunkMissingError(DamageError):
    title = "missing chunk"


class HypervisorError(VmarchiveError):
    """libvirt or QEMU refused or failed."""

    exit_code = 5
    title = "hypervisor error"


class DomainNotFoundError(HypervisorError):
    title = "no such domain"


class ConnectionFailedError(HypervisorError):
    title = "cannot connect"


class QMPCommandError(HypervisorError):
    """A QMP command returned an error; ``fields`` holds command, class and reply."""

    title = "QMP error"


class NBDError(HypervisorError):
    """An NBD export could not be opened or read (handshake, option or command failed)."""

    title = "NBD error"


class StreamError(VmarchiveError):
    """A QEMU migration stream could not be parsed or failed validation."""

    exit_code = 4
    title = "migration stream error"


class StreamRefusedError(StreamError):
    """The stream parser's allow-list refused the stream (store it opaquely instead)."""

    title = "stream not parseable"


class InterruptedError_(VmarchiveError):
    """The operation was interrupted and has been cleaned up."""

    exit_code = 6
    title = "interrupted"


class HostPreconditionError(VmarchiveError):
    """The host lacks something the operation needs."""

    exit_code = 7
    title = "host precondition"


#: Exit code table for docs: code -> meaning.
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "internal error (a bug; run with --debug for the traceback)",
    2: "usage error: bad arguments or input, unknown or ambiguous name, refusing to overwrite",
    3: "repository error: missing, unsupported version, locked, wrong key, storage failure",
    4: "damaged data: verification failed (chunk, pack, index, manifest, migration stream)",
    5: "hypervisor error: libvirt or QEMU refused or failed",
    6: "interrupted (Ctrl-C or signal); cleanup was done",
    7: "host precondition not met (see `vmarchive doctor`)",
}
