"""Where QEMU's own threads are, seen through ``/proc`` (hypervisor layer, same host only).

The snapshot-mode capture holds QEMU's ``bg_snapshot`` thread on a full migration channel
(a unix socket) after its set-up (see :mod:`vmarchive.ops.capture`, "the set-up gate").
Whether the thread has got there is not visible through QMP (``query-migrate`` says
``setup`` before and after), but the kernel shows it: the thread sleeps in the socket's
send (``sock_alloc_send_pskb``; ``pipe_write`` for a pipe).  Everything here is an
optimisation with a safe answer when ``/proc`` cannot tell (``None`` / ``False``): the
capture then simply stops the guest without waiting.

libvirt starts QEMU with ``-name ...,debug-threads=on``, which gives QEMU's threads their
names (``bg_snapshot`` for the background-snapshot migration thread).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vmarchive.errors import HypervisorError
from vmarchive.hypervisor.qmp import QMP

log = logging.getLogger(__name__)

PROC = Path("/proc")
#: QEMU's names for the background-snapshot migration thread (migration/migration.c):
#: "bg_snapshot" up to QEMU 8, "mig/snapshot" since the threads were renamed.
BG_SNAPSHOT_THREADS = ("bg_snapshot", "mig/snapshot")
#: Where a thread writing a full channel sleeps (``/proc/…/wchan``): a unix stream socket
#: waits for send buffer space in ``sock_alloc_send_pskb`` (``sock_wait_for_wmem`` where
#: that is not inlined), a pipe in ``pipe_write`` (``anon_pipe_write`` in newer kernels).
WRITE_WAITS = ("sock_alloc_send_pskb", "sock_wait_for_wmem", "pipe_write")
#: How long the thread may take to show up: QEMU creates it before ``migrate`` returns.
SHOW_UP_S = 0.05


#: Where the system libvirt daemon keeps each running domain's QEMU pid (``NAME.pid``).
LIBVIRT_RUN_DIR = Path("/run/libvirt/qemu")


def qemu_pid(
    qmp: QMP,
    proc: Path = PROC,
    *,
    name: str | None = None,
    run_dir: Path = LIBVIRT_RUN_DIR,
) -> int | None:
    """The process id of the domain's QEMU, or None when it cannot be found here.

    With the domain's ``name``, first libvirt's pid file in ``run_dir``, taken only when
    that process's command line names the domain (``-name guest=NAME,...``): no monitor
    round trip.  Else QMP gives the host thread ids of the vCPUs (``query-cpus-fast``);
    their thread group is QEMU's process.
    """
    if name is not None:
        pid = _pid_from_file(run_dir, name, proc)
        if pid is not None:
            return pid
    try:
        cpus = qmp.execute("query-cpus-fast")
        tid = int(cpus[0]["thread-id"])
        for line in (proc / str(tid) / "status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (HypervisorError, OSError, LookupError, ValueError, TypeError) as e:
        log.debug("QEMU's process id not found: %s", e)
    return None


def libvirt_pid(name: str, run_dir: Path = LIBVIRT_RUN_DIR) -> int | None:
    """The pid libvirt recorded for domain ``name``'s QEMU, or None (no readable file)."""
    try:
        return int((run_dir / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_from_file(run_dir: Path, name: str, proc: Path) -> int | None:
    pid = libvirt_pid(name, run_dir)
    if pid is None:
        return None
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # libvirt writes "-name guest=NAME,debug-threads=on", commas in NAME doubled
    want = ("guest=" + name.replace(",", ",,") + ",").encode()
    named = [args[i + 1] for i, a in enumerate(args[:-1]) if a == b"-name"]
    if any((v + b",").startswith(want) for v in named):
        return pid
    log.debug("%s/%s.pid names no QEMU of this domain", run_dir, name)
    return None


def _in_write(task: Path, names: tuple[str, ...]) -> bool | None:
    """Whether the thread sleeps writing a full channel (:data:`WRITE_WAITS`); None when it
    is gone (or renamed)."""
    if _comm(task) not in names:
        return None
    try:
        wchan = (task / "wchan").read_text()
    except OSError:
        return None
    return any(w in wchan for w in WRITE_WAITS)


def wait_thread_blocked_writing(
    pid: int,
    names: tuple[str, ...] = BG_SNAPSHOT_THREADS,
    timeout_s: float = 30.0,
    proc: Path = PROC,
    poll_s: float = 0.0005,
) -> bool:
    """Wait until QEMU's thread (one of ``names``) sleeps writing a full channel; False
    when it cannot be seen.

    False at ``timeout_s``; at once when the thread ends (the migration failed); and
    after :data:`SHOW_UP_S` when no such thread shows up (QEMU without thread names, a
    renamed thread, or a /proc we may not read).
    """
    t0 = time.monotonic()
    tasks: list[Path] = []
    while True:
        now = time.monotonic()
        if not tasks:
            try:
                tasks = [t for t in (proc / str(pid) / "task").iterdir() if _comm(t) in names]
            except OSError:
                return False
            if not tasks and now - t0 > SHOW_UP_S:
                log.debug("no %s thread in QEMU process %d", "/".join(names), pid)
                return False
        if tasks:
            seen = [_in_write(t, names) for t in tasks]
            if any(seen):
                return True
            if all(s is None for s in seen):
                return False
        if now - t0 > timeout_s:
            return False
        time.sleep(poll_s)


def _comm(task: Path) -> str:
    try:
        return (task / "comm").read_text().strip()
    except OSError:
        return ""


__all__ = ["BG_SNAPSHOT_THREADS", "WRITE_WAITS", "qemu_pid", "wait_thread_blocked_writing"]
