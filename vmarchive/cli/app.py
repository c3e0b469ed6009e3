"""The typer application, global options and the error-to-exit-code mapping."""

from __future__ import annotations

import atexit
import gc
import importlib
import inspect
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer

from vmarchive import __version__
from vmarchive.errors import UsageError, VmarchiveError

log = logging.getLogger("vmarchive")

app = typer.Typer(
    name="vmarchive",
    help="Archive the complete state of running libvirt/QEMU guests, and resume them later.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state: dict[str, Any] = {"debug": False}

#: Libraries whose debug output ``--debug`` does not show: botocore's carries the access key
#: id and each request's signature (credentials are never logged), and its hundreds of lines
#: per request bury vmarchive's own.  Their warnings still show.
QUIET_LOGGERS = ("boto3", "botocore", "s3transfer", "urllib3")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vmarchive {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Log details and show tracebacks."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
    s3_endpoint: str | None = typer.Option(
        None,
        "--s3-endpoint",
        help="Endpoint URL of the S3 store for s3:// repositories (else VMARCHIVE_S3_ENDPOINT "
        "or the AWS configuration).",
    ),
) -> None:
    _state["debug"] = debug
    if s3_endpoint:
        # The store reads its endpoint from the environment; the option is the same setting.
        os.environ["VMARCHIVE_S3_ENDPOINT"] = s3_endpoint
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def repo_option() -> Any:
    """The ``--repo`` option of every command that works on a repository."""
    return typer.Option(
        None,
        "--repo",
        "-r",
        envvar="VMARCHIVE_REPO",
        help="Repository location (or set VMARCHIVE_REPO).",
        show_envvar=False,
    )


def need_repo(repo: str | None) -> str:
    """``repo``, or :class:`UsageError` when none was given."""
    if not repo:
        raise UsageError("no repository: give --repo PATH or set VMARCHIVE_REPO")
    return repo


def fmt_bytes(n: float) -> str:
    """A byte count for people: ``512 B``, ``64.0 KiB``, ``1.5 GiB`` (binary units)."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


F = TypeVar("F", bound=Callable[..., Any])


def fail(err: VmarchiveError) -> typer.Exit:
    """Print one line for ``err`` and return the Exit to raise."""
    typer.echo(f"vmarchive: {err.message}", err=True)
    return typer.Exit(err.exit_code)


#: The module of ``vmarchive.cli`` that registers each command, in help order.  ``main``
#: imports only the one it runs: the others' imports (restore, exports, diff...) would
#: cost every command ~80-250 ms.  tests/unit/test_cli_app.py keeps this table true.
COMMAND_MODULES: dict[str, str] = {
    "capture": "capture",
    "untrack": "capture",
    "doctor": "doctor",
    "export-memory": "export",
    "export-disk": "export",
    "serve": "export",
    "diff": "export",
    "init": "repo",
    "list": "repo",
    "info": "repo",
    "stats": "repo",
    "verify": "repo",
    "forget": "repo",
    "prune": "repo",
    "gc": "repo",
    "rebuild-index": "repo",
    "restore": "restore",
    "clone": "restore",
    "export-save": "restore",
}
#: Options of the root callback that take a value (the command name is never one).
_VALUED_ROOT_OPTIONS = ("--s3-endpoint",)


#: glibc's mallopt parameter for the number of arenas (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Let at most ``arenas`` glibc malloc arenas serve this process's threads.

    glibc gives threads that allocate an arena of their own (up to 8 per core) and keeps
    what is freed in each for reuse.  A capture runs a dozen threads (pipe, parser,
    compression, uploads, disk readers, round trip), and what their arenas kept raised
    its peak RSS, by a different amount in every run.  First captures of a 2 GiB guest
    (target: 300 MiB), two sets: 241-270 MiB (mean 255) with two arenas against 257-289
    (mean 266) in six runs each; 246-273 against 304-316 in three each; no slower.  Called
    by the commands that run the pipelines, before their threads start.  ``False`` where
    there is no glibc ``mallopt`` (nothing changes).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def command_name(argv: list[str]) -> str | None:
    """The command ``argv`` (without the program name) runs, if any."""
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in _VALUED_ROOT_OPTIONS:
            skip = True
        elif not a.startswith("-"):
            return a
    return None


def load_commands(argv: list[str] | None = None) -> None:
    """Register the command ``argv`` runs, or every command (help, unknown, ``None``)."""
    if argv is not None and command_name(argv) is None and "--version" in argv:
        return  # eager: printed before any command is looked at
    module = COMMAND_MODULES.get(command_name(argv) or "") if argv is not None else None
    names = [module] if module else list(dict.fromkeys(COMMAND_MODULES.values()))
    for name in names:
        importlib.import_module(f"vmarchive.cli.{name}")
    for c in app.registered_commands:
        if c.help is None and c.callback is not None:
            c.help = reflow(inspect.getdoc(c.callback) or "")


def reflow(doc: str) -> str:
    """A docstring as help text: each paragraph on one line, for the terminal to wrap.

    typer (0.28) keeps the line breaks of a help text's later paragraphs and then wraps
    each source line at the terminal's width: at 80 columns a docstring's lines of up to
    88 left a word or two alone on a line.
    """
    return "\n\n".join(" ".join(p.split()) for p in doc.split("\n\n"))


def main() -> None:
    """Console-script entry point: run the app, turn errors into one line + exit code."""
    load_commands(sys.argv[1:])
    try:
        # With standalone_mode=False click returns the code of a typer.Exit instead of exiting.
        rv = app(standalone_mode=False)
        if isinstance(rv, int) and rv != 0:
            sys.exit(rv)
    except VmarchiveError as e:
        if _state["debug"]:
            log.exception("failed")
        print(f"vmarchive: {e.message}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("vmarchive: interrupted", file=sys.stderr)
        sys.exit(6)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("vmarchive: aborted", file=sys.stderr)
        sys.exit(6)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and real bugs
        # typer vendors its own click (typer._click), so recognise click's exceptions by
        # shape rather than by class: they can render themselves and carry an exit code.
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        if _state["debug"]:
            raise
        log.debug("internal error", exc_info=True)
        print(
            f"vmarchive: internal error: {type(e).__name__}: {e} (run with --debug for details)",
            file=sys.stderr,
        )
        sys.exit(1)


def run() -> NoReturn:
    """The process's entry point (console script, ``python -m vmarchive``): :func:`main`,
    then exit without the interpreter's teardown.

    A command imports ~200 modules; tearing them down again (module dicts cleared, a
    garbage collection after each round) took 60-70 ms of CPU after every command on
    this machine, ~7 % of a second capture.  Nothing of vmarchive depends on it: files
    and repositories are closed by their ``with`` blocks, threads are daemons, and the
    exit handlers (logging's flush, ``weakref.finalize``) are run here.  If a non-daemon
    thread is still alive (a thread pool nobody shut down), the normal exit runs instead:
    its owner's exit handler must join it first.  The import itself runs with the
    collector paused and its objects frozen afterwards (``gc.freeze``): they live as long
    as the process, and each full collection during the command would walk them again.
    ``main()`` stays the in-process entry (tests), where none of this applies.
    """
    gc.disable()
    try:
        if command_name(sys.argv[1:]) == "capture":
            # Its watchdog process starts beside the imports (see prestart).
            from vmarchive.ops.capture_watchdog import prestart

            prestart()
        load_commands(sys.argv[1:])
    finally:
        gc.freeze()
        gc.enable()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = exit_status(e.code)
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # output lost (a closed pipe): never report success
    os._exit(code)


def exit_status(code: object) -> int:
    """The process status Python gives ``sys.exit(code)``: None is 0, an int itself,
    anything else is printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1
