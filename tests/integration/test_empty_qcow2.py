"""The capture's temporary images, written by vmarchive itself (capture set-up): what
qemu-img makes of them, and QEMU using one as an overlay of a node it writes through."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from vmarchive.ops.capture_disks import empty_qcow2

pytestmark = pytest.mark.qemu


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


@pytest.mark.parametrize("size", [0, 64 << 20, (3 << 30) + 512, 200 << 30])
def test_an_empty_image_is_the_qcow2_qemu_img_would_make(tmp_path: pathlib.Path, size: int) -> None:
    path = tmp_path / "vmarchive-fl-vda.qcow2"
    empty_qcow2(path, size)
    info = json.loads(_qemu_img("info", "--output=json", str(path)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == size
    assert info["cluster-size"] == 64 << 10 and "backing-filename" not in info
    assert info["format-specific"]["data"]["compat"] == "1.1"  # version 3
    check = _qemu_img("check", "--output=json", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout).get("allocated-clusters", 0) == 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size % (64 << 10) == 0  # whole clusters


def test_a_damaged_header_is_what_the_check_above_catches(tmp_path: pathlib.Path) -> None:
    """The control: the same checks refuse an image whose refcount table points nowhere."""
    path = tmp_path / "bad.qcow2"
    empty_qcow2(path, 64 << 20)
    with open(path, "r+b") as f:
        f.seek(48)  # refcount_table_offset
        f.write((1 << 40).to_bytes(8, "big"))
    info = _qemu_img("info", "--output=json", str(path))
    check = _qemu_img("check", str(path))
    assert info.returncode != 0 or check.returncode != 0


def test_qemu_writes_through_it_over_a_backing_image(tmp_path: pathlib.Path) -> None:
    """What a capture does with one: a qcow2 node over a backing node, written to, read
    back through (qemu-io, the image opened with its backing given as options)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xab" * (1 << 20))
    top = tmp_path / "top.qcow2"
    empty_qcow2(top, 1 << 20)
    spec = json.dumps(
        {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": str(top)},
            "backing": {"driver": "raw", "file": {"driver": "file", "filename": str(base)}},
        }
    )
    run = subprocess.run(
        [
            "qemu-io",
            "-c",
            "write -P 0x5a 64k 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0x5a 64k 64k",
            "-c",
            "read -P 0xab 128k 64k",
            f"json:{spec}",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "Pattern verification failed" not in run.stdout, run.stdout
    assert _qemu_img("check", str(top)).returncode == 0
    assert base.read_bytes() == b"\xab" * (1 << 20)  # the write went into the overlay


def test_an_image_is_never_written_over(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(b"someone's")
    with pytest.raises(FileExistsError):
        empty_qcow2(path, 1 << 20)
    assert path.read_bytes() == b"someone's"
    os.unlink(path)
