"""diff: changed RAM and disk ranges from slot tables alone, placed at guest-physical addresses."""

from __future__ import annotations

import json
import pathlib

import pytest
from test_elfcore_export import MAP, PAGE

from vmarchive.cli.app import app, load_commands
from vmarchive.ops import diff as D
from vmarchive.ops.repo import RepoRef
from vmarchive.store import InitOptions, Repository

CS = 16 * 1024  # memory chunk size of the test repository
DCS = 8192  # disk chunk size


def base_ram() -> bytearray:
    img = bytearray(64 * PAGE)
    for p in range(64):
        img[p * PAGE] = p + 1
    return img


def write(repo: Repository, ram: bytes, disk: bytes, *, dev: bytes = b"dev") -> str:
    with repo.writer() as w:
        sw = w.stream("ram:pc.ram", "ram", len(ram), attrs={"block": "pc.ram"})
        sw.write(0, ram)
        sw.close()
        sw = w.stream("ram:pc.bios", "ram", 16 * PAGE, attrs={"block": "pc.bios"})
        sw.write(0, b"\xb1" * 16 * PAGE)
        sw.close()
        sw = w.stream("devstate", "devstate", len(dev), attrs={})
        sw.write(0, dev)
        sw.close()
        sw = w.stream("disk:vda", "disk", len(disk), attrs={"target": "vda"})
        sw.write(0, disk)
        sw.close()
        meta = {"time": "2026-11-25T21:00:00Z", "domain": "vm1", "kind": "full"}
        return w.commit(meta | {"memory_map": MAP.to_json(), "vcpus": 1, "arch": "x86_64"})


@pytest.fixture
def repo(tmp_path: pathlib.Path) -> Repository:
    p = tmp_path / "repo"
    Repository.init(str(p), InitOptions(memory_chunk_size=CS, disk_chunk_size=DCS)).close()
    return Repository.open(str(p))


def test_changed_pages_are_found_and_placed(repo: Repository) -> None:
    ram = base_ram()
    disk = bytearray(b"d" * 8 * DCS)
    a = write(repo, bytes(ram), bytes(disk))
    ram[5 * PAGE + 100] ^= 0xFF  # chunk 1 (pages 4-7) of pc.ram, at guest-physical 0x5000
    ram[40 * PAGE] ^= 0xFF  # chunk 10 (pages 40-43): block offset 0xa0000 -> 0x100000 + 0x20000
    ram[41 * PAGE] ^= 0xFF
    disk[3 * DCS + 7] = 0  # disk slot 3
    b = write(repo, bytes(ram), bytes(disk), dev=b"DEV")
    r = D.diff_archives(repo, repo.load_archive(a), repo.load_archive(b))
    (pc_ram,) = [m for m in r.memory if m.name == "pc.ram"]
    assert [(e.offset, e.length) for e in pc_ram.changed] == [(CS, CS), (10 * CS, CS)]
    assert pc_ram.granularity == CS
    assert [m.changed for m in r.memory if m.name == "pc.bios"] == [[]]
    assert r.physical is not None
    assert [(p.address, p.length, p.offset) for p in r.physical] == [
        (CS, CS, CS),
        (0x100000 + 10 * CS - 32 * PAGE, CS, 10 * CS),
    ]
    assert [(e.offset, e.length) for e in r.disks[0].changed] == [(3 * DCS, DCS)]
    assert r.devstate_changed is True and r.notes == []


def test_identical_archives_show_no_change(repo: Repository) -> None:
    # the negative control: the same content written twice diffs empty
    a = write(repo, bytes(base_ram()), b"d" * 8 * DCS)
    b = write(repo, bytes(base_ram()), b"d" * 8 * DCS)
    r = D.diff_archives(repo, repo.load_archive(a), repo.load_archive(b))
    assert all(m.changed == [] for m in r.memory) and r.physical == []
    assert r.disks[0].changed == [] and r.devstate_changed is False


def test_holes_and_size_changes(repo: Repository) -> None:
    ram = base_ram()
    a = write(repo, bytes(ram), b"d" * 4 * DCS)
    ram[0 : 4 * PAGE] = bytes(4 * PAGE)  # a data chunk becomes a hole: changed
    b = write(repo, bytes(ram), b"d" * 4 * DCS + b"e" * 100)  # the disk grew by a short slot
    r = D.diff_archives(repo, repo.load_archive(a), repo.load_archive(b))
    (pc_ram,) = [m for m in r.memory if m.name == "pc.ram"]
    assert [(e.offset, e.length) for e in pc_ram.changed] == [(0, CS)]
    d = r.disks[0]
    assert (d.size_a, d.size_b) == (4 * DCS, 4 * DCS + 100)
    assert [(e.offset, e.length) for e in d.changed] == [(4 * DCS, 100)]


def test_runs_merge_and_end_short() -> None:
    flags = iter([True, True, False, True])
    assert D._runs(10, 35, flags) == [D.Extent(0, 20), D.Extent(30, 5)]


def test_cli_json_and_text(
    repo: Repository, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ram = base_ram()
    a = write(repo, bytes(ram), b"d" * DCS)
    ram[0] ^= 1
    b = write(repo, bytes(ram), b"d" * DCS)
    ref_loc = str(tmp_path / "repo")
    r = D.diff(RepoRef(ref_loc), a[:10], b[:10])
    js = json.loads(json.dumps(r.to_json()))
    assert js["physical"] == [{"address": 0, "length": CS, "block": "pc.ram", "offset": 0}]
    load_commands(["diff"])
    app(["diff", "--repo", ref_loc, a[:10], b[:10]], standalone_mode=False)
    out = capsys.readouterr().out
    assert "guest-physical memory: 1 changed ranges, 16.0 KiB" in out
    assert "device state: unchanged" in out


def test_exact_narrows_to_pages_reading_only_changed_chunks(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    ram = base_ram()
    disk = bytearray(b"d" * 4 * DCS + b"tail" * 25)
    a = write(repo, bytes(ram), bytes(disk))
    ram[5 * PAGE + 100] ^= 0xFF  # page 5 only, in chunk 1
    ram[7 * PAGE] ^= 0xFF  # page 7, same chunk
    ram[40 * PAGE] ^= 0xFF  # page 40, chunk 10
    disk[2 * DCS + 4096 + 1] = 0  # second 4 KiB of disk slot 2
    disk[-1] = 0  # the short last slot
    b = write(repo, bytes(ram), bytes(disk))
    aa, bb = repo.load_archive(a), repo.load_archive(b)
    reads: list[bytes] = []
    real = repo.read_chunk

    def counting(cid: bytes) -> bytes:
        reads.append(cid)
        return real(cid)

    monkeypatch.setattr(repo, "read_chunk", counting)
    coarse = D.diff_archives(repo, aa, bb)
    assert reads == []  # the default reads no chunk at all
    r = D.diff_archives(repo, aa, bb, exact=True)
    (pc_ram,) = [m for m in r.memory if m.name == "pc.ram"]
    assert [(e.offset, e.length) for e in pc_ram.changed] == [
        (5 * PAGE, PAGE),
        (7 * PAGE, PAGE),
        (40 * PAGE, PAGE),
    ]
    assert pc_ram.granularity == 4096
    assert [(e.offset, e.length) for e in r.disks[0].changed] == [
        (2 * DCS + 4096, 4096),
        (4 * DCS, 100),
    ]
    # only the changed chunks were read: 2 RAM chunks and 2 disk slots, in both archives
    assert len(reads) == 2 * (2 + 2)
    coarse_ram = next(m for m in coarse.memory if m.name == "pc.ram")
    assert (
        sum(e.length for e in coarse_ram.changed) == 2 * CS > sum(e.length for e in pc_ram.changed)
    )
    assert r.physical is not None
    assert [p.address for p in r.physical] == [5 * PAGE, 7 * PAGE, 0x100000 + 8 * PAGE]
