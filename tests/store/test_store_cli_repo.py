"""The repository commands: exit codes, --json shapes, one-line errors."""

from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from storehelpers import write_archive

from vmarchive.cli import main
from vmarchive.store import Repository

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        return json.loads(self.out)


#: the ``cli`` fixture: runs ``vmarchive ARGS...`` in this process
Cli = Callable[..., Result]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    monkeypatch.delenv("VMARCHIVE_REPO", raising=False)
    monkeypatch.delenv("VMARCHIVE_PASSPHRASE", raising=False)

    def run(*args: str) -> Result:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["vmarchive", *args])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


@pytest.fixture
def repo_with_archives(tmp_path: pathlib.Path, cli: Cli) -> tuple[str, list[str]]:
    path = str(tmp_path / "r")
    assert cli("init", "--repo", path).code == 0
    repo = Repository.open(path)
    ids = [
        write_archive(
            repo,
            {"disk/vda": random.Random(i).randbytes(70_000)},
            domain=f"vm{i % 2}",
            time=f"2026-05-0{i + 1}T12:00:00Z",
        )
        for i in range(1, 6)
    ]
    return path, ids


def test_list_info_stats_json(cli: Cli, repo_with_archives: tuple[str, list[str]]) -> None:
    path, ids = repo_with_archives
    r = cli("list", "--json", "--repo", path)
    assert r.code == 0
    items = r.json()
    assert isinstance(items, list) and [a["id"] for a in items] == ids
    for a in items:
        assert {"id", "domain", "time"} <= set(a)
        datetime.fromisoformat(a["time"].replace("Z", "+00:00"))
    r = cli("info", ids[2][:10], "--json", "--repo", path)
    assert r.code == 0
    info = r.json()
    assert isinstance(info, dict) and info["id"] == ids[2]
    assert info["streams"][0]["name"] == "disk/vda" and info["streams"][0]["size"] == 70_000
    st = cli("stats", "--json", "--repo", path).json()
    assert isinstance(st, dict) and st["logical_bytes"] == 5 * 70_000 and st["stored_bytes"] > 0
    # the chunk index's table, as every capture and restore of this repository holds it
    loaded = Repository.open(path).index
    assert st["index_memory_bytes"] == loaded.memory_bytes() >= 32 * st["indexed_chunks"] > 0
    shown = cli("stats", "--repo", path).out
    assert f"chunk index        {st['indexed_chunks']} chunks, " in shown
    text = cli("list", "--repo", path)
    assert text.code == 0 and ids[0][:12] in text.out


def test_repo_from_environment(
    cli: Cli, repo_with_archives: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ids = repo_with_archives
    monkeypatch.setenv("VMARCHIVE_REPO", path)
    assert len(cli("list", "--json").json()) == len(ids)


def test_name_errors_are_one_line_exit_2(
    cli: Cli, repo_with_archives: tuple[str, list[str]]
) -> None:
    path, ids = repo_with_archives
    shared = (
        next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
        if len({i[0] for i in ids}) < len(ids)
        else None
    )
    if shared is not None:
        r = cli("info", shared, "--repo", path)
        assert r.code == 2 and "matches" in r.err and r.err.count("\n") == 1
    r = cli("info", "ffffffffffffffff0", "--repo", path)
    assert r.code == 2 and r.err.startswith("vmarchive: no archive")
    r = cli("forget", "zz-not-hex", "--repo", path)
    assert r.code == 2
    r = cli("list")
    assert r.code == 2 and "VMARCHIVE_REPO" in r.err


def test_domain_latest_names_and_list_filters(
    cli: Cli, repo_with_archives: tuple[str, list[str]]
) -> None:
    path, ids = repo_with_archives  # vm1: ids[0], ids[2], ids[4]; vm0: ids[1], ids[3]

    def named(name: str) -> Result:
        return cli("info", name, "--json", "--repo", path)

    for name, want in (
        ("vm1@latest", ids[4]),
        ("vm1@latest~0", ids[4]),
        ("vm1@latest~1", ids[2]),
        ("vm1@LATEST~2", ids[0]),
        ("vm0@latest", ids[3]),
        ("@latest", ids[4]),
        ("@latest~4", ids[0]),
    ):
        r = named(name)
        assert r.code == 0 and r.json()["id"] == want, (name, r.err)
    for name, says in (
        ("vm1@latest~3", "domain 'vm1' has 3 archives"),
        ("nope@latest", "domain 'nope' has no archive"),
        ("vm1@yesterday", "after '@' comes latest"),
        ("vm1@latest~-1", "after '@' comes latest"),
        ("@latest~5", "the repository has 5 archives"),
    ):
        r = named(name)
        assert r.code == 2 and says in r.err and r.err.count("\n") == 1, (name, r.err)

    # the UUID recorded at capture names the domain too (in any case); tags filter lists
    repo = Repository.open(path)
    uuid = "5c0c3a4e-8f0e-4a43-9d7e-1b2c3d4e5f60"
    tagged = write_archive(
        repo,
        {"disk/vda": b"x" * 5000},
        domain="vm1-renamed",
        time="2026-05-09T12:00:00Z",
        extra={"uuid": uuid, "tags": ["pre-upgrade"]},
    )
    repo.close()
    assert named(f"{uuid.upper()}@latest").json()["id"] == tagged
    assert named("@latest").json()["id"] == tagged

    def listed(*args: str) -> list[str]:
        r = cli("list", *args, "--json", "--repo", path)
        assert r.code == 0, r.err
        return [a["id"] for a in r.json()]

    assert listed("vm0") == [ids[1], ids[3]]
    assert listed("vm1") == [ids[0], ids[2], ids[4]]
    assert listed(uuid) == [tagged]
    assert listed("nope") == []
    assert listed("--tag", "pre-upgrade") == [tagged]
    assert listed("vm0", "--tag", "pre-upgrade") == []
    assert len(listed()) == 6

    # one name, two guests (web9 on two hosts sharing the repository): ambiguous
    repo = Repository.open(path)
    twins = {
        u: write_archive(
            repo,
            {"disk/vda": bytes([i + 1]) * 5000},
            domain="web9",
            time=f"2026-05-09T1{i}:00:00Z",
            extra={"uuid": u},
        )
        for i, u in enumerate(("0c0c3a4e-8f0e-4a43-9d7e-1b2c3d4e5f61", "0d" + uuid[2:]))
    }
    repo.close()
    r = named("web9@latest")
    assert r.code == 2 and "2 guests are named 'web9'" in r.err, r.err
    for u, aid in twins.items():
        assert u in r.err
        assert named(f"{u}@latest").json()["id"] == aid

    # every command that takes an archive resolves the form: forget the newest of vm1
    r = cli("forget", "vm1@latest", "--repo", path)
    assert r.code == 0, r.err
    assert named("vm1@latest").json()["id"] == ids[2]


def test_verify_exit_codes_and_damage_json(
    cli: Cli, repo_with_archives: tuple[str, list[str]]
) -> None:
    path, ids = repo_with_archives
    r = cli("verify", "--full", "--json", "--repo", path)
    assert r.code == 0
    assert r.json() == {**r.json(), "ok": True, "damaged": []}
    # Damage a chunk of archive 3 (each archive has its own random data).
    repo = Repository.open(path)
    cid = next(repo.load_archive(ids[2]).chunk_ids())
    loc = repo.index.get(cid)
    assert loc is not None
    p = pathlib.Path(path, "data", loc.pack_id[:2], loc.pack_id)
    b = bytearray(p.read_bytes())
    b[loc.offset + loc.length // 2] ^= 1
    p.write_bytes(bytes(b))
    r = cli("verify", "--full", "--json", "--repo", path)
    assert r.code == 4
    report = r.json()
    assert isinstance(report, dict) and report["ok"] is False and report["damaged"] == [ids[2]]
    r = cli("verify", "--full", "--repo", path)
    assert r.code == 4 and f"damaged: {ids[2]}" in r.out
    assert cli("verify", ids[0], ids[1][:8], "--full", "--repo", path).code == 0
    assert cli("verify", "--repo", path).code == 0  # fast verify does not read data


def test_forget_prune_gc(cli: Cli, repo_with_archives: tuple[str, list[str]]) -> None:
    path, ids = repo_with_archives
    r = cli("prune", "--repo", path)
    assert r.code == 2 and "--keep" in r.err
    r = cli("prune", "--keep-last", "1", "--dry-run", "--json", "--repo", path)
    assert r.code == 0
    plan = r.json()
    assert isinstance(plan, dict) and len(plan["forget"]) == 3 and len(plan["keep"]) == 2
    # the text plan: a header and aligned columns, the newest of each domain kept
    r = cli("prune", "--keep-last", "1", "--dry-run", "--repo", path)
    head, *rows = r.out.splitlines()
    assert head.split() == ["ACTION", "ID", "TIME", "(UTC)", "DOMAIN", "KEPT", "BY"]
    assert [x.split("  ")[0] for x in rows] == ["keep"] * 2 + ["would forget"] * 3
    kept = {
        ids[3][:12]: ("2026-05-05 12:00:00", "vm0"),
        ids[4][:12]: ("2026-05-06 12:00:00", "vm1"),
    }
    for x in rows[:2]:
        short = x[head.index("ID") :].split()[0]
        when, dom = kept.pop(short)
        assert x[head.index("TIME") :].startswith(f"{when}  {dom} ")
        assert x[head.index("KEPT") :] == "last #1"
    assert not kept and all(x.endswith("  -") for x in rows[2:])
    assert len(cli("list", "--json", "--repo", path).json()) == 5
    assert cli("prune", "--keep-last", "1", "--repo", path).code == 0
    left = [a["id"] for a in cli("list", "--json", "--repo", path).json()]
    assert sorted(left) == sorted(ids[-2:])
    r = cli("forget", ids[-1][:12], "--json", "--repo", path)
    assert r.code == 0 and r.json() == {"forgotten": [ids[-1]]}
    r = cli("gc", "--grace", "0", "--json", "--repo", path)
    assert r.code == 0
    res = r.json()
    assert isinstance(res, dict) and res["packs_deleted"] >= 1
    assert cli("verify", "--full", "--repo", path).code == 0


def test_prune_one_domain_keeping_tagged(
    cli: Cli, repo_with_archives: tuple[str, list[str]]
) -> None:
    path, ids = repo_with_archives  # vm1: ids[0], ids[2], ids[4]; vm0: ids[1], ids[3]
    repo = Repository.open(path)
    tagged = write_archive(
        repo,
        {"disk/vda": b"t" * 3000},
        domain="vm1",
        time="2026-05-01T12:00:00Z",  # the oldest of vm1
        extra={"tags": ["pre-upgrade"]},
    )
    repo.close()
    r = cli("prune", "vm1", "--keep-last", "1", "--keep-tag", "pre-upgrade", "--json")
    assert r.code == 2 and "VMARCHIVE_REPO" in r.err  # still needs a repository
    r = cli(
        "prune", "vm1", "--keep-last", "1", "--keep-tag", "pre-upgrade", "--json", "--repo", path
    )
    assert r.code == 0, r.err
    plan = r.json()
    assert isinstance(plan, dict)
    assert {a["id"]: a["reasons"] for a in plan["keep"]} == {
        ids[4]: ["last #1"],
        tagged: ["tag pre-upgrade"],
    }
    assert sorted(a["id"] for a in plan["forget"]) == sorted([ids[0], ids[2]])
    left = [a["id"] for a in cli("list", "--json", "--repo", path).json()]
    assert sorted(left) == sorted([tagged, ids[1], ids[3], ids[4]])  # vm0 untouched
    args = ["prune", "no-such-vm", "--keep-last", "1", "--repo", path]
    p = subprocess.run(
        [sys.executable, "-m", "vmarchive", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert p.returncode == 0 and "no archive of domain 'no-such-vm'" in p.stderr, p.stderr
    assert len(cli("list", "--json", "--repo", path).json()) == 4


def test_init_chunk_sizes(cli: Cli, tmp_path: pathlib.Path) -> None:
    """--disk-chunk-size / --memory-chunk-size set the repository's defaults, which the
    streams of later archives take; bad sizes are one line and exit 2, nothing created."""
    plain = str(tmp_path / "plain")
    r = cli("init", "--repo", plain, "--json")
    assert r.code == 0, r.err
    assert (r.json()["disk_chunk_size"], r.json()["memory_chunk_size"]) == (256 << 10, 64 << 10)
    path = str(tmp_path / "c")
    r = cli(
        *("init", "--repo", path, "--json"),
        *("--disk-chunk-size", "64K", "--memory-chunk-size", "128KiB"),
    )
    assert r.code == 0, r.err
    assert (r.json()["disk_chunk_size"], r.json()["memory_chunk_size"]) == (64 << 10, 128 << 10)
    with Repository.open(path) as repo, repo.writer() as w:
        assert w.stream("disk:vda", "disk", 1 << 20).chunk_size == 64 << 10
        assert w.stream("ram:pc.ram", "ram", 1 << 20).chunk_size == 128 << 10
    for opt, bad in [
        ("--disk-chunk-size", "64Q"),
        ("--disk-chunk-size", "6K"),
        ("--disk-chunk-size", "32M"),
        ("--memory-chunk-size", "0"),
        ("--memory-chunk-size", "2k5"),
    ]:
        r = cli("init", "--repo", str(tmp_path / "bad"), opt, bad)
        assert r.code == 2 and opt in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert not (tmp_path / "bad").exists()
    r = cli("init", "--repo", str(tmp_path / "m"), "--disk-chunk-size", "1M")
    assert r.code == 0, r.err


def test_init_errors_and_encryption(
    cli: Cli, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "e")
    assert cli("init", "--repo", path, "--encryption", "rot13").code == 2
    assert cli("init", "--repo", path, "--id-algorithm", "md5").code == 2
    r = cli("init", "--repo", path, "--encryption", "aes-256-gcm")
    assert r.code == 2 and "VMARCHIVE_PASSPHRASE" in r.err  # no terminal in tests
    monkeypatch.setenv("VMARCHIVE_PASSPHRASE", "s3cret")
    r = cli("init", "--repo", path, "--encryption", "aes-256-gcm", "--json")
    assert r.code == 0 and r.json()["encryption"] == "aes-256-gcm"
    assert "s3cret" not in r.out + r.err
    assert cli("init", "--repo", path).code == 2  # exists
    assert cli("list", "--json", "--repo", path).json() == []
    monkeypatch.setenv("VMARCHIVE_PASSPHRASE", "wrong")
    r = cli("list", "--repo", path)
    assert r.code == 3 and "passphrase" in r.err
    monkeypatch.delenv("VMARCHIVE_PASSPHRASE")
    r = cli("list", "--repo", path)
    assert r.code == 3 and "VMARCHIVE_PASSPHRASE" in r.err


def test_missing_repository_no_traceback(tmp_path: pathlib.Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "vmarchive", "list", "--repo", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 3
    assert run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    assert "no vmarchive repository" in run.stderr


def test_rebuild_index_command(cli: Cli, repo_with_archives: tuple[str, list[str]]) -> None:
    import shutil

    path, ids = repo_with_archives
    shutil.rmtree(pathlib.Path(path, "index"))
    r = cli("verify", "--json", "--repo", path)
    assert r.code == 4 and sorted(r.json()["damaged"]) == sorted(ids)
    r = cli("rebuild-index", "--json", "--repo", path)
    assert r.code == 0 and r.json()["chunks_added"] > 0
    assert cli("verify", "--full", "--repo", path).code == 0


def test_info_shows_nested_metadata_for_people(cli: Cli, tmp_path: pathlib.Path) -> None:
    """``info`` without --json: nested objects indented under their key, lists of small
    flat objects as tables (addresses in hex), byte counts with their size, a disk's
    target first, null as '-' -- not Python's repr of the dicts."""
    path = str(tmp_path / "r")
    assert cli("init", "--repo", path).code == 0
    disk = {
        "bytes_read": 65536,
        "bytes_referenced": 402653184,
        "bytes_stored": 262144,
        "copied": True,
        "fallback_reason": None,
        "incremental": True,
        "reason": None,
        "size": 1073741824,
        "target": "vda",
    }
    ranges = [
        {"block": "pc.ram", "offset": 0, "size": 655360, "start": 0},
        {"block": "pc.ram", "offset": 1048576, "size": 535822336, "start": 1048576},
    ]
    extra = {
        "parent": None,
        "disks": [disk],
        "memory_map": {"ranges": ranges, "version": 1},
        "tags": ["nightly", "pre-upgrade"],
    }
    aid = write_archive(
        Repository.open(path), {"disk:vda": bytes(70_000)}, kind="disk", extra=extra
    )
    r = cli("info", aid, "--repo", path)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "{'" not in r.out and "[{" not in r.out, r.out
    assert "  parent           -" in lines
    assert "  tags             nightly, pre-upgrade" in lines
    at = lines.index("  disks")
    assert lines[at + 1] == "    - target           vda"
    assert "      bytes_referenced 402653184 (384.0 MiB)" in lines[at + 2 : at + 6]
    assert "      fallback_reason  -" in lines and "      incremental      true" in lines
    at = lines.index("    ranges")
    assert lines[at + 1].split() == ["block", "offset", "size", "start"]
    assert lines[at + 3].split() == ["pc.ram", "0x100000", "511.0", "MiB", "0x100000"]
    assert "    version 1" in lines
    assert "  stream disk:vda (disk): 68.4 KiB, 1 chunk of 256.0 KiB, 1 hole" in lines


def test_list_is_a_table_with_a_header(cli: Cli, tmp_path: pathlib.Path) -> None:
    """Text ``list``: a header, columns as wide as their widest cell (a long domain name
    does not shift the others), the time to the second, mode and tags; an empty repository
    says so."""
    path = str(tmp_path / "r")
    assert cli("init", "--repo", path).code == 0
    assert cli("list", "--repo", path).out == "no archives\n"
    repo = Repository.open(path)
    long_name = "a-domain-with-a-name-longer-than-twenty"
    ids = [
        write_archive(
            repo,
            {"disk:vda": random.Random(1).randbytes(5000)},
            domain="web01",
            time="2026-05-01T12:00:00.123456+00:00",
            extra={"mode": "snapshot", "tags": ["nightly", "pre-upgrade"]},
        ),
        write_archive(
            repo,
            {"disk:vda": random.Random(2).randbytes(5000)},
            domain=long_name,
            time="2026-05-02T13:30:05Z",
            extra={"mode": "disk-only"},
        ),
    ]
    r = cli("list", "--repo", path)
    assert r.code == 0, r.err
    head, first, second = r.out.splitlines()
    assert head.split() == ["ID", "TIME", "(UTC)", "DOMAIN", "KIND", "MODE", "SIZE", "TAGS"]
    assert first.startswith(f"{ids[0][:12]}  2026-05-01 12:00:00  web01 ")
    assert first.endswith("snapshot   4.9 KiB  nightly, pre-upgrade")
    assert second.startswith(f"{ids[1][:12]}  2026-05-02 13:30:05  {long_name}  full")
    assert second.endswith("disk-only  4.9 KiB  -")
    # the columns line up: each starts where its header does
    for word in ("DOMAIN", "KIND", "MODE", "SIZE", "TAGS"):
        at = head.index(word)
        assert first[at - 2 : at] == "  " and first[at] != " ", word
        assert second[at - 2 : at] == "  " and second[at] != " ", word
