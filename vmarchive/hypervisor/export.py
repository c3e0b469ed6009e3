"""NBD exports of a running domain's block nodes, served by QEMU itself (hypervisor layer).

The capture reads point-in-time disk images (frozen base images, fleecing overlays)
through QEMU's built-in NBD server: ``nbd-server-start`` + ``block-export-add`` of a node,
read with :class:`vmarchive.hypervisor.nbd.NBDClient`, then ``block-export-del`` and
``nbd-server-stop``.  This works the same for qcow2, raw files, block devices and network
disks, since QEMU does the format work.

The listening socket: by default vmarchive binds and listens on the unix socket itself
and hands the listening fd to QEMU (``getfd`` + address type ``fd``), so the socket may live
in a directory QEMU (user ``libvirt-qemu``) cannot write.  With ``via_fd=False`` QEMU binds
the path; the directory must then be writable by the QEMU process's user (see
:func:`qemu_process_owner`).

Export ids and names start with :data:`EXPORT_PREFIX`, so leftovers of a killed run can
be recognised and removed (:meth:`NBDServer.remove_stale_exports`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from types import TracebackType

from vmarchive.errors import HypervisorError, QMPCommandError
from vmarchive.hypervisor.nbd import BASE_ALLOCATION, NBDClient
from vmarchive.hypervisor.qmp import QMP

log = logging.getLogger(__name__)

EXPORT_PREFIX = "vmarchive-"
_FD_NAME = "vmarchive-nbd-listen"


def qemu_process_owner(domain_name: str, run_dir: str = "/run/libvirt/qemu") -> tuple[int, int]:
    """``(uid, gid)`` of the QEMU process of a running system-libvirt domain.

    Raises:
        HypervisorError: the pid file or the process is not there.
    """
    pidfile = os.path.join(run_dir, f"{domain_name}.pid")
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip())
        st = os.stat(f"/proc/{pid}")
    except (OSError, ValueError) as e:
        raise HypervisorError(
            f"cannot find the QEMU process of {domain_name}: {e}", domain=domain_name
        ) from e
    return st.st_uid, st.st_gid


class NBDServer:
    """QEMU's NBD server for one domain, on the unix socket ``socket_path``.

    Use as a context manager: entering starts the server, leaving removes every export
    added through this object and stops the server, whatever happened.
    """

    def __init__(self, qmp: QMP, socket_path: str, *, via_fd: bool = True) -> None:
        self.qmp = qmp
        self.socket_path = socket_path
        self.via_fd = via_fd
        self.running = False
        self._exports: list[str] = []

    def start(self) -> None:
        """Start QEMU's NBD server on :attr:`socket_path`.

        Raises:
            QMPCommandError: QEMU refused (e.g. a server already runs in this QEMU).
            HypervisorError: the socket cannot be created, or libvirt failed.
        """
        if self.running:
            return
        if not self.via_fd:
            self.qmp.execute(
                "nbd-server-start",
                {"addr": {"type": "unix", "data": {"path": self.socket_path}}},
            )
            self.running = True
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            raise HypervisorError(f"cannot create socket: {e}") from e
        try:
            try:
                sock.bind(self.socket_path)
                sock.listen(16)
            except OSError as e:
                raise HypervisorError(
                    f"cannot listen on {self.socket_path}: {e}", path=self.socket_path
                ) from e
            self.qmp.getfd(_FD_NAME, sock.fileno())
            try:
                self.qmp.execute(
                    "nbd-server-start", {"addr": {"type": "fd", "data": {"str": _FD_NAME}}}
                )
            except BaseException:
                with contextlib.suppress(HypervisorError):
                    self.qmp.closefd(_FD_NAME)
                raise
            self.running = True
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            raise
        finally:
            sock.close()  # QEMU holds its own copy

    def stop(self) -> None:
        """Remove our exports and stop the server (idempotent; failures are logged).

        Never raises a HypervisorError: it runs in cleanup paths.
        """
        for name in list(self._exports):
            self._remove(name, hard=True, quiet=True)
        if self.running:
            self.running = False
            try:
                self.qmp.execute("nbd-server-stop")
            except HypervisorError:
                log.warning("nbd-server-stop failed", exc_info=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def __enter__(self) -> NBDServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def add_export(
        self,
        node_name: str,
        name: str | None = None,
        *,
        bitmaps: Sequence[str] = (),
        writable: bool = False,
    ) -> str:
        """Export block node ``node_name`` (read-only unless ``writable``); returns the
        export name (also its QEMU export id), :data:`EXPORT_PREFIX` + ``name`` or the node.

        ``bitmaps`` are dirty bitmaps of the node to offer as ``qemu:dirty-bitmap:NAME``.

        Raises:
            QMPCommandError: QEMU refused (unknown node, name in use, server not running).
        """
        export = (
            name if name and name.startswith(EXPORT_PREFIX) else EXPORT_PREFIX + (name or node_name)
        )
        args: dict[str, object] = {
            "type": "nbd",
            "id": export,
            "node-name": node_name,
            "name": export,
            "writable": writable,
        }
        if bitmaps:
            args["bitmaps"] = list(bitmaps)
        self.qmp.execute("block-export-add", args)
        self._exports.append(export)
        return export

    def _remove(self, export: str, *, hard: bool, quiet: bool) -> None:
        args: dict[str, object] = {"id": export}
        if hard:
            args["mode"] = "hard"
        try:
            self.qmp.execute("block-export-del", args)
        except QMPCommandError:
            # Already gone (e.g. nbd-server-stop removed it) is fine in cleanup.
            if not quiet:
                raise
            log.debug("block-export-del %s failed", export, exc_info=True)
        except HypervisorError:
            if not quiet:
                raise
            log.warning("block-export-del %s failed", export, exc_info=True)
        finally:
            if export in self._exports:
                self._exports.remove(export)

    def remove_export(self, export: str, *, hard: bool = False) -> None:
        """``block-export-del`` (``hard`` drops connected clients).

        Raises:
            QMPCommandError: QEMU refused (unknown export, or in use in safe mode).
        """
        self._remove(export, hard=hard, quiet=False)

    @contextlib.contextmanager
    def export(
        self, node_name: str, name: str | None = None, *, bitmaps: Sequence[str] = ()
    ) -> Iterator[str]:
        """Read-only export of ``node_name`` for the ``with`` body; removed afterwards."""
        export = self.add_export(node_name, name, bitmaps=bitmaps)
        try:
            yield export
        finally:
            self._remove(export, hard=True, quiet=True)

    def connect(
        self, export: str, *, meta_contexts: Sequence[str] = (BASE_ALLOCATION,)
    ) -> NBDClient:
        """An :class:`NBDClient` for ``export`` of this server.  Raises: NBDError."""
        return NBDClient.connect(self.socket_path, export, meta_contexts=meta_contexts)

    def remove_stale_exports(self) -> list[str]:
        """Remove exports whose id starts with :data:`EXPORT_PREFIX` and that this object
        did not add (leftovers of a killed run).  Returns their ids.

        Raises:
            QMPCommandError, HypervisorError: listing failed.
        """
        stale = [
            str(e["id"])
            for e in self.qmp.execute("query-block-exports")
            if str(e.get("id", "")).startswith(EXPORT_PREFIX) and e["id"] not in self._exports
        ]
        for export in stale:
            self._remove(export, hard=True, quiet=True)
        return stale
