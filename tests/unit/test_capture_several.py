"""Several domains in one capture command: the loop's rules (pure; the captures themselves
are run against QEMU in tests/integration/test_capture.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmarchive.errors import (
    HostPreconditionError,
    HypervisorError,
    InterruptedError_,
    RepositoryError,
    UsageError,
)
from vmarchive.ops.capture import CaptureResult
from vmarchive.ops.capture_several import (
    CaptureFailure,
    Outcome,
    check_selection,
    run_each,
)


def _result(name: str) -> CaptureResult:
    return CaptureResult(
        id=f"id-{name}",
        domain=name,
        mode="snapshot",
        kind="full",
        guest_pause_ms=5.0,
        bytes_read=1,
        bytes_stored=1,
        duration_s=0.1,
    )


def _runner(fail: dict[str, BaseException]) -> tuple[list[str], object]:
    ran: list[str] = []

    def one(name: str) -> CaptureResult:
        ran.append(name)
        if name in fail:
            raise fail[name]
        return _result(name)

    return ran, one


def test_every_domain_is_tried_and_failures_keep_their_code() -> None:
    ran, one = _runner(
        {
            "b": HypervisorError("b failed"),
            "d": HostPreconditionError("d cannot"),
            "e": RuntimeError("a bug"),
        }
    )
    seen: list[Outcome] = []
    r = run_each(["a", "b", "c", "d", "e", "f"], str, one, seen.append)  # type: ignore[arg-type]
    assert ran == ["a", "b", "c", "d", "e", "f"]
    assert seen == r.outcomes, "each outcome is reported as it comes, in order"
    assert [c.domain for c in r.captures] == ["a", "c", "f"]
    assert [(f.domain, f.exit_code) for f in r.failures] == [("b", 5), ("d", 7), ("e", 1)]
    assert r.failures[2].message.startswith("internal error: RuntimeError: a bug")
    assert r.exit_code == 5, "the first failure's code"
    assert not r.interrupted and r.skipped == []
    j = r.to_json()
    assert [c["id"] for c in j["captures"]] == ["id-a", "id-c", "id-f"]
    assert j["failures"][0] == {"domain": "b", "error": "b failed", "exit_code": 5}


def test_all_succeeding_exits_zero() -> None:
    _ran, one = _runner({})
    r = run_each(["a", "b"], str, one)  # type: ignore[arg-type]
    assert r.exit_code == 0 and len(r.captures) == 2 and r.failures == []


def test_a_repository_error_does_not_stop_the_others() -> None:
    ran, one = _runner({"a": RepositoryError("repository locked")})
    r = run_each(["a", "b"], str, one)  # type: ignore[arg-type]
    assert ran == ["a", "b"] and r.exit_code == 3


@pytest.mark.parametrize(
    "interrupt", [InterruptedError_("capture interrupted"), KeyboardInterrupt()]
)
def test_an_interrupt_stops_after_the_domain_it_hit(interrupt: BaseException) -> None:
    ran, one = _runner({"b": HypervisorError("b failed"), "c": interrupt})
    r = run_each(["a", "b", "c", "d", "e"], str, one)  # type: ignore[arg-type]
    assert ran == ["a", "b", "c"]
    assert r.interrupted and r.skipped == ["d", "e"]
    assert r.exit_code == 6, "an interrupt wins over the failures before it"
    assert isinstance(r.outcomes[2], CaptureFailure) and r.outcomes[2].exit_code == 6
    assert r.to_json()["skipped"] == ["d", "e"]


@pytest.mark.parametrize(
    ("names", "all_active", "exclude", "says"),
    [
        ((), False, (), "name a domain"),
        (("a",), True, (), "not both"),
        (("a",), False, ("b",), "--exclude goes with --all"),
    ],
)
def test_selection_errors(
    names: tuple[str, ...], all_active: bool, exclude: tuple[str, ...], says: str
) -> None:
    with pytest.raises(UsageError, match=says):
        check_selection(names, all_active, exclude)


def test_valid_selections_pass() -> None:
    check_selection(("a",), False, ())
    check_selection(("a", "b"), False, ())
    check_selection((), True, ())
    check_selection((), True, ("a",))


@pytest.mark.parametrize(
    "args",
    [
        ["capture", "--repo", "/nonexistent"],
        ["capture", "--all", "web01", "--repo", "/nonexistent"],
        ["capture", "web01", "--exclude", "web02", "--repo", "/nonexistent"],
    ],
)
def test_cli_selection_errors_come_before_the_repository(args: list[str]) -> None:
    # A missing repository would be exit 3: the usage error is found first.
    p = subprocess.run(
        [sys.executable, "-m", "vmarchive", *args], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmarchive: "), p.stderr
