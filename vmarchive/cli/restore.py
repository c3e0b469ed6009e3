"""`vmarchive restore | clone | export-save`: resume an archived guest, clone it, or export it."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from vmarchive.cli.app import app, limit_malloc_arenas, need_repo, print_json, repo_option
from vmarchive.hypervisor.connection import DEFAULT_URI
from vmarchive.ops.restore import (
    ExportResult,
    RestoreOptions,
    RestoreResult,
    export_save,
    restore,
)


def _print(r: RestoreResult, verb: str) -> None:
    typer.echo(
        f"{verb} {r.domain} ({r.state}) from archive {r.archive[:12]} in {r.duration_s:.2f} s"
    )
    typer.echo(f"  uuid         {r.uuid}")
    if r.route == "define":
        typer.echo("  route        define: a disk-only archive (its disks and definition)")
    else:
        typer.echo(f"  route        {r.route}, stream {r.stream_bytes} bytes")
    for d in r.disks:
        typer.echo(f"  disk {d.target:<6}  {d.path} ({d.format}, {d.bytes_written} bytes written)")
    for p in r.serial_logs:
        typer.echo(f"  console log  {p}")
    if r.macs:
        down = f", {r.links_down} link(s) down" if r.links_down else ""
        typer.echo(f"  MACs         {', '.join(r.macs)}{down}")
    if r.time_note:
        typer.echo(f"  clock        {r.time_note}")
    for n in r.notes:
        typer.echo(f"  note         {n}")


_REPO = repo_option()
_CONNECT = typer.Option(DEFAULT_URI, "--connect", "-c", help="libvirt URI of the target.")
_DISK_DIR = typer.Option(
    None, "--disk-dir", help="Directory for the disk images and console logs (local target)."
)
_POOL = typer.Option(None, "--pool", help="Storage pool on the target (works over any URI).")
_OUTPUT = typer.Option(..., "--output", "-o", help="Save image to write.")
_EXPORT_DISK_DIR = typer.Option(
    None, "--disk-dir", help="Where to rebuild the disks (default: beside the image)."
)
_FMT = typer.Option(None, "--disk-format", help="raw or qcow2 (default: as archived).")
_NO_HUGEPAGES = typer.Option(
    False,
    "--no-hugepages",
    help="Ordinary RAM for a guest that had huge pages (a target without them).",
)


def _options(
    archive: str,
    repo: str | None,
    connect: str,
    name: str | None,
    disk_dir: Path | None,
    pool: str | None,
    disk_format: str | None,
    paused: bool,
    replace: bool,
    sync_time: bool,
    digests: bool,
    clone: bool = False,
    keep_network: bool = False,
    no_hugepages: bool = False,
) -> RestoreOptions:
    return RestoreOptions(
        archive=archive,
        repo=need_repo(repo),
        uri=connect,
        name=name,
        disk_dir=disk_dir,
        pool=pool,
        disk_format=disk_format,
        paused=paused,
        replace=replace,
        sync_time=sync_time,
        passphrase=os.environ.get("VMARCHIVE_PASSPHRASE"),
        clone=clone,
        keep_network=keep_network,
        digests=digests,
        no_hugepages=no_hugepages,
    )


@app.command("restore")
def restore_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    repo: str = _REPO,
    connect: str = _CONNECT,
    name: str = typer.Option(None, "--name", help="Name of the restored domain."),
    disk_dir: Path = _DISK_DIR,
    pool: str = _POOL,
    disk_format: str = _FMT,
    paused: bool = typer.Option(False, "--paused", help="Leave the guest paused."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing domain/files."),
    sync_time: bool = typer.Option(
        False, "--sync-time", help="Set the guest clock through its guest agent."
    ),
    digests: bool = typer.Option(False, "--digests", help="SHA-256 of stream and disks."),
    no_hugepages: bool = _NO_HUGEPAGES,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Resume ARCHIVE's guest where it was captured (same boot, memory, devices, disks).

    An archive of a shut-off domain (disk-only) is restored as a defined, shut-off domain.
    """
    opts = _options(
        archive, repo, connect, name, disk_dir, pool, disk_format, paused, replace, sync_time,
        digests, no_hugepages=no_hugepages,
    )  # fmt: skip
    limit_malloc_arenas()
    r = restore(opts)
    if json_out:
        print_json(r.to_json())
    else:
        _print(r, "restored")


@app.command("clone")
def clone_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    name: str | None = typer.Option(
        None,
        "--name",
        help="Name of the clone (default: DOMAIN-clone-ID with the archive id's first 8"
        " digits, or the first free of its -2, -3...).",
    ),
    repo: str = _REPO,
    connect: str = _CONNECT,
    disk_dir: Path = _DISK_DIR,
    pool: str = _POOL,
    disk_format: str = _FMT,
    keep_network: bool = typer.Option(
        False, "--keep-network", help="Keep the NICs' links up (default: down)."
    ),
    paused: bool = typer.Option(False, "--paused", help="Leave the clone paused."),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing domain/files."),
    sync_time: bool = typer.Option(False, "--sync-time", help="Set the clock via guest agent."),
    digests: bool = typer.Option(False, "--digests", help="SHA-256 of stream and disks."),
    no_hugepages: bool = _NO_HUGEPAGES,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Start an isolated copy of ARCHIVE's guest beside the original (new name, UUID, MACs)."""
    opts = _options(
        archive, repo, connect, name, disk_dir, pool, disk_format, paused, replace, sync_time,
        digests, clone=True, keep_network=keep_network, no_hugepages=no_hugepages,
    )  # fmt: skip
    limit_malloc_arenas()
    r = restore(opts)
    if json_out:
        print_json(r.to_json())
    else:
        _print(r, "cloned")


@app.command("export-save")
def export_save_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    output: Path = _OUTPUT,
    repo: str = _REPO,
    disk_dir: Path = _EXPORT_DISK_DIR,
    name: str = typer.Option(None, "--name", help="Domain name inside the image."),
    disk_format: str = _FMT,
    paused: bool = typer.Option(False, "--paused", help="The image restores paused."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite existing files."),
    no_hugepages: bool = _NO_HUGEPAGES,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Write a libvirt save image (+ its disks) that plain `virsh restore` resumes."""
    r: ExportResult = export_save(
        archive,
        need_repo(repo),
        output,
        disk_dir=disk_dir,
        name=name,
        disk_format=disk_format,
        replace=replace,
        paused=paused,
        passphrase=os.environ.get("VMARCHIVE_PASSPHRASE"),
        no_hugepages=no_hugepages,
    )
    if json_out:
        print_json(r.to_json())
        return
    typer.echo(f"wrote {r.path} ({r.bytes} bytes) for domain {r.domain}")
    for d in r.disks:
        typer.echo(f"  disk {d.target:<6}  {d.path} ({d.format})")
    if r.nvram:
        typer.echo(f"  nvram        {r.nvram}")
    typer.echo(f"resume it with: virsh restore {r.path}")
