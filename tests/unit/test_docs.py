"""The README's exit-code table is generated from vmarchive.errors.EXIT_CODES; keep them in sync."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_readme_exit_code_table_matches_errors_module() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-exit-codes")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out in (ROOT / "README.md").read_text(), "run scripts/gen-exit-codes --update"


def test_every_error_class_exit_code_is_documented() -> None:
    from vmarchive import errors

    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.VmarchiveError)
    ]
    assert len(classes) > 10
    for cls in classes:
        assert cls.exit_code in errors.EXIT_CODES, cls
