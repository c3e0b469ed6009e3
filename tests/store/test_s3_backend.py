"""The S3 backend against a real Ceph radosgw: the shared backend contract, plus what only
S3 has (locations, multipart, parallel ranged GETs, clear errors for a wrong key or a
missing bucket, no credentials in messages)."""

from __future__ import annotations

import os
import pathlib

import pytest
from backend_contract import BackendContract
from s3helpers import Ceph

from vmarchive.errors import BackendError
from vmarchive.store.backend import Backend, ObjectNotFoundError, open_backend
from vmarchive.store.s3 import (
    S3AccessError,
    S3Backend,
    S3BucketNotFoundError,
    S3Options,
)

pytestmark = pytest.mark.s3


class TestS3Backend(BackendContract):
    """The same contract LocalBackend passes, on Ceph (each test in a fresh prefix)."""

    @pytest.fixture
    def backend(self, ceph: Ceph) -> Backend:
        return ceph.backend()


class TestS3BackendSmallParts(BackendContract):
    """Again with tiny parts, so every large-object path (multipart, parallel GETs) runs."""

    @pytest.fixture
    def backend(self, ceph: Ceph) -> Backend:
        return ceph.backend(part_size=5 << 20, multipart_threshold=6 << 20)


def test_open_backend_s3_location(ceph: Ceph) -> None:
    b = open_backend(f"s3://{ceph.bucket}/some/prefix")
    assert isinstance(b, S3Backend)
    assert (b.bucket, b.prefix, b.location) == (ceph.bucket, "some/prefix/", b.location)
    assert b.location == f"s3://{ceph.bucket}/some/prefix"


def test_prefixes_are_separate_namespaces(ceph: Ceph) -> None:
    a = ceph.backend()
    b = ceph.backend()
    a.put("config", b"a")
    assert not b.exists("config")
    assert [o.key for o in a.list("")] == ["config"]


def test_multipart_and_parallel_ranges(ceph: Ceph) -> None:
    b = ceph.backend(part_size=5 << 20, multipart_threshold=5 << 20)
    data = os.urandom(5 << 20) * 3 + b"tail"
    assert b.put("data/aa/big", data, create_only=True) is True
    assert b.put("data/aa/big", b"other", create_only=True) is False
    assert b.get("data/aa/big") == data
    assert (
        b.get_range("data/aa/big", (5 << 20) - 3, (10 << 20) + 10)
        == data[(5 << 20) - 3 : (15 << 20) + 7]
    )
    assert b.get_range("data/aa/big", len(data) - 4, 100) == b"tail"
    # Nothing left half-uploaded.
    assert b.clean_temporaries(older_than=0) == 0


def test_crashed_multipart_upload_is_invisible_and_cleaned(ceph: Ceph) -> None:
    b = ceph.backend()
    key = b.prefix + "data/bb/partial"
    up = b._client.create_multipart_upload(Bucket=b.bucket, Key=key)
    b._client.upload_part(
        Bucket=b.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 100
    )
    assert list(b.list("")) == []
    assert b.clean_temporaries(older_than=3600) == 0
    assert b.clean_temporaries(older_than=0) == 1
    assert (
        b._client.list_multipart_uploads(Bucket=b.bucket, Prefix=b.prefix).get("Uploads", []) == []
    )


def test_missing_bucket_is_one_clear_error(ceph: Ceph) -> None:
    b = ceph.backend("s3://no-such-bucket-vma/x")
    with pytest.raises(S3BucketNotFoundError, match="bucket 'no-such-bucket-vma' does not exist"):
        list(b.list(""))
    with pytest.raises(S3BucketNotFoundError):
        b.get("config")
    with pytest.raises(S3BucketNotFoundError):
        b.put("config", b"x")


def test_wrong_key_is_one_clear_error_without_the_secret(
    ceph: Ceph, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = ceph.backend()
    good.put("config", b"x")
    wrong_secret = "not-the-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    b = S3Backend.from_location(good.location, ceph.options(max_attempts=1))
    with pytest.raises(S3AccessError) as ei:
        b.get("config")
    msg = str(ei.value)
    assert "wrong access key or secret" in msg and "\n" not in msg
    assert wrong_secret not in msg and os.environ["AWS_ACCESS_KEY_ID"] not in repr(b)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    b = S3Backend.from_location(good.location, ceph.options(max_attempts=1))
    with pytest.raises(S3AccessError):
        list(b.list(""))
    # Control: the right credentials work.
    monkeypatch.undo()
    assert S3Backend.from_location(good.location, ceph.options()).get("config") == b"x"


def test_no_credentials(ceph: Ceph, monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    b = S3Backend.from_location(f"s3://{ceph.bucket}/x", ceph.options(max_attempts=1))
    with pytest.raises(S3AccessError, match="no S3 credentials"):
        b.get("config")


def test_unreachable_endpoint_is_a_backend_error(ceph: Ceph) -> None:
    opts = S3Options(endpoint="http://127.0.0.1:9", max_attempts=2, connect_timeout=1)
    b = S3Backend.from_location("s3://bucket/x", opts)
    with pytest.raises(BackendError, match="Could not connect") as ei:
        b.get("config")
    assert not isinstance(ei.value, ObjectNotFoundError)


def _count_gets(b: S3Backend) -> list[str]:
    seen: list[str] = []
    b._client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: seen.append(request.url)
    )
    return seen


@pytest.mark.parametrize("cache", [64 << 20, 0])
def test_pack_cache_turns_blob_reads_into_one_fetch(ceph: Ceph, cache: int) -> None:
    b = ceph.backend(pack_cache_bytes=cache, part_size=5 << 20)
    pack = os.urandom(6 << 20)
    b.put("data/cd/pack", pack)
    gets = _count_gets(b)
    step = 64 * 1024
    for off in range(0, len(pack), step):
        assert b.get_range("data/cd/pack", off, step) == pack[off : off + step]
    assert b.get_range("data/cd/pack", len(pack) - 5, 100) == pack[-5:]
    if cache:
        assert len(gets) == 4  # two blobs alone, then the pack whole (two parts)
    else:  # negative control: a request per blob
        assert len(gets) == len(pack) // step + 1
    b.delete("data/cd/pack")
    with pytest.raises(ObjectNotFoundError):
        b.get_range("data/cd/pack", 0, 10)


def test_pack_cache_concurrent_readers_fetch_once(ceph: Ceph) -> None:
    from concurrent.futures import ThreadPoolExecutor

    b = ceph.backend()
    pack = os.urandom(2 << 20)
    b.put("data/ef/pack", pack)
    b.get_range("data/ef/pack", 0, 10)  # first touches: plain GETs
    b.get_range("data/ef/pack", len(pack) - 10, 10)
    gets = _count_gets(b)
    offsets = list(range(0, len(pack), 4096))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda o: b.get_range("data/ef/pack", o, 4096), offsets))
    assert got == [pack[o : o + 4096] for o in offsets]
    assert len(gets) == 1
    # Objects outside data/ (manifests, index files) are never cached.
    b.put("index/x", b"abc")
    for _ in range(3):
        b.get_range("index/x", 0, 2)
    assert len(gets) == 4


@pytest.mark.parametrize("copies", [64 << 20, 0])
def test_packs_to_read_back_are_read_from_local_copies(
    ceph: Ceph, copies: int, tmp_path: pathlib.Path
) -> None:
    b = ceph.backend(written_copy_bytes=copies, cache_dir=str(tmp_path))
    pack = os.urandom(3 << 20)
    b.put("data/ab/pack", pack)
    b.will_read_back("data/ab/pack", pack)
    b.put("data/ab/other", pack)  # no hint: not kept
    b.put("index/ab", b"not a pack")
    b.will_read_back("index/ab", b"not a pack")  # only packs are kept
    # Gone from the store behind the backend's back: only a local copy can still answer.
    other = ceph.backend(b.location)
    for key in ("data/ab/pack", "data/ab/other", "index/ab"):
        other.delete(key)
    gets = _count_gets(b)
    if copies:
        assert b.get_range("data/ab/pack", 5, 100) == pack[5:105]
        assert b.get_range("data/ab/pack", len(pack) - 3, 10) == pack[-3:]
        assert gets == []
        assert os.listdir(tmp_path / "s3") == []  # unlinked: nothing to leave behind
    else:  # negative control: without copies the read goes to the store
        with pytest.raises(ObjectNotFoundError):
            b.get_range("data/ab/pack", 5, 100)
        assert len(gets) == 1
    for key in ("data/ab/other", "index/ab"):
        with pytest.raises(ObjectNotFoundError):
            b.get_range(key, 0, 3)
    # A pack deleted through this backend is not served any more.
    b.put("data/ab/second", pack)
    b.will_read_back("data/ab/second", pack)
    b.delete("data/ab/second")
    with pytest.raises(ObjectNotFoundError):
        b.get_range("data/ab/second", 0, 10)
    b.close()


def test_cli_on_s3_one_line_errors(ceph: Ceph) -> None:
    import subprocess
    import sys

    def vma(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vmarchive", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "AWS_MAX_ATTEMPTS": "1", **env},
            timeout=120,
        )

    location = ceph.fresh_location()
    assert vma("init", "--repo", location).returncode == 0
    ok = vma("list", "--repo", location, "--json")
    assert ok.returncode == 0, ok.stderr
    bucket = location.split("/")[2]
    cases = [
        (("list", "--repo", location.replace(bucket, "no-such-bucket-vma")), {}, "does not exist"),
        (("list", "--repo", location), {"AWS_SECRET_ACCESS_KEY": "wrong-secret-1234"}, "wrong"),
        (("list", "--repo", location), {"VMARCHIVE_S3_ENDPOINT": "http://127.0.0.1:9"}, "connect"),
    ]
    for args, env, words in cases:
        r = vma(*args, **env)
        assert r.returncode == 3, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], r.stderr
        assert "wrong-secret-1234" not in r.stderr + r.stdout
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in r.stderr + r.stdout


def test_debug_output_never_shows_credentials(ceph: Ceph) -> None:
    """``--debug`` shows vmarchive's own details but not botocore's request dumps, which
    carry the access key id and every request's signature."""
    import logging
    import subprocess
    import sys

    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    location = ceph.fresh_location()
    b = ceph.backend()
    # Control: the check below fires where botocore logs at debug level.
    records: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[assignment]
    boto_log = logging.getLogger("botocore")
    old_level = boto_log.level
    boto_log.addHandler(handler)
    boto_log.setLevel(logging.DEBUG)
    try:
        list(b.list(""))
    finally:
        boto_log.removeHandler(handler)
        boto_log.setLevel(old_level)
        b.close()
    assert any(key_id in m for m in records)

    for args in (("init", "--repo", location), ("stats", "--repo", location)):
        r = subprocess.run(
            [sys.executable, "-m", "vmarchive", "--debug", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert f"vmarchive.store.repository: {'created' if args[0] == 'init' else 'chunk'}" in (
            r.stderr
        )  # --debug output is on
        out = r.stderr + r.stdout
        assert key_id not in out and "Signature=" not in out and "Authorization" not in out
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out
