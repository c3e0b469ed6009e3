"""The output-file checks that export, export-memory and export-save make first."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmarchive.errors import AlreadyExistsError, UsageError
from vmarchive.ops.outputs import check_output


def test_an_output_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    new = tmp_path / "new.img"
    check_output(new, False)  # control: a new file in an existing directory
    old = tmp_path / "old.img"
    old.write_bytes(b"x")
    with pytest.raises(AlreadyExistsError, match=r"use --replace to replace it"):
        check_output(old, False, flag="--replace")
    check_output(old, True, flag="--replace")
    link = tmp_path / "link.img"
    link.symlink_to(tmp_path / "nowhere")  # a dangling link exists too
    with pytest.raises(AlreadyExistsError, match=r"use --force"):
        check_output(link, False)
    with pytest.raises(UsageError, match="is a directory"):
        check_output(tmp_path, True)
    with pytest.raises(UsageError, match=r"output directory .* does not exist"):
        check_output(tmp_path / "missing" / "x.img", True)
    assert old.read_bytes() == b"x" and not new.exists()
