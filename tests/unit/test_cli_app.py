"""The CLI's contract with users: one line on error, documented exit codes, no tracebacks."""

import itertools
import subprocess
import sys

import pytest

import vmarchive


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmarchive", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"vmarchive {vmarchive.__version__}"


def test_unknown_command_is_a_usage_error_without_traceback() -> None:
    r = run("no-such-command")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "No such command" in r.stderr


def test_bad_option_is_a_usage_error() -> None:
    r = run("doctor", "--no-such-option")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_s3_endpoint_option_reaches_the_store() -> None:
    # Negative control built in: without the option the store would use AWS's default
    # endpoint, so the URL in the message proves the option was applied.
    import os

    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_MAX_ATTEMPTS": "1",
        "VMARCHIVE_CACHE_DIR": "off",
    }
    env.pop("VMARCHIVE_S3_ENDPOINT", None)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmarchive",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "list",
            "--repo",
            "s3://nobucket/x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 3
    assert "http://127.0.0.1:9/" in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1  # never reached: not waited for, one line


def test_each_command_is_registered_by_the_module_main_imports_for_it() -> None:
    """main() imports only the module of the command it runs (COMMAND_MODULES)."""
    from vmarchive.cli.app import COMMAND_MODULES, app, command_name, load_commands

    load_commands()
    registered = {
        (c.name or c.callback.__name__.replace("_", "-")): c.callback.__module__
        for c in app.registered_commands
        if c.callback is not None
    }
    assert registered == {n: f"vmarchive.cli.{m}" for n, m in COMMAND_MODULES.items()}
    assert command_name(["--debug", "--s3-endpoint", "http://x", "list", "--json"]) == "list"
    assert command_name(["--help"]) is None


def test_a_command_runs_with_only_its_module_loaded() -> None:
    code = (
        "import sys; from vmarchive.cli.app import load_commands; load_commands(['list']);"
        "print(sorted(m for m in sys.modules if m.startswith('vmarchive.cli.')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "vmarchive.cli.repo" in r.stdout and "vmarchive.cli.restore" not in r.stdout
    # and help still lists every command (all modules loaded)
    h = run("--help")
    assert h.returncode == 0
    for name in ("capture", "restore", "export-memory", "gc", "doctor"):
        assert name in h.stdout


@pytest.mark.parametrize(("command", "expect"), [("list", False), ("capture", True)])
def test_repository_commands_start_without_libvirt(command: str, expect: bool) -> None:
    """list, info, verify... never talk to libvirt: loading them must not import it (nor
    the QMP client with asyncio), ~40 ms of every such command's start.  The control:
    capture's module does import libvirt (qemu.qmp only for an error reply, see below)."""
    code = (
        f"import sys; from vmarchive.cli.app import load_commands; load_commands([{command!r}]);"
        "print(sorted(m for m in ('libvirt', 'qemu.qmp') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("['libvirt']" if expect else "[]")


# -- the process entry: run() leaves without the interpreter's teardown -----------------------

#: a script run as the process: ``vmarchive --version`` through run(), plus what the
#: parametrised case adds (an exit handler, a global whose __del__ runs at teardown, a
#: non-daemon thread)
_ENTRY = """
import atexit, sys, threading, time
from vmarchive.cli.app import run

class Loud:
    def __del__(self):
        print("teardown ran", flush=True)

if "handler" in sys.argv:
    atexit.register(print, "exit handler ran")
if "teardown" in sys.argv:
    LOUD = Loud()
if "thread" in sys.argv:
    def late():
        time.sleep(0.3)
        print("thread finished", flush=True)
    threading.Thread(target=late, daemon=False).start()
sys.argv = ["vmarchive", "--version"]
run()
"""


def _entry(*case: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _ENTRY, *case], capture_output=True, text=True, timeout=60
    )


def test_run_skips_the_teardown_but_not_the_exit_handlers() -> None:
    r = _entry("handler", "teardown")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"vmarchive {vmarchive.__version__}", "exit handler ran"]
    # Negative control: the same global's __del__ does run on an ordinary interpreter exit,
    # so its absence above shows the teardown was skipped.
    plain = subprocess.run(
        [sys.executable, "-c", "class L:\n def __del__(self): print('teardown ran')\nX = L()"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.stdout.strip() == "teardown ran"


def test_run_exits_normally_while_a_non_daemon_thread_runs() -> None:
    r = _entry("thread")
    assert r.returncode == 0, r.stderr
    # the thread was waited for: os._exit would have cut it (it prints 0.3 s later)
    assert r.stdout.splitlines() == [f"vmarchive {vmarchive.__version__}", "thread finished"]


def test_run_keeps_the_exit_code_and_delivers_output_to_a_pipe() -> None:
    # the whole help text reaches a pipe (flushed before the process leaves)
    r = run("--help")
    assert r.returncode == 0
    assert "capture" in r.stdout and len(r.stdout) > 1000
    bad = run("list", "--repo", "/nonexistent/vmarchive-test-repo")
    assert bad.returncode == 3 and bad.stdout == ""
    assert (
        bad.stderr.strip()
        == "vmarchive: no vmarchive repository at /nonexistent/vmarchive-test-repo"
    )


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), (256 + 4, 4), ("boom", 1)])
def test_exit_status_follows_python(code: object, status: int) -> None:
    from vmarchive.cli.app import exit_status

    assert exit_status(code) == status


def test_capture_starts_without_asyncio() -> None:
    # qemu.qmp's package imports asyncio (~20 ms of every start-up); the monitor commands
    # need only json, so qemu.qmp is imported for an error reply alone.
    code = "import sys, vmarchive.cli.capture; print('asyncio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
    # the control: qemu.qmp itself does import it
    code = "import sys, qemu.qmp; print('asyncio' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", r.stderr


def _helps(columns: int) -> list[tuple[str, str]]:
    """(command, its --help as rendered at ``columns``) for every command."""
    from typer.testing import CliRunner

    from vmarchive.cli.app import app, load_commands

    load_commands()
    runner = CliRunner()
    out = []
    for c in app.registered_commands:
        name = c.name or c.callback.__name__.replace("_", "-")  # type: ignore[union-attr]
        r = runner.invoke(app, [name, "--help"], env={"COLUMNS": str(columns)})
        assert r.exit_code == 0, r.output
        out.append((name, r.output))
    return out


def _description(help_text: str) -> list[str]:
    """The lines of a rendered --help between the usage line and the first panel."""
    lines = help_text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith("Usage:")) + 1
    end = next((i for i, x in enumerate(lines) if x.startswith("╭")), len(lines))
    return [x.strip() for x in lines[start:end]]


def test_help_paragraphs_fill_their_lines() -> None:
    """Each command's --help wraps its docstring's paragraphs at the terminal's width,
    not at the docstring's own line breaks (typer keeps those: a word or two were left
    alone on a line at 80 columns)."""
    import inspect

    from vmarchive.cli.app import app, load_commands

    load_commands()
    docs = [inspect.getdoc(c.callback) or "" for c in app.registered_commands if c.callback]
    # the docstrings do break their paragraphs' lines: the check below is not empty
    assert any("\n" in p.strip() for d in docs for p in d.split("\n\n"))
    for name, output in _helps(80):
        text = _description(output)
        assert any(text), name
        for line, after in itertools.pairwise(text):
            if line and after:  # within a paragraph: a filled line
                assert len(line) > 55, f"{name}: {line!r} then {after!r}"


def test_option_help_gets_room_at_100_columns() -> None:
    """The options panel leaves the help text at least half of a 100-column terminal: a
    wide metavar (``<auto|switchover|snapshot>``) or a paired flag's second name pushed
    capture's help column past column 70, 17 characters wide."""
    for name, output in _helps(100):
        (row,) = [x for x in output.splitlines() if x.lstrip("│ ").startswith("--help ")]
        assert row.index("Show this") <= 50, f"{name}: {row}"
