"""Helpers for scripts/bench_capture.py: measured subprocesses, QEMU pause events, test data.

Not part of the package: a benchmark may use libvirt directly (the layer rules bind
``vmarchive/``, not ``scripts/``).
"""

from __future__ import annotations

import compileall
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import random
import re
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------- processes
@dataclasses.dataclass
class Run:
    wall_s: float
    #: bytes: the most its process tree held at once -- the larger of wait4's maximum
    #: (the process's own, or its largest child's) and the peak of the tree's summed RSS
    #: sampled every ``poll`` s (a command's helper processes count: vmarchive's watchdog,
    #: while it runs)
    peak_rss: int
    rc: int
    out: str
    err: str
    cpu_s: float = 0.0  # user + system CPU seconds (process and waited-for children)
    #: (seconds since start, stderr line) for every line, as it arrived
    lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    #: (seconds since start, RSS bytes) sampled every ``poll`` seconds
    rss: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    #: share of all the host's CPUs busy while it ran (/proc/stat: anything but idle and
    #: iowait), 0..1: near 1 the run was bound by CPU (its own, QEMU's, anything's); well
    #: below, it waited (on the GIL, on QEMU, on a round trip)
    host_busy: float | None = None
    #: bytes: wait4's maximum alone (the process's own, or its largest child's)
    single_rss: int = 0

    def json(self) -> Any:
        return json.loads(self.out)


# The commands measured start as an installed vmarchive does, from compiled modules: with
# PYTHONDONTWRITEBYTECODE set, a module edited since the last compile would otherwise be
# compiled again by every command (scripts/setup-host compiles once; edits come after).
compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "vmarchive"), quiet=1)


def _vmrss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _tree_rss(pid: int) -> int | None:
    """The summed RSS of ``pid`` and its descendants (None when ``pid`` is gone)."""
    own = _vmrss(pid)
    if own is None:
        return None
    total, todo, seen = own, [pid], {pid}
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except (OSError, ValueError):
                continue
            for k in kids:
                if k not in seen:
                    seen.add(k)
                    todo.append(k)
                    total += _vmrss(k) or 0
    return total


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, busy + idle) jiffies of all CPUs since boot, or None without /proc/stat.

    Busy: user, nice, system, irq, softirq (guest time is inside user); idle: idle and
    iowait.  Steal (time the host's hypervisor gave to others) is neither."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq = (
                int(x) for x in f.readline().split()[1:8]
            )
    except (OSError, ValueError):
        return None
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def _kill_if_running(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()


def run(
    cmd: list[str],
    env: dict[str, str] | None = None,
    ok: tuple[int, ...] = (0,),
    sync: bool = True,
    cwd: Path | None = None,
    poll: float = 0.02,
    timeout: float = 900.0,
) -> Run:
    """Run ``cmd`` to completion: wall time, peak RSS (wait4() and the process tree's
    sampled sum), stderr lines with their arrival time and an RSS timeline of the tree
    from /proc (every ``poll`` s).  The wait between samples ends when the process does
    (a pidfd), so the wall time is not rounded up to the next sample.  Raises on exit
    codes other than ``ok``; a process still running after ``timeout`` s is terminated
    (then killed) and reported as failed.  ``sync`` flushes dirty pages first, so no tool pays for the
    previous one's writeback."""
    if sync:
        os.sync()
    ticks0 = _cpu_ticks()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    chunks: list[bytes] = []
    lines: list[tuple[float, str]] = []

    def drain_out() -> None:
        assert proc.stdout is not None
        chunks.append(proc.stdout.read())

    def drain_err() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append((time.perf_counter() - t0, raw.decode(errors="replace").rstrip("\n")))

    ts = [threading.Thread(target=drain_out), threading.Thread(target=drain_err)]
    for t in ts:
        t.start()
    rss: list[tuple[float, int]] = []
    timed_out = False
    ended = _ExitWaiter(proc.pid, poll)
    # Reaped with wait4 (not Popen.wait) to get the child's rusage; polled so that the
    # RSS timeline can be sampled meanwhile.
    try:
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.perf_counter() - t0
                if now > timeout and not timed_out:
                    timed_out = True
                    proc.terminate()
                    threading.Timer(15, _kill_if_running, (proc,)).start()
                m = _tree_rss(proc.pid)
                if m is not None:
                    rss.append((now, m))
                ended.wait()
            except BaseException:  # Ctrl-C / SIGTERM: stop the child before the caller cleans up
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
    finally:
        ended.close()
    wall = time.perf_counter() - t0
    ticks1 = _cpu_ticks()
    busy = None
    if ticks0 and ticks1 and ticks1[1] > ticks0[1]:
        busy = (ticks1[0] - ticks0[0]) / (ticks1[1] - ticks0[1])
    for t in ts:
        t.join()
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    r = Run(
        wall,
        max(usage.ru_maxrss * 1024, max((m for _t, m in rss), default=0)),
        rc,
        b"".join(chunks).decode(errors="replace"),
        "\n".join(x for _t, x in lines),
        usage.ru_utime + usage.ru_stime,
        lines,
        rss,
        busy,
        usage.ru_maxrss * 1024,
    )
    if timed_out:
        raise RuntimeError(f"{' '.join(cmd[:4])}... timed out after {timeout:.0f} s")
    if rc not in ok:
        tail = r.err[-1500:] or r.out[-1500:]
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({rc}): {tail}")
    return r


class _ExitWaiter:
    """Waits at most ``poll`` s, and no longer once process ``pid`` has exited.

    Sleeping ``poll`` s between wait4() calls put the end of a run at the next sample after
    it: up to 20 ms late, a fifth of the difference between some of the figures compared.
    Where there is no pidfd (Linux < 5.3), the wait is a plain sleep.
    """

    def __init__(self, pid: int, poll: float) -> None:
        self.poll = poll
        self.fd: int | None = None
        with contextlib.suppress(AttributeError, OSError):
            self.fd = os.pidfd_open(pid)

    def wait(self) -> None:
        if self.fd is None:
            time.sleep(self.poll)
        else:
            select.select([self.fd], [], [], self.poll)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def phases(r: Run, pattern: str = r": (\w+) -> (\w+)") -> list[dict[str, Any]]:
    """Time and peak RSS of each state a vmarchive command logged (``-v``: ``A -> B``),
    with ``startup`` before the first transition; ``done`` is the process's exit."""
    marks = [(0.0, "startup")]
    for t, line in r.lines:
        m = re.search(pattern, line)
        if m:
            marks.append((t, m.group(2)))
    marks.append((r.wall_s, "end"))
    out = []
    for (t1, name), (t2, _next) in itertools.pairwise(marks):
        peak = max((m for t, m in r.rss if t1 <= t < t2), default=0)
        out.append({"phase": name, "s": round(t2 - t1, 3), "peak_rss_mib": round(peak / MiB, 1)})
    return out


def du(path: Path) -> int:
    """Allocated bytes under ``path`` (file or tree)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ----------------------------------------------------------------------------- machine
def machine_info(conn: libvirt.virConnect) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True
    ).stdout.splitlines()
    lv = conn.getLibVersion()
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "qemu": qemu[0] if qemu else "?",
        "libvirt": f"{lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}",
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------- test data
def write_mixed_disk(path: Path, virtual_mib: int, data_mib: int, seed: int = 7) -> dict[str, int]:
    """A qcow2 image of ``virtual_mib`` with ``data_mib`` of mixed, fully allocated data after
    the first 4 MiB (left to the guest's tick block): 3/8 random, 2/8 zeros (written, so
    allocated), 3/8 repeated 1 MiB blocks (8 distinct ones).  Built as raw, then converted
    with ``-S 0`` (zeros stay allocated, as in a guest that wrote them)."""
    rnd = random.Random(seed)
    raw = path.with_suffix(".raw-tmp")
    head = 4
    n_rand = data_mib * 3 // 8
    n_zero = data_mib * 2 // 8
    n_rep = data_mib - n_rand - n_zero
    blocks = [rnd.randbytes(MiB) for _ in range(8)]
    try:
        with open(raw, "wb") as f:
            f.write(bytes(head * MiB))
            for _ in range(n_rand):
                f.write(os.urandom(MiB))
            zero = bytes(MiB)
            for _ in range(n_zero):
                f.write(zero)
            for _ in range(n_rep):
                f.write(rnd.choice(blocks))
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-q",
                "-S",
                "0",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(path),
            ],
            check=True,
        )
        subprocess.run(["qemu-img", "resize", "-q", str(path), f"{virtual_mib}M"], check=True)
    finally:
        rm(raw)
    return {"random_mib": n_rand, "zero_mib": n_zero, "repeated_mib": n_rep, "head_mib": head}


# ------------------------------------------------------------------------ QEMU events
_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop on a daemon thread; call before opening connections."""
    global _loop_started
    if _loop_started:
        return
    libvirt.virEventRegisterDefaultImpl()

    def loop() -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    threading.Thread(target=loop, daemon=True, name="libvirt-events").start()
    _loop_started = True


class PauseWatcher:
    """Records QEMU's STOP and RESUME events (QEMU's own timestamps) for one domain name,
    across restarts of the domain (registered for all domains, filtered by name)."""

    def __init__(self, conn: libvirt.virConnect, name: str) -> None:
        self.name = name
        self.events: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._conn = conn
        self._ids = [
            libvirt_qemu.qemuMonitorEventRegister(conn, None, ev, self._cb, None, 0)
            for ev in ("STOP", "RESUME")
        ]

    def _cb(
        self, _conn: Any, dom: Any, event: str, sec: int, usec: int, _det: Any, _o: Any
    ) -> None:
        if dom.name() == self.name:
            with self._lock:
                self.events.append((event, sec + usec / 1e6))

    def mark(self) -> int:
        with self._lock:
            return len(self.events)

    def pauses_ms(self, since: int = 0, settle: float = 0.3) -> list[float]:
        """STOP->RESUME intervals (ms) recorded after ``mark()`` == ``since``.  A STOP
        without a RESUME (guest left stopped) is not counted."""
        time.sleep(settle)  # events arrive asynchronously
        with self._lock:
            evs = self.events[since:]
        out, stop = [], None
        for ev, t in evs:
            if ev == "STOP":
                stop = t
            elif ev == "RESUME" and stop is not None:
                out.append((t - stop) * 1000)
                stop = None
        return out

    def close(self) -> None:
        for i in self._ids:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuMonitorEventDeregister(self._conn, i)


# ------------------------------------------------------------------- QMP through libvirt
def qmp(dom: libvirt.virDomain, command: str, files: list[int] | None = None, **args: Any) -> Any:
    msg = json.dumps({"execute": command, "arguments": args} if args else {"execute": command})
    if files:
        out, _ = libvirt_qemu.qemuMonitorCommandWithFiles(dom, msg, files, 0)
    else:
        out = libvirt_qemu.qemuMonitorCommand(dom, msg, 0)
    reply = json.loads(out)
    if "error" in reply:
        raise RuntimeError(f"QMP {command}: {reply['error']}")
    return reply.get("return")


def migrate_to_null(
    dom: libvirt.virDomain, background: bool = False, drain: list[str] | None = None
) -> dict[str, Any]:
    """QEMU's own migration of the running guest into a pipe drained by ``cat > /dev/null``
    (fd passed through libvirt: ``exec:`` is killed by libvirt's seccomp), unlimited
    bandwidth.  The guest is resumed (``cont``) afterwards.  Returns wall time, bytes
    transferred and QEMU's own figures.

    ``background``: QEMU's ``background-snapshot`` instead of precopy (what a snapshot-mode
    capture reads: QEMU write-protects RAM and un-protects each page as it sends it), so the
    fastest any snapshot-mode capture of this guest's RAM can be; the guest keeps running.

    ``drain``: the command that drains the pipe instead of ``cat`` (its output discarded)."""
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):
        import fcntl

        fcntl.fcntl(wfd, 1031, MiB)  # F_SETPIPE_SZ
    cat = subprocess.Popen(drain or ["cat"], stdin=rfd, stdout=subprocess.DEVNULL)
    os.close(rfd)
    try:
        qmp(dom, "getfd", files=[wfd], fdname="benchnull")
        os.close(wfd)
        wfd = -1
        limits: dict[str, Any] = {"max-bandwidth": 1 << 40, "downtime-limit": 300}
        qmp(dom, "migrate-set-parameters", **limits)
        caps = [{"capability": "background-snapshot", "state": background}]
        qmp(dom, "migrate-set-capabilities", capabilities=caps)
        t0 = time.perf_counter()
        qmp(dom, "migrate", uri="fd:benchnull")
        while True:
            info = qmp(dom, "query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        if info.get("status") != "completed":
            raise RuntimeError(f"migration to /dev/null: {info}")
        if qmp(dom, "query-status").get("status") != "running":
            qmp(dom, "cont")
    finally:
        if background:
            with contextlib.suppress(Exception):
                qmp(
                    dom,
                    "migrate-set-capabilities",
                    capabilities=[{"capability": "background-snapshot", "state": False}],
                )
        if wfd >= 0:
            os.close(wfd)
        cat.wait(timeout=60)
    ram = info.get("ram", {})
    return {
        "wall_s": wall,
        "qemu_total_ms": info.get("total-time"),
        "qemu_downtime_ms": info.get("downtime"),
        "bytes": ram.get("transferred"),
        "ram_total": ram.get("total"),
        "normal_pages": ram.get("normal"),
        "rate_mib_s": ram.get("transferred", 0) / MiB / wall if wall else None,
    }
