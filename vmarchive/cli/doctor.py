"""`vmarchive doctor`: report in plain words (or --json) whether this host can capture."""

from __future__ import annotations

import textwrap

import typer

from vmarchive.cli.app import app, print_json
from vmarchive.errors import HostPreconditionError
from vmarchive.ops.doctor import DEFAULT_URI, DoctorOptions, DoctorReport, Status, run_doctor

_INDENT = " " * 7
_MARK = {Status.OK: "ok  ", Status.WARN: "warn", Status.FAIL: "FAIL"}


def render(report: DoctorReport, width: int = 88) -> str:
    """The report as text: one line per check, then its explanation and what to do."""
    lines: list[str] = []
    for c in report.checks:
        lines.append(f"[{_MARK[c.status]}] {c.name}: {c.summary}")
        texts = [c.explanation]
        if c.status is not Status.OK and c.action:
            texts.append("what to do: " + c.action)
        for text in filter(None, texts):
            lines.extend(
                textwrap.wrap(text, width, initial_indent=_INDENT, subsequent_indent=_INDENT)
            )
    lines.append("")
    lines.append(
        "capture is possible on this host" if report.ok else "capture is NOT possible on this host"
    )
    return "\n".join(lines)


@app.command()
def doctor(
    connect: str = typer.Option(DEFAULT_URI, "--connect", "-c", help="libvirt URI."),
    qemu: str | None = typer.Option(
        None, "--qemu", help="QEMU binary to check (default: the one libvirt uses)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check whether this host can capture guests, and explain what is missing."""
    report = run_doctor(DoctorOptions(uri=connect, qemu_binary=qemu))
    if json_out:
        print_json(report.to_dict())
    else:
        typer.echo(render(report))
    if not report.ok:
        failed = ", ".join(c.name for c in report.checks if c.status is Status.FAIL)
        raise HostPreconditionError(
            f"this host cannot capture guests (failed: {failed}); see the report above",
            failed=failed,
        )
