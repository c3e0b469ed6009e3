"""Temporary images made by qemu-img processes running side by side (capture set-up)."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from vmarchive.errors import HypervisorError
from vmarchive.ops.capture_disks import OverlayFiles

pytestmark = pytest.mark.qemu


def _info(path: pathlib.Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def test_images_are_made_side_by_side_and_waited_for(tmp_path: pathlib.Path) -> None:
    sizes = {"vmarchive-fl-vda": 64 << 20, "vmarchive-fl-vdb": 3 << 30}
    images = OverlayFiles(tmp_path, sizes)
    try:
        procs = list(images._procs.values())
        assert len(procs) == 2  # both started before either is asked for
        for name, size in sizes.items():
            path = images.wait(name)
            info = _info(path)
            assert info["format"] == "qcow2" and info["virtual-size"] == size
            assert "backing-filename" not in info
    finally:
        images.close()
    assert all(p.returncode == 0 for _path, p in procs)


def test_a_failure_is_one_error_and_the_rest_is_waited_for(tmp_path: pathlib.Path) -> None:
    images = OverlayFiles(tmp_path / "missing", {"a": 1 << 20, "b": 1 << 20})
    procs = list(images._procs.values())
    with pytest.raises(HypervisorError, match=r"qemu-img create .* failed"):
        images.wait("a")
    images.close()  # b: reaped, not left running or a zombie
    assert all(p.returncode is not None for _path, p in procs)
