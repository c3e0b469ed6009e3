"""Forensic commands: ``export-memory``, ``export-disk``, ``serve`` and ``diff`` (read
archives only)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vmarchive.cli.app import app, fmt_bytes, print_json, repo_option
from vmarchive.cli.capture import progress_bars
from vmarchive.cli.repo import repo_ref
from vmarchive.ops.diff import DiffResult, StreamDiff, diff
from vmarchive.ops.export import (
    DiskFormat,
    ExportDiskOptions,
    ExportMemoryOptions,
    ExportResult,
    MemoryFormat,
    export_disk,
    export_memory,
)

_REPO = repo_option()
_FORCE = typer.Option(False, "--force", help="Replace the output file if it exists.")
_JSON = typer.Option(False, "--json", help="Print one JSON object.")
_NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bar.")
_OUTPUT = typer.Option(..., "--output", "-o", help="File to write.")
_MEMORY_FORMAT = typer.Option(
    MemoryFormat.ELF,
    "--format",
    case_sensitive=False,
    help="elf: x86-64 core like QEMU's dump-guest-memory; raw: sparse image by guest-physical"
    " address.",
)
_DISK_FORMAT = typer.Option(
    DiskFormat.RAW, "--format", case_sensitive=False, help="raw (sparse) or qcow2."
)
_DISK = typer.Option(..., "--disk", help="Disk target, e.g. vda.")
_EXACT = typer.Option(
    False, "--exact", help="Read the changed chunks of both archives: report changed 4 KiB pages."
)


def _print_export(r: ExportResult) -> None:
    typer.echo(f"{r.output}: {r.format}, {fmt_bytes(r.size)} ({fmt_bytes(r.data_bytes)} of data)")
    typer.echo(f"  archive  {r.archive}")
    if r.vcpus is not None:
        typer.echo(f"  vcpus    {r.vcpus}")
    for s in r.segments:
        if "start" in s:
            typer.echo(
                f"  {s['start']:#014x}-{s['start'] + s['size'] - 1:#014x}  {s['block']}"
                f" @{s['offset']:#x}  ({fmt_bytes(s['size'])})"
            )


@app.command("export-memory")
def export_memory_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    output: Path = _OUTPUT,
    fmt: MemoryFormat = _MEMORY_FORMAT,
    force: bool = _FORCE,
    repo: str = _REPO,
    json_out: bool = _JSON,
    no_progress: bool = _NO_PROGRESS,
) -> None:
    """Write an archive's guest memory as an ELF core or a raw physical image."""
    opts = ExportMemoryOptions(repo_ref(repo), archive, output, fmt, force)
    r = export_memory(opts, progress_bars(json_out or no_progress))
    if json_out:
        print_json(r.to_json())
    else:
        _print_export(r)


@app.command("export-disk")
def export_disk_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    disk: str = _DISK,
    output: Path = _OUTPUT,
    fmt: DiskFormat = _DISK_FORMAT,
    force: bool = _FORCE,
    repo: str = _REPO,
    json_out: bool = _JSON,
    no_progress: bool = _NO_PROGRESS,
) -> None:
    """Write one archived disk as a sparse raw or a qcow2 image."""
    opts = ExportDiskOptions(repo_ref(repo), archive, disk, output, fmt, force)
    r = export_disk(opts, progress_bars(json_out or no_progress))
    if json_out:
        print_json(r.to_json())
    else:
        _print_export(r)


_SOCKET = typer.Option(None, "--socket", help="Unix socket to listen on (mode 0600).")
_SERVE_DISKS = typer.Option([], "--disk", help="Disk target to serve (repeatable; default: all).")


@app.command("serve")
def serve_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    socket_path: Path = _SOCKET,
    listen: str = typer.Option(
        None, "--listen", help="TCP [HOST:]PORT to listen on (HOST default: localhost)."
    ),
    disks: list[str] = _SERVE_DISKS,
    repo: str = _REPO,
    json_out: bool = _JSON,
) -> None:
    """Serve ARCHIVE's disks read-only over NBD until Ctrl-C (no TLS, no authentication).

    Each disk is an export named by its target: mount one with
    qemu-nbd -r -c /dev/nbd0 'nbd+unix:///vda?socket=PATH', or read it with qemu-img,
    guestmount, nbdinfo... Reads come straight from the repository, verified.
    """
    import signal

    from vmarchive.errors import UsageError
    from vmarchive.ops import serve

    if (socket_path is None) == (listen is None):
        raise UsageError("give --socket PATH or --listen [HOST:]PORT (one of them)")
    tcp = serve.parse_listen(listen) if listen is not None else None
    sock = str(socket_path.absolute()) if socket_path is not None else None
    with serve.open_server(repo_ref(repo), archive, disks) as srv:
        if sock is not None:
            listener = serve.unix_listener(sock)
        else:
            assert tcp is not None
            listener = serve.tcp_listener(*tcp)
        with listener as ls:
            uris = {
                e.name: serve.export_uri(e.name, socket_path=sock, tcp=tcp) for e in srv.exports
            }
            if json_out:
                print_json(
                    {
                        "archive": srv.archive.id,
                        "exports": [{**e.to_json(), "uri": uris[e.name]} for e in srv.exports],
                    }
                )
            else:
                typer.echo(f"serving archive {srv.archive.id[:12]} read-only (Ctrl-C stops)")
                for e in srv.exports:
                    typer.echo(f"  {e.name:<6} {fmt_bytes(e.size):>10}  {uris[e.name]}")
            sys.stdout.flush()
            signal.signal(signal.SIGTERM, lambda _s, _f: srv.stop())
            try:
                srv.serve(ls)
            except KeyboardInterrupt:
                srv.stop()
    if not json_out:
        typer.echo("stopped")


def _print_stream_diffs(title: str, diffs: list[StreamDiff]) -> None:
    for d in diffs:
        where = ""
        if d.size_a is None:
            where = " (only in B)"
        elif d.size_b is None:
            where = " (only in A)"
        elif d.size_a != d.size_b:
            where = f" (size {fmt_bytes(d.size_a)} -> {fmt_bytes(d.size_b)})"
        typer.echo(
            f"{title} {d.name}{where}: {len(d.changed)} changed ranges, {fmt_bytes(d.changed_bytes)}"
            f" (granularity {fmt_bytes(d.granularity)})"
        )
        for e in d.changed:
            typer.echo(f"  {e.offset:#014x}-{e.end - 1:#014x}  {fmt_bytes(e.length)}")


def _print_diff(r: DiffResult) -> None:
    typer.echo(f"A {r.a}")
    typer.echo(f"B {r.b}")
    for n in r.notes:
        typer.echo(f"note: {n}")
    if r.physical is not None:
        total = sum(p.length for p in r.physical)
        typer.echo(f"guest-physical memory: {len(r.physical)} changed ranges, {fmt_bytes(total)}")
        for p in r.physical:
            typer.echo(
                f"  {p.address:#014x}-{p.address + p.length - 1:#014x}  {fmt_bytes(p.length)}"
                f"  ({p.block} @{p.offset:#x})"
            )
    _print_stream_diffs("RAM block", r.memory)
    _print_stream_diffs("disk", r.disks)
    if r.devstate_changed is not None:
        typer.echo(f"device state: {'changed' if r.devstate_changed else 'unchanged'}")


@app.command("diff")
def diff_cmd(
    archive_a: str = typer.Argument(..., help="The earlier archive (id, prefix, DOMAIN@latest~N)."),
    archive_b: str = typer.Argument(..., help="The later archive (id, prefix, DOMAIN@latest)."),
    exact: bool = _EXACT,
    repo: str = _REPO,
    json_out: bool = _JSON,
) -> None:
    """Which guest-physical memory ranges and disk extents differ between two archives.

    The answer comes from the manifests alone, at chunk granularity; --exact reads the
    changed chunks to narrow it to 4 KiB pages."""
    r = diff(repo_ref(repo), archive_a, archive_b, exact)
    if json_out:
        print_json(r.to_json())
    else:
        _print_diff(r)
