"""The CLI's contract with users: one line on error, documented exit codes, no tracebacks."""

import subprocess
import sys

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
