"""vmarchive.hypervisor.qemuproc against a fake /proc: when the capture may stop waiting."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest

from vmarchive.hypervisor.qemuproc import qemu_pid, wait_thread_blocked_writing


def task(proc: pathlib.Path, pid: int, tid: int, comm: str, wchan: str) -> pathlib.Path:
    t = proc / str(pid) / "task" / str(tid)
    t.mkdir(parents=True, exist_ok=True)
    (t / "comm").write_text(comm + "\n")
    (t / "wchan").write_text(wchan)
    return t


@pytest.mark.parametrize("name", ["bg_snapshot", "mig/snapshot"])  # QEMU <= 8, newer
@pytest.mark.parametrize(
    "wchan",
    # a unix socket (what the capture hands QEMU), the same not inlined, a pipe
    ["sock_alloc_send_pskb", "sock_wait_for_wmem", "anon_pipe_write"],
)
def test_blocked_writing_is_seen(tmp_path: pathlib.Path, name: str, wchan: str) -> None:
    task(tmp_path, 7, 7, "qemu-system-x86", "do_sys_poll")
    task(tmp_path, 7, 9, name, wchan)
    assert wait_thread_blocked_writing(7, proc=tmp_path, timeout_s=5)


def test_a_thread_elsewhere_is_not_taken_for_blocked(tmp_path: pathlib.Path) -> None:
    """Negative control: the set-up still running (or another thread writing) is not the
    gate reached; the wait ends at its timeout with False."""
    task(tmp_path, 7, 8, "CPU 0/TCG", "sock_alloc_send_pskb")
    task(tmp_path, 7, 9, "bg_snapshot", "futex_wait_queue")
    t0 = time.monotonic()
    assert not wait_thread_blocked_writing(7, proc=tmp_path, timeout_s=0.2)
    assert time.monotonic() - t0 >= 0.2


def test_waits_until_the_thread_gets_there(tmp_path: pathlib.Path) -> None:
    t = task(tmp_path, 7, 9, "bg_snapshot", "futex_wait_queue")
    timer = threading.Timer(0.1, lambda: (t / "wchan").write_text("sock_alloc_send_pskb"))
    timer.start()
    try:
        assert wait_thread_blocked_writing(7, proc=tmp_path, timeout_s=10)
    finally:
        timer.cancel()


def test_thread_that_ends_ends_the_wait(tmp_path: pathlib.Path) -> None:
    """The migration failed: the thread is gone, no waiting for the timeout."""
    t = task(tmp_path, 7, 9, "bg_snapshot", "futex_wait_queue")

    def remove_task() -> None:
        for p in t.iterdir():
            p.unlink()

    timer = threading.Timer(0.1, remove_task)
    timer.start()
    t0 = time.monotonic()
    assert not wait_thread_blocked_writing(7, proc=tmp_path, timeout_s=30)
    assert time.monotonic() - t0 < 25
    timer.join()


def test_no_such_thread_or_process(tmp_path: pathlib.Path) -> None:
    task(tmp_path, 7, 7, "qemu-system-x86", "do_sys_poll")
    assert not wait_thread_blocked_writing(7, proc=tmp_path, timeout_s=30)  # after SHOW_UP_S
    assert not wait_thread_blocked_writing(8, proc=tmp_path, timeout_s=30)  # at once


class FakeQMP:
    def __init__(self, reply: object) -> None:
        self.reply = reply

    def execute(self, command: str, arguments: object = None) -> object:
        assert command == "query-cpus-fast"
        return self.reply


def test_qemu_pid_from_a_vcpu_thread(tmp_path: pathlib.Path) -> None:
    d = tmp_path / "4242"
    d.mkdir()
    (d / "status").write_text("Name:\tCPU 0/TCG\nTgid:\t4200\nPid:\t4242\n")
    assert qemu_pid(FakeQMP([{"thread-id": 4242}]), proc=tmp_path) == 4200  # type: ignore[arg-type]
    assert qemu_pid(FakeQMP([{"thread-id": 1}]), proc=tmp_path) is None  # type: ignore[arg-type]
    assert qemu_pid(FakeQMP([]), proc=tmp_path) is None  # type: ignore[arg-type]


class NoQMP:
    def execute(self, command: str, arguments: object = None) -> object:
        raise AssertionError(f"QEMU asked for {command}")


def qemu_process(proc: pathlib.Path, pid: int, name: str) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    args = ["/usr/bin/qemu-system-x86_64", "-name", f"guest={name},debug-threads=on", "-S"]
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")


def test_qemu_pid_from_libvirts_pid_file_without_asking_qemu(tmp_path: pathlib.Path) -> None:
    """The pid file is taken when that process is this domain's QEMU; controls: another
    domain's process, a process gone, no pid file -- each falls back to the vCPUs."""
    proc, run = tmp_path / "proc", tmp_path / "run"
    run.mkdir()
    (run / "g,1.pid").write_text("4200\n")
    qemu_process(proc, 4200, "g,,1")  # libvirt doubles the comma
    assert qemu_pid(NoQMP(), proc=proc, name="g,1", run_dir=run) == 4200  # type: ignore[arg-type]

    vcpu = proc / "4343"
    vcpu.mkdir()
    (vcpu / "status").write_text("Name:\tCPU 0/TCG\nTgid:\t4300\nPid:\t4343\n")
    asked = FakeQMP([{"thread-id": 4343}])
    qemu_process(proc, 4200, "g,,10")  # a domain whose name starts alike
    assert qemu_pid(asked, proc=proc, name="g,1", run_dir=run) == 4300  # type: ignore[arg-type]
    (proc / "4200" / "cmdline").unlink()  # that process is gone
    assert qemu_pid(asked, proc=proc, name="g,1", run_dir=run) == 4300  # type: ignore[arg-type]
    assert qemu_pid(asked, proc=proc, name="other", run_dir=run) == 4300  # type: ignore[arg-type]
