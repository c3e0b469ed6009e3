"""A live capture's disks read by a process of its own (ops layer).

A capture stores its memory (the migration stream: parsed, hashed, packed, checked live)
and its disks at the same time.  On threads of one process both paths hold the
interpreter lock for most of their work and hand it over at every system call and zstd
call; taking it back costs up to the switch interval each time.  ``scripts/bench_split.py``
timed the same memory and disk work at 1.99-2.32 s on threads of one process and at
1.49-1.67 s in two processes, against 1.37-1.47 s for the memory alone.  So a live capture
whose disk reads pay for it (:func:`vmarchive.ops.capture.reads_pay_for_a_process`) has
them read by a child process, which it starts as soon as its disks are planned, while it
prepares QEMU, and hands the disks' NBD exports at the instant.

The child is forked when the capture begins (:func:`fork_reader`), before the capture's
process runs any other thread: it then has every module imported already.  Spawned
(``python -c``, :func:`main`) it imported them again: ~0.15 s of CPU beside the memory's,
and a first capture of the bench guest took 2.15 s against 1.92 s forked (medians of 8,
alternating; CPU 2.55 s against 2.20 s).  A fork is refused while other threads run (a
fork copies the locks they hold, held for ever in the child); then, or when the fork
fails, the child is spawned.  A capture that reads on threads after all dismisses it.

The child opens the repository itself (a writer of its own: a shared lock, the chunk
index), reads each disk with :func:`~vmarchive.ops.capture_disks.read_disk` or
:func:`~vmarchive.ops.capture_incr.read_disk_incremental` into a stream of that writer,
and ends it with :meth:`~vmarchive.store.writer.ArchiveWriter.publish_chunks`: every
chunk it stored is in a durable pack named by a durable index object, and no manifest
names them.  The parent adopts those index objects and points its own disk streams at
the slot tables the child sends (:meth:`~vmarchive.store.writer.StreamWriter.set_chunks`);
its manifest is published after that, so the write ordering holds (packs, then index
objects, then the manifest), and the parent's shared lock keeps gc out until then.
Anything that fails on the way fails the capture as a failed disk read does.

The protocol is one JSON object per line, on the child's stdin and stdout:

==========  ==================================================================
to child    ``{"open": {"repo", "key", "log"}}`` first (``key``: hex of the
            parent's unlocked key material, or null); then
            ``{"disk": {"target", "socket", "export", "size", "bitmap",
            "parent_table"}}`` for each disk (``parent_table``: base64, with
            ``bitmap`` for an incremental read); ``{"end": true}``: no more
            disks; the end of the input before the child's result: cancelled
from child  ``{"ready": {"chunk_size"}}`` once the repository is open;
            ``{"task"|"advance"|"total"|"close": ...}``: progress;
            ``{"done": target, "read": {DiskRead}, "table": base64}`` or
            ``{"failed": target, "error": {"type", "message"}}`` per disk; last
            ``{"published": [index names]}`` or ``{"aborted": why}``
==========  ==================================================================

The child ignores SIGINT (the capture cancels it as it cleans up) and stops on SIGTERM
or when its input ends (the capture died): its writer aborts, what it published is
garbage for gc.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn

import vmarchive
from vmarchive import errors
from vmarchive.errors import VmarchiveError
from vmarchive.format.crypto import KeyMaterial
from vmarchive.ops.capture_disks import DiskRead, read_disk
from vmarchive.progress import Progress, Task

log = logging.getLogger(__name__)

#: Seconds between the progress messages of one task (the bars redraw at 10 Hz).
_PROGRESS_EVERY = 0.1
#: Seconds a cancelled child gets to abort its writer before it is killed.
_CANCEL_WAIT = 30.0
#: The child's program (``python -c``; its argument: where the parent's vmarchive is).
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); import vmarchive; del sys.path[0]; "
    "from vmarchive.ops.disk_process import main; main()"
)


def _error_of(what: dict[str, Any]) -> BaseException:
    """The exception a child reported (``{"type", "message"}``): the class of that name in
    :mod:`vmarchive.errors` with the child's message, else an internal error."""
    cls = getattr(errors, str(what.get("type")), None)
    message = str(what.get("message") or "disk read failed")
    if isinstance(cls, type) and issubclass(cls, VmarchiveError):
        with contextlib.suppress(TypeError):
            return cls(message)
    return VmarchiveError(f"disk reader process: {what.get('type')}: {message}")


class _Channel:
    """One end of the protocol: one JSON object per line, from any thread.  A write to a
    peer that is gone or a pipe closed (cancelled) is dropped: the result decides."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj) + "\n").encode()
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._out.write(line)
            self._out.flush()


class ForkedChild:
    """A disk reader child forked from the capture's process (:func:`fork_reader`), with
    what :class:`DiskProcess` uses of :class:`subprocess.Popen`: ``pid``, ``stdin``,
    ``stdout``, ``returncode``, :meth:`wait` and :meth:`kill`.

    It waits for its first line like a spawned child; a capture that reads its disks on
    threads dismisses it (:meth:`dismiss`: the end of its input, it exits at once).
    """

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self.claimed = False  # a DiskProcess drives it (and waits for it)

    def _reap(self, flags: int) -> bool:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                self.returncode = -1
                return True
            if pid == 0:
                return False
            self.returncode = os.waitstatus_to_exitcode(status)
        return True

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            self._reap(0)
        else:
            end = time.monotonic() + timeout
            while not self._reap(os.WNOHANG):
                if time.monotonic() >= end:
                    raise subprocess.TimeoutExpired(f"disk reader {self.pid}", timeout)
                time.sleep(0.005)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def claim(self) -> bool:
        """For the one DiskProcess that drives it: False once claimed or dismissed."""
        if self.claimed or self.stdin.closed:
            return False
        self.claimed = True
        return True

    def dismiss(self) -> None:
        """Unless claimed: end its input (it exits, having opened nothing) and reap it."""
        if self.claimed:
            return
        self.claimed = True
        for stream in (self.stdin, self.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        try:
            self.wait(_CANCEL_WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()


def fork_reader() -> ForkedChild | None:
    """A disk reader child forked now, for the capture about to start: it has every
    module the parent imported (a spawned child imports them again: ~0.15 s of CPU, most
    of its start-up) and waits for the repository to open.  Only while this process runs
    no other thread: a fork copies the locks other threads hold, held for ever in the
    child.  None then, or when the fork fails: the capture spawns a child if it needs one.
    """
    if threading.active_count() != 1:
        return None
    for stream in (sys.stdout, sys.stderr):  # what they buffer is not written twice
        with contextlib.suppress(Exception):
            stream.flush()
    fds: list[int] = []
    try:
        fds += os.pipe()  # non-inheritable: no program the capture runs holds them
        fds += os.pipe()
        pid = os.fork()
    except OSError as e:
        log.debug("disk reader not forked: %s", e)
        for fd in fds:
            os.close(fd)
        return None
    to_read, to_write, from_read, from_write = fds
    if pid == 0:
        # Never back into the caller's code, whatever happens (an interrupt before the
        # child ignores SIGINT included); nor holding its stdin and stdout: a pipe the
        # capture writes to ends when the capture does, not when this child does.
        try:
            os.close(to_write)
            os.close(from_read)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.close(null)
            _run_child(os.fdopen(to_read, "rb"), os.fdopen(from_write, "wb"))
        finally:
            os._exit(1)
    os.close(to_read)
    os.close(from_write)
    return ForkedChild(pid, os.fdopen(to_write, "wb"), os.fdopen(from_read, "rb"))


class DiskProcess:
    """The capture's end of the child: the interface of
    :class:`~vmarchive.ops.capture_disks.DiskThreads` (``cancel``, ``join``,
    ``raise_first``, ``results``, ``errors``), with :meth:`start` taking a disk's export
    and its stream in the capture's writer ``w``; :meth:`join` adopts what the child
    stored into ``w``."""

    def __init__(
        self, proc: subprocess.Popen[bytes] | ForkedChild, w: Any, progress: Progress
    ) -> None:
        self._proc = proc
        self._w = w
        self._progress = progress
        self.results: dict[str, DiskRead] = {}
        self.errors: list[BaseException] = []
        self._sinks: dict[str, Any] = {}
        self._tables: dict[str, bytes] = {}
        self._tasks: dict[int, Task] = {}
        self._published: list[str] | None = None
        self._aborted: str | None = None
        self._chunk_size: int | None = None
        self._ended = False  # "end" sent, or the input closed
        self._cancelled = False
        assert proc.stdin is not None
        self._to_child = _Channel(proc.stdin)
        self._reader = threading.Thread(target=self._read, name="disk-process", daemon=True)
        self._reader.start()

    @classmethod
    def spawn(
        cls, location: str, w: Any, progress: Progress, forked: ForkedChild | None = None
    ) -> DiskProcess:
        """Start the child and send it the repository to open: ``location``, with the
        key material ``w``'s repository was unlocked with (encrypted repositories).  The
        child then does not derive the key again from the passphrase (scrypt: 0.43 s of
        CPU here, taken from the memory path of the capture).  The key goes through the
        child's stdin pipe, as the passphrase would, never through its arguments or
        environment.  ``forked``: the child :func:`fork_reader` made, used unless it was
        claimed or dismissed already.  Raises OSError when a child cannot be started."""
        proc: subprocess.Popen[bytes] | ForkedChild
        if forked is not None and forked.claim():
            proc = forked
        else:
            # The child imports this vmarchive, wherever it was imported from: its
            # directory first on the path for that import only (kept there, a
            # site-packages directory would shadow the standard library; the package's
            # own path serves the rest).
            root = os.path.dirname(os.path.dirname(os.path.abspath(vmarchive.__file__)))
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, root],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        levels = {
            name: lg.level
            for name, lg in logging.root.manager.loggerDict.items()
            if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
        }
        levels[""] = logging.root.level
        try:
            self = cls(proc, w, progress)
        except BaseException:  # no thread to read it: it goes
            proc.kill()
            proc.wait()
            raise
        key = w.repo.codecs.key
        secret = None if key is None else key.raw.hex()
        self._to_child.send({"open": {"repo": location, "key": secret, "log": levels}})
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- the capture's side --------------------------------------------------------------
    def start(
        self,
        target: str,
        sink: Any,
        *,
        socket: str,
        export: str,
        bitmap: str | None = None,
        parent_table: bytes | None = None,
    ) -> None:
        """Have the child read ``export`` (NBD, unix socket ``socket``) for ``sink``, the
        disk's stream in the capture's writer: in full, or (``bitmap`` and
        ``parent_table``) what the bitmap marks dirty."""
        self._sinks[target] = sink
        disk = {
            "target": target,
            "socket": socket,
            "export": export,
            "size": sink.size,
            "bitmap": bitmap,
            "parent_table": None
            if parent_table is None
            else base64.b64encode(parent_table).decode("ascii"),
        }
        self._to_child.send({"disk": disk})

    def end_input(self) -> None:
        """No more disks: the child publishes once it has read them."""
        if not self._ended:
            self._ended = True
            self._to_child.send({"end": True})

    def cancel(self) -> None:
        """Stop the reads: the end of its input tells the child to abort its writer
        (:meth:`join` waits for it)."""
        self._cancelled = True
        self._ended = True
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()

    def join(self) -> None:
        """Wait for the child; then, unless cancelled or failed, adopt its index objects
        into the writer and its slot tables into the disks' streams.  Errors are kept in
        :attr:`errors` (:meth:`raise_first`)."""
        self.end_input()
        if self._cancelled:
            self._wait(_CANCEL_WAIT)
            return
        self._wait(None)
        if self.errors:
            return
        if self._published is None:
            why = self._aborted or f"ended without a result (exit status {self._proc.returncode})"
            self.errors.append(VmarchiveError(f"disk reader process {why}"))
            return
        try:
            self._w.adopt_index(self._published)
            for target, sink in self._sinks.items():
                table = self._tables[target]
                nslots = -(-int(sink.size) // int(sink.chunk_size))
                if self._chunk_size != sink.chunk_size or len(table) != 16 * nslots:
                    raise VmarchiveError(
                        f"disk {target}: the disk reader process's slot table does not fit"
                    )
                sink.set_chunks(table, range(nslots))
        except BaseException as e:
            log.debug("adopting the disk reader's chunks failed", exc_info=True)
            self.errors.append(e)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]

    def _wait(self, timeout: float | None) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("disk reader process did not stop; killing it")
            self._proc.kill()
            self._proc.wait()
        self._reader.join()
        for stream in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def _read(self) -> None:
        out = self._proc.stdout
        assert out is not None
        for raw in out:
            try:
                msg = json.loads(raw)
            except ValueError:
                log.debug("disk reader process: %r", raw[:200])
                continue
            try:
                self._dispatch(msg)
            except Exception:  # a malformed message: the result decides
                log.debug("disk reader process message %r", msg, exc_info=True)
        for task in self._tasks.values():
            task.close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "advance" in msg:
            self._tasks[int(msg["advance"])].advance(int(msg["n"]))
        elif "task" in msg:
            total = msg.get("total")
            self._tasks[int(msg["task"])] = self._progress.task(
                str(msg["name"]), None if total is None else int(total), str(msg["unit"])
            )
        elif "total" in msg:
            total = msg.get("n")
            self._tasks[int(msg["total"])].set_total(None if total is None else int(total))
        elif "close" in msg:
            task = self._tasks.pop(int(msg["close"]), None)
            if task is not None:
                task.close()
        elif "ready" in msg:
            self._chunk_size = int(msg["ready"]["chunk_size"])
        elif "done" in msg:
            target = str(msg["done"])
            self.results[target] = DiskRead(**msg["read"])
            self._tables[target] = base64.b64decode(msg["table"])
        elif "failed" in msg:
            self.errors.append(_error_of(msg["error"]))
        elif "published" in msg:
            self._published = [str(n) for n in msg["published"]]
        elif "aborted" in msg:
            self._aborted = str(msg["aborted"])


# -- the child ---------------------------------------------------------------------------
class _PipeTask:
    def __init__(self, ch: _Channel, tid: int) -> None:
        self._ch = ch
        self._id = tid
        self._pending = 0
        self._last = time.monotonic()

    def advance(self, n: int) -> None:
        self._pending += n
        now = time.monotonic()
        if now - self._last >= _PROGRESS_EVERY:
            self._flush(now)

    def _flush(self, now: float) -> None:
        if self._pending:
            self._ch.send({"advance": self._id, "n": self._pending})
            self._pending = 0
        self._last = now

    def set_total(self, total: int | None) -> None:
        self._ch.send({"total": self._id, "n": total})

    def close(self) -> None:
        self._flush(time.monotonic())
        self._ch.send({"close": self._id})


class _PipeProgress:
    def __init__(self, ch: _Channel) -> None:
        self._ch = ch
        self._ids = itertools.count()

    def task(self, name: str, total: int | None = None, unit: str = "B") -> Task:
        tid = next(self._ids)
        self._ch.send({"task": tid, "name": name, "total": total, "unit": unit})
        return _PipeTask(self._ch, tid)


def _read_one(
    w: Any, disk: dict[str, Any], progress: Progress, cancelled: Callable[[], bool]
) -> tuple[DiskRead, bytes]:
    target = str(disk["target"])
    sink = w.stream(f"disk:{target}", "disk", int(disk["size"]))
    if disk.get("bitmap") and disk.get("parent_table") is not None:
        # only here: capture_incr imports libvirt, ~20 ms of a child that reads in full
        from vmarchive.ops.capture_incr import read_disk_incremental

        r = read_disk_incremental(
            disk["socket"],
            disk["export"],
            sink,
            target,
            progress,
            str(disk["bitmap"]),
            base64.b64decode(disk["parent_table"]),
            zero_id=w.zero_id,
            parent_chunk=w.read_chunk,
            cancelled=cancelled,
        )
    else:
        r = read_disk(disk["socket"], disk["export"], sink, target, progress, cancelled=cancelled)
    r.bytes_stored = int(sink.close().bytes_new)
    return r, sink.table()


def child_main(inp: IO[bytes], out: IO[bytes]) -> int:
    """The child: see the module's docstring.  Returns its exit status."""
    from vmarchive.store import Repository

    ch = _Channel(out)
    first = inp.readline()
    if not first:
        return 0  # the capture ended before it needed us
    opened = json.loads(first)["open"]
    for name, level in dict(opened.get("log") or {}).items():
        logging.getLogger(name or None).setLevel(int(level))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    stop = threading.Event()  # the reads stop: cancelled, or one of them failed
    cancelled = threading.Event()

    def cancel() -> None:
        cancelled.set()
        stop.set()

    signal.signal(signal.SIGTERM, lambda _s, _f: cancel())
    try:
        secret = opened.get("key")  # the parent's KeyMaterial.raw, hex
        key = None if secret is None else KeyMaterial.from_raw(bytes.fromhex(str(secret)))
        repo = Repository.open(str(opened["repo"]), key=key)
        w = repo.writer()
    except Exception as e:
        ch.send({"aborted": f"cannot open the repository: {e}"})
        return 1
    ch.send({"ready": {"chunk_size": repo.codecs.default_chunk_size("disk")}})
    progress = _PipeProgress(ch)
    failed = threading.Event()
    threads: list[threading.Thread] = []

    def read(disk: dict[str, Any]) -> None:
        target = str(disk["target"])
        try:
            r, table = _read_one(w, disk, progress, stop.is_set)
            table64 = base64.b64encode(table).decode("ascii")
            ch.send({"done": target, "read": dataclasses.asdict(r), "table": table64})
        except BaseException as e:
            log.debug("disk %s failed", target, exc_info=True)
            failed.set()
            stop.set()
            ch.send({"failed": target, "error": {"type": type(e).__name__, "message": str(e)}})

    def listen() -> None:
        # "disk" lines until "end"; then only the end of the input matters
        ended = False
        for raw in inp:
            msg = json.loads(raw)
            if "disk" in msg and not ended:
                t = threading.Thread(target=read, args=(msg["disk"],), name="disk-read")
                threads.append(t)
                t.start()
            elif "end" in msg:
                ended = True
                got_end.set()
        cancel()  # the input ended: cancelled, or the capture is gone
        got_end.set()

    got_end = threading.Event()
    threading.Thread(target=listen, name="disk-process-input", daemon=True).start()
    with w:
        while not got_end.wait(0.1):  # in slices: SIGTERM's handler runs between them
            pass
        for t in list(threads):
            while t.is_alive():
                t.join(0.1)
        if stop.is_set():
            w.abort()
            ch.send({"aborted": "cancelled" if cancelled.is_set() else "a disk read failed"})
            return 0
        names = w.publish_chunks()
    ch.send({"published": names})
    return 0


def _run_child(inp: IO[bytes], out: IO[bytes]) -> NoReturn:
    """The child's life, spawned or forked: :func:`child_main`, then out at once."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the capture stops us as it cleans up
    try:
        code = child_main(inp, out)
    except BaseException as e:  # reported on the channel when it can be; never a traceback
        with contextlib.suppress(Exception):
            _Channel(out).send({"aborted": f"{type(e).__name__}: {e}"})
        code = 1
    # Out at once: the thread reading the input may be inside a read, which the
    # interpreter's shutdown would wait for (and abort on); a forked child must not run
    # the capture's exit handlers either.  Nothing is left to flush but the log, and the
    # writer is done (published or aborted).
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    """The spawned child's entry point (``_CHILD``)."""
    _run_child(sys.stdin.buffer, sys.stdout.buffer)
