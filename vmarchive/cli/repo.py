"""Repository commands: init, list, info, stats, verify, forget, prune, gc.

Each takes ``--repo PATH`` (or ``VMARCHIVE_REPO``) and ``--json``.  The passphrase of an
encrypted repository comes from ``VMARCHIVE_PASSPHRASE`` or an interactive prompt that
does not echo; it is never logged.
"""

from __future__ import annotations

import getpass
import os
import sys
from datetime import UTC
from typing import Any

import typer

from vmarchive.cli.app import app, fmt_bytes, need_repo, print_json, repo_option
from vmarchive.errors import DamageError, UsageError, WrongKeyError
from vmarchive.format import constants as C
from vmarchive.ops import repo as ops
from vmarchive.ops import tracking
from vmarchive.ops.tracking import DEFAULT_URI
from vmarchive.store import GcOptions, InitOptions, PrunePolicy
from vmarchive.store.repository import parse_time

_VERIFY_ARCHIVES = typer.Argument(None, help="Archives to check (default: all).")
_FORGET_ARCHIVES = typer.Argument(..., help="Archive ids, unique prefixes, or DOMAIN@latest[~N].")
_LIST_TAGS = typer.Option([], "--tag", help="Only archives with this tag (repeatable).")
_PRUNE_DOMAINS = typer.Argument(
    None,
    help="Only these domains' archives (names or UUIDs; default: every domain).",
    show_default=False,
)
_KEEP_TAGS = typer.Option([], "--keep-tag", help="Keep every archive with this tag (repeatable).")
PASSPHRASE_ENV = "VMARCHIVE_PASSPHRASE"


def _json_option() -> Any:
    return typer.Option(False, "--json", help="Print machine-readable JSON.")


def ask_passphrase() -> str:
    """The passphrase from the environment, else a prompt on the terminal.

    Raises :class:`WrongKeyError` when neither is available (no terminal).
    """
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise WrongKeyError(
            f"the repository is encrypted: set {PASSPHRASE_ENV} or run on a terminal"
        )
    return getpass.getpass("Repository passphrase: ")


_UNITS = {"": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20}


def _chunk_size(option: str, text: str) -> int:
    """``text`` (bytes, or with K/KiB/M/MiB) as a chunk size the repository accepts: a
    multiple of 4 KiB from 4 KiB up to the pack size.  Raises UsageError."""
    t = text.strip().upper()
    digits = t.rstrip("KMIB")
    unit = _UNITS.get(t[len(digits) :])
    if not digits.isdigit() or unit is None:
        raise UsageError(f"{option}: {text!r} is not a size (e.g. 65536, 64K, 1M)")
    n = int(digits) * unit
    if not (C.MIN_CHUNK_SIZE <= n <= C.DEFAULT_PACK_SIZE) or n % C.MIN_CHUNK_SIZE:
        raise UsageError(
            f"{option}: {text} is not a multiple of 4K between 4K and {C.DEFAULT_PACK_SIZE >> 20}M"
        )
    return n


def _new_passphrase() -> str:
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise UsageError(f"{PASSPHRASE_ENV} is empty")
        return env
    if not sys.stdin.isatty():
        raise UsageError(f"an encrypted repository needs a passphrase: set {PASSPHRASE_ENV}")
    first = getpass.getpass("New repository passphrase: ")
    if not first or first != getpass.getpass("Repeat passphrase: "):
        raise UsageError("passphrases are empty or do not match")
    return first


def repo_ref(repo: str | None) -> ops.RepoRef:
    """Raises :class:`UsageError` when no repository is given."""
    return ops.RepoRef(need_repo(repo), ask_passphrase)


#: Keys whose integer values are byte counts (besides any key naming ``bytes``).
_SIZE_KEYS = frozenset({"size", "virtual_size", "total", "transferred", "size_bytes"})
#: Keys whose integer values are guest addresses or offsets (shown in hex in tables).
_ADDRESS_KEYS = frozenset({"start", "offset"})
#: Keys shown first among their object's (what names a disk, a block).
_FIRST_KEYS = frozenset({"target", "name"})
#: A list of flat objects with at most this many keys is shown as a table.
_TABLE_MAX_KEYS = 6


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _is_size(key: str) -> bool:
    return key in _SIZE_KEYS or "bytes" in key


def _scalar(key: str, v: Any, *, table: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int) and _is_size(key):
        return fmt_bytes(v) if table or v < 1024 else f"{v} ({fmt_bytes(v)})"
    if isinstance(v, int) and table and key in _ADDRESS_KEYS:
        return f"{v:#x}"
    return str(v)


def _flat(v: Any) -> bool:
    return not isinstance(v, dict | list)


def _table(rows: list[dict[str, Any]], pad: str) -> list[str]:
    keys = sorted(dict.fromkeys(k for r in rows for k in r), key=lambda k: k not in _FIRST_KEYS)
    cells = [[_scalar(k, r.get(k), table=True) for k in keys] for r in rows]
    return [pad + line for line in _columns(keys, cells)]


def _metadata_lines(meta: dict[str, Any], indent: int = 2, width: int = 16) -> list[str]:
    """An archive's metadata for people: one key per line, nested objects indented below
    their key, lists of small flat objects as tables, byte counts with their size in
    KiB/MiB/GiB (``info --json`` has the values as stored)."""
    pad = " " * indent
    out: list[str] = []
    for k in sorted(meta, key=lambda k: (k not in _FIRST_KEYS, k)):
        v = meta[k]
        if _flat(v) or not v:
            shown = _scalar(k, v) if _flat(v) else "-"
            out.append(f"{pad}{k:<{width}} {shown}".rstrip())
        elif isinstance(v, list) and all(_flat(x) for x in v):
            out.append(f"{pad}{k:<{width}} {', '.join(_scalar(k, x) for x in v)}")
        elif isinstance(v, dict):
            out.append(f"{pad}{k}")
            out.extend(_metadata_lines(v, indent + 2, max(len(x) for x in v)))
        elif all(isinstance(x, dict) and all(_flat(y) for y in x.values()) for x in v) and (
            len({key for x in v for key in x}) <= _TABLE_MAX_KEYS
        ):
            out.append(f"{pad}{k}")
            out.extend(_table(v, pad + "  "))
        else:
            out.append(f"{pad}{k}")
            for x in v:
                item = x if isinstance(x, dict) else {"value": x}
                lines = _metadata_lines(item, indent + 4, max((len(y) for y in item), default=0))
                if lines:
                    lines[0] = f"{pad}  - {lines[0][indent + 4 :]}"
                out.extend(lines or [f"{pad}  - -"])
    return out


@app.command("init")
def init_cmd(
    repo: str = repo_option(),
    encryption: str = typer.Option(
        C.ENCRYPTION_NONE, "--encryption", help=f"One of: {', '.join(C.ENCRYPTIONS)}."
    ),
    id_algorithm: str = typer.Option(
        C.ID_XXH3_128_KEYED, "--id-algorithm", help=f"One of: {', '.join(C.ID_ALGORITHMS)}."
    ),
    compression_level: int = typer.Option(
        C.DEFAULT_ZSTD_LEVEL, "--compression-level", help="zstd level."
    ),
    disk_chunk_size: str = typer.Option(
        f"{C.DEFAULT_DISK_CHUNK >> 10}K",
        "--disk-chunk-size",
        help="Chunk size of disk streams (4K..16M, a multiple of 4K): smaller chunks store "
        "less for scattered small writes (an incremental stores whole chunks), larger ones "
        "keep big disks' indexes small.",
    ),
    memory_chunk_size: str = typer.Option(
        f"{C.DEFAULT_MEMORY_CHUNK >> 10}K",
        "--memory-chunk-size",
        help="Chunk size of RAM streams (4K..16M, a multiple of 4K).",
    ),
    as_json: bool = _json_option(),
) -> None:
    """Create a new, empty repository."""
    repo = need_repo(repo)
    disk_chunk = _chunk_size("--disk-chunk-size", disk_chunk_size)
    memory_chunk = _chunk_size("--memory-chunk-size", memory_chunk_size)
    if encryption not in C.ENCRYPTIONS:
        raise UsageError(f"unknown encryption {encryption!r} (one of {', '.join(C.ENCRYPTIONS)})")
    if id_algorithm not in C.ID_ALGORITHMS:
        raise UsageError(
            f"unknown id algorithm {id_algorithm!r} (one of {', '.join(C.ID_ALGORITHMS)})"
        )
    passphrase = _new_passphrase() if encryption != C.ENCRYPTION_NONE else None
    r = ops.init_repo(
        repo,
        InitOptions(
            encryption=encryption,
            passphrase=passphrase,
            id_algorithm=id_algorithm,
            compression_level=compression_level,
            disk_chunk_size=disk_chunk,
            memory_chunk_size=memory_chunk,
        ),
    )
    cfg = r.codecs.config
    if as_json:
        print_json(
            {
                "location": r.backend.location,
                "repository_id": cfg.repository_id.hex(),
                "encryption": cfg.encryption,
                "id_algorithm": cfg.id_algorithm,
                "compression_level": cfg.compression_level,
                "disk_chunk_size": cfg.disk_chunk_size,
                "memory_chunk_size": cfg.memory_chunk_size,
            }
        )
    else:
        typer.echo(
            f"created repository {r.backend.location} ({cfg.encryption}, {cfg.id_algorithm})"
        )


@app.command("list")
def list_cmd(
    domain: str = typer.Argument(None, help="Only this domain's archives (name or UUID)."),
    tag: list[str] = _LIST_TAGS,
    repo: str = repo_option(),
    as_json: bool = _json_option(),
) -> None:
    """List archives, oldest first.

    Other commands name an archive by its id, a unique prefix of it, or DOMAIN@latest,
    DOMAIN@latest~1 (the one before it), and so on."""
    archives = ops.list_archives(repo_ref(repo), domain, tag)
    if as_json:
        print_json([a.to_json() for a in archives])
        return
    if not archives:
        typer.echo("no archives")
        return
    rows = [
        [
            a.id[:12],
            _when(a.time),
            a.domain,
            a.kind,
            str(a.metadata.get("mode") or "-"),
            fmt_bytes(a.size),
            ", ".join(a.tags) or "-",
        ]
        for a in archives
    ]
    for line in _columns(["ID", "TIME (UTC)", "DOMAIN", "KIND", "MODE", "SIZE", "TAGS"], rows):
        typer.echo(line)


def _when(iso: str) -> str:
    """An archive's ISO 8601 UTC time to the second, as people read it."""
    try:
        t = parse_time(iso)
    except UsageError:
        return iso
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _columns(head: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]


@app.command("info")
def info_cmd(
    archive: str = typer.Argument(..., help="Archive id, unique prefix, or DOMAIN@latest[~N]."),
    repo: str = repo_option(),
    as_json: bool = _json_option(),
) -> None:
    """Show an archive's metadata and streams."""
    a = ops.archive_info(repo_ref(repo), archive)
    if as_json:
        print_json(
            {"id": a.id, "metadata": a.metadata, "streams": [s.to_json() for s in a.streams]}
        )
        return
    typer.echo(f"archive {a.id}")
    for line in _metadata_lines(a.metadata):
        typer.echo(line)
    for s in a.streams:
        j = s.to_json()
        typer.echo(
            f"  stream {s.name} ({s.kind}): {fmt_bytes(s.size)},"
            f" {_count(j['slots'], 'chunk')} of {fmt_bytes(s.chunk_size)},"
            f" {_count(j['holes'], 'hole')}"
        )


@app.command("stats")
def stats_cmd(repo: str = repo_option(), as_json: bool = _json_option()) -> None:
    """Logical and stored sizes, dedup and compression ratios, the chunk index's memory."""
    st = ops.repo_stats(repo_ref(repo))
    if as_json:
        print_json(st.to_json())
        return
    typer.echo(f"archives           {st.archives}")
    typer.echo(
        f"logical size       {fmt_bytes(st.logical_bytes)} ({fmt_bytes(st.data_bytes)} not holes)"
    )
    typer.echo(f"unique data        {fmt_bytes(st.unique_bytes)} in {st.chunks} chunks")
    typer.echo(f"stored             {fmt_bytes(st.stored_bytes)} ({st.packs} packs)")
    typer.echo(f"dedup ratio        {st.dedup_ratio:.2f}")
    typer.echo(f"compression ratio  {st.compression_ratio:.2f}")
    typer.echo(
        f"chunk index        {st.indexed_chunks} chunks, {fmt_bytes(st.index_memory_bytes)}"
        " in memory for every capture and restore"
    )


@app.command("verify")
def verify_cmd(
    archives: list[str] = _VERIFY_ARCHIVES,
    full: bool = typer.Option(False, "--full", help="Read, decompress and re-hash every chunk."),
    repo: str = repo_option(),
    as_json: bool = _json_option(),
) -> None:
    """Check archives; exit 4 and name the damaged archives on any damage."""
    report = ops.verify(repo_ref(repo), archives or None, full)
    if as_json:
        print_json(report.to_json())
    else:
        kind = "full" if full else "fast"
        if report.ok:
            typer.echo(f"ok: {report.archives_checked} archives verified ({kind})")
        for p in report.problems:
            typer.echo(f"problem: {p}", err=True)
        for d in report.damaged:
            typer.echo(f"damaged: {d}")
    if not report.ok:
        # An error, not typer.Exit: main() maps it to exit code 4 and one line on stderr.
        raise DamageError(
            f"verify found {len(report.damaged)} damaged archives and {len(report.problems)} problems"
        )


def _connect_option() -> Any:
    return typer.Option(
        DEFAULT_URI,
        "--connect",
        "-c",
        help="libvirt URI where domains left without archives lose their dirty bitmaps.",
    )


def _untracked_json(released: list[tracking.Release]) -> dict[str, Any]:
    # Only when a domain lost its last archive: the usual shapes stay as they were.
    return {"untracked": [x.to_json() for x in released]} if released else {}


def _echo_released(released: list[tracking.Release]) -> None:
    for rel in released:
        for line in rel.lines():
            typer.echo(line)


@app.command("forget")
def forget_cmd(
    archives: list[str] = _FORGET_ARCHIVES,
    repo: str = repo_option(),
    connect: str = _connect_option(),
    as_json: bool = _json_option(),
) -> None:
    """Remove archives from the list (run gc to reclaim their space).

    A domain left without archives loses vmarchive's dirty bitmaps (if reachable)."""
    r = tracking.forget(repo_ref(repo), archives, connect)
    if as_json:
        print_json({"forgotten": r.forgotten, **_untracked_json(r.released)})
        return
    for i in r.forgotten:
        typer.echo(f"forgot {i}")
    _echo_released(r.released)


@app.command("prune")
def prune_cmd(
    domains: list[str] = _PRUNE_DOMAINS,
    keep_last: int = typer.Option(0, "--keep-last", help="Keep the newest N archives."),
    keep_hourly: int = typer.Option(0, "--keep-hourly", help="Keep the newest of each of N hours."),
    keep_daily: int = typer.Option(0, "--keep-daily", help="Keep the newest of each of N days."),
    keep_weekly: int = typer.Option(
        0, "--keep-weekly", help="Keep the newest of each of N ISO weeks."
    ),
    keep_monthly: int = typer.Option(
        0, "--keep-monthly", help="Keep the newest of each of N months."
    ),
    keep_tag: list[str] = _KEEP_TAGS,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be forgotten."),
    repo: str = repo_option(),
    connect: str = _connect_option(),
    as_json: bool = _json_option(),
) -> None:
    """Forget archives outside the retention policy, per domain (times in UTC).

    A domain is the guest's UUID: its history survives a rename, and guests of the same
    name on different hosts are pruned apart.
    """
    policy = PrunePolicy(
        keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, tuple(keep_tag)
    )
    result, released = tracking.prune(
        repo_ref(repo), policy, dry_run, connect, domains=tuple(domains or ())
    )
    if as_json:
        print_json({**result.to_json(), **_untracked_json(released)})
        return
    verb = "would forget" if dry_run else "forget"
    rows = [["keep", a.id[:12], _when(a.time), a.domain, ", ".join(why)] for a, why in result.keep]
    rows += [[verb, a.id[:12], _when(a.time), a.domain, "-"] for a in result.forget]
    if rows:
        for line in _columns(["ACTION", "ID", "TIME (UTC)", "DOMAIN", "KEPT BY"], rows):
            typer.echo(line)
    else:
        typer.echo("no archives")
    _echo_released(released)


@app.command("gc")
def gc_cmd(
    grace: float = typer.Option(
        C.GC_GRACE_PERIOD,
        "--grace",
        help="Never touch packs or indexes younger than this (seconds).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be removed."),
    repo: str = repo_option(),
    as_json: bool = _json_option(),
) -> None:
    """Delete unreferenced data and repack mostly-garbage packs (exclusive lock)."""
    result = ops.gc(repo_ref(repo), GcOptions(grace=grace, dry_run=dry_run))
    if as_json:
        print_json(result.to_json())
        return
    prefix = "would free" if dry_run else "freed"
    typer.echo(
        f"{prefix} {fmt_bytes(result.bytes_freed)}: {result.packs_deleted} packs deleted, "
        f"{result.packs_repacked} repacked, {result.packs_kept_young} young packs kept, "
        f"{result.live_chunks} live chunks"
    )


@app.command("rebuild-index")
def rebuild_index_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only count what would be re-indexed."),
    repo: str = repo_option(),
    as_json: bool = _json_option(),
) -> None:
    """Re-index chunks from the pack trailers and drop unreadable index files."""
    result = ops.rebuild_index(repo_ref(repo), dry_run)
    if as_json:
        print_json(result.to_json())
        return
    typer.echo(
        f"read {result.packs_read} packs, re-indexed {result.chunks_added} chunks, "
        f"removed {result.indices_deleted} and replaced {result.indices_repaired} unreadable index files"
    )
    for p in result.damaged_packs:
        typer.echo(f"damaged pack trailer: {p}", err=True)
