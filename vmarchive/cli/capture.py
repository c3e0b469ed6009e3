"""`vmarchive capture DOMAIN`: archive a guest's RAM, devices and disks at one instant."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import typer

from vmarchive.cli.app import (
    app,
    fmt_bytes,
    limit_malloc_arenas,
    need_repo,
    print_json,
    repo_option,
)
from vmarchive.errors import UsageError
from vmarchive.ops.capture import DEFAULT_URI, CaptureOptions, CaptureResult, Mode, capture
from vmarchive.ops.capture_incr import untrack
from vmarchive.ops.capture_several import CaptureFailure, Outcome, capture_several
from vmarchive.progress import NULL_PROGRESS, Progress, Task


class _TqdmTask:
    def __init__(self, bar: Any, lock: threading.Lock) -> None:
        self._bar = bar
        self._lock = lock

    def advance(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._bar.close()


class TqdmProgress:
    """One tqdm bar per task (memory, each disk), stacked; thread-safe."""

    def __init__(self, prefix: str = "") -> None:
        self._lock = threading.Lock()
        self._position = 0
        self._prefix = prefix

    def task(self, name: str, total: int | None = None, unit: str = "B") -> Task:
        # Imported with the first bar: runs without bars (--no-progress, cron, --json)
        # skip its 20 ms of imports.
        from tqdm import tqdm

        with self._lock:
            bar = tqdm(
                total=total,
                desc=self._prefix + name,
                unit=unit,
                unit_scale=True,
                unit_divisor=1024,
                position=self._position,
                leave=True,
                dynamic_ncols=True,
            )
            self._position += 1
        return _TqdmTask(bar, self._lock)


def progress_bars(quiet: bool, prefix: str = "") -> Progress:
    """Progress bars where someone watches: none with ``quiet`` (--json, --no-progress) or
    when stderr is not a terminal (cron, a log file, a pipe), where the bars' carriage
    returns and cursor moves would only clutter the log."""
    if quiet or not sys.stderr.isatty():
        return NULL_PROGRESS
    return TqdmProgress(prefix)


def _print_text(r: CaptureResult) -> None:
    pause = "n/a" if r.guest_pause_ms is None else f"{r.guest_pause_ms:.1f} ms"
    typer.echo(f"archive {r.id}")
    typer.echo(f"  domain       {r.domain} ({r.kind}, mode {r.mode})")
    typer.echo(f"  parent       {r.parent or 'none (full read)'}")
    typer.echo(f"  guest pause  {pause}")
    typer.echo(f"  read         {fmt_bytes(r.bytes_read)}")
    typer.echo(f"  stored new   {fmt_bytes(r.bytes_stored)}")
    typer.echo(f"  duration     {r.duration_s:.2f} s")
    for d in r.disks:
        if d.copied:
            how = "incremental" if d.incremental else "full"
            typer.echo(
                f"  disk {d.target:<6}  {fmt_bytes(d.size)} {how}, read {fmt_bytes(d.bytes_read)},"
                f" from parent {fmt_bytes(d.bytes_referenced)}, new {fmt_bytes(d.bytes_stored)}"
            )
            if d.fallback_reason:
                typer.echo(f"               full read because {d.fallback_reason}")
        else:
            typer.echo(f"  disk {d.target:<6}  not copied: {d.reason}")
    hp = r.huge_pages
    if hp and hp.get("remapped_mib"):
        more = " (time budget spent: khugepaged does the rest)" if hp.get("cut_short") else ""
        typer.echo(
            f"  huge pages   {hp['remapped_mib']:.0f} MiB of guest RAM remapped"
            f" in {hp['seconds']:.2f} s{more}"
        )
    elif hp and hp.get("skipped"):
        typer.echo(f"  huge pages   not remapped: {hp['skipped']}")
    if r.memory_format and r.memory_format != "parsed":
        typer.echo(f"  memory       stored as an opaque stream ({r.memory_format})")


_MODE_OPTION = typer.Option(
    Mode.AUTO,
    "--mode",
    case_sensitive=False,
    metavar="<mode>",
    help="auto, snapshot or switchover; auto takes snapshot where it works, else switchover.",
)
_TAG_OPTION = typer.Option([], "--tag", help="Tag the archive (repeatable).")
_DOMAINS_ARGUMENT = typer.Argument(
    None, help="Domain names or UUIDs, captured one after the other.", show_default=False
)
_EXCLUDE_OPTION = typer.Option(
    [], "--exclude", help="With --all: leave this domain out (repeatable)."
)


@app.command("capture")
def capture_cmd(
    domains: list[str] = _DOMAINS_ARGUMENT,
    all_active: bool = typer.Option(
        False, "--all", help="Capture every running or paused domain (by name)."
    ),
    exclude: list[str] = _EXCLUDE_OPTION,
    connect: str = typer.Option(DEFAULT_URI, "--connect", "-c", help="libvirt URI."),
    repo: str | None = repo_option(),
    mode: Mode = _MODE_OPTION,
    tag: list[str] = _TAG_OPTION,
    bandwidth: float = typer.Option(
        None, "--bandwidth", help="Migration bandwidth cap in MiB/s (default: unlimited)."
    ),
    auto_converge: bool = typer.Option(
        False, "--auto-converge", help="Switchover mode: throttle a guest that dirties RAM fast."
    ),
    full: bool = typer.Option(
        False, "--full", help="Read every disk in full even when an incremental is possible."
    ),
    no_remap_huge_pages: bool = typer.Option(
        False,
        "--no-remap-huge-pages",
        help="Snapshot mode: leave guest RAM as QEMU's write tracking split it.  By default"
        " it is mapped with huge pages again afterwards, which keeps the next pause from"
        " growing with RAM (Linux 6.1, root).",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Archive each DOMAIN's memory, device state and disks, all at one instant.

    With several domains (or --all) a domain that fails does not stop the others; the
    exit code is then that of the first one that failed (0 when none did).
    """
    domains = list(domains or [])
    repo = need_repo(repo)
    if bandwidth is not None and bandwidth <= 0:
        raise UsageError("--bandwidth must be positive")
    opts = CaptureOptions(
        domain=domains[0] if len(domains) == 1 else "",
        repo=repo,
        uri=connect,
        mode=mode,
        tags=tuple(tag),
        bandwidth_mib_s=bandwidth,
        auto_converge=auto_converge,
        full=full,
        remap_huge_pages=not no_remap_huge_pages,
        passphrase=os.environ.get("VMARCHIVE_PASSPHRASE"),
    )
    limit_malloc_arenas()
    if len(domains) == 1 and not all_active and not exclude:
        result = capture(opts, progress_bars(json_out or no_progress))
        if json_out:
            print_json(result.to_json())
        else:
            _print_text(result)
        return
    _capture_several(opts, domains, all_active, exclude, json_out, no_progress)


def _capture_several(
    opts: CaptureOptions,
    domains: list[str],
    all_active: bool,
    exclude: list[str],
    json_out: bool,
    no_progress: bool,
) -> None:
    def progress_for(name: str) -> Progress:
        return progress_bars(json_out or no_progress, f"{name} ")

    def show(o: Outcome) -> None:
        if isinstance(o, CaptureFailure):
            typer.echo(f"vmarchive: {o.domain}: {o.message}", err=True)
        elif not json_out:
            _print_text(o)
            typer.echo()

    r = capture_several(
        opts,
        domains,
        all_active=all_active,
        exclude=exclude,
        progress_for=progress_for,
        on_outcome=show,
    )
    if json_out:
        print_json(r.to_json())
    else:
        n = len(r.outcomes) + len(r.skipped)
        if n == 0:
            typer.echo("no running or paused domain to capture")
        else:
            failed = [f.domain for f in r.failures]
            line = f"{len(r.captures)} of {n} domains captured"
            if failed:
                line += f"; failed: {', '.join(failed)}"
            if r.skipped:
                line += f"; not reached: {', '.join(r.skipped)}"
            typer.echo(line)
    if r.exit_code:
        raise typer.Exit(r.exit_code)


@app.command("untrack")
def untrack_cmd(
    domain: str = typer.Argument(..., help="Domain name or UUID."),
    connect: str = typer.Option(DEFAULT_URI, "--connect", "-c", help="libvirt URI."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Remove vmarchive's dirty bitmaps (every repository's) from DOMAIN's disks; the next
    capture into each repository reads in full."""
    r = untrack(domain, connect)
    if json_out:
        print_json(r.to_json())
        return
    for where, name in r.removed:
        typer.echo(f"removed {name} from {where}")
    if not r.removed:
        typer.echo(f"no vmarchive bitmaps on {r.domain}")
