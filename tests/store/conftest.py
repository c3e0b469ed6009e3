"""Fixtures of the store tests: a real single-node Ceph with an S3 gateway.

``ceph`` starts one fresh cluster per test session with ``scripts/ceph`` (mon + memstore
OSD + radosgw on loopback, ~3 s; the script installs Debian's packages when missing) and
stops it at the end.  ``VMARCHIVE_TEST_S3_ENDPOINT`` (with the ``AWS_*`` credentials in the
environment and a bucket in ``VMARCHIVE_TEST_S3_BUCKET``) runs the same tests against
another S3 store instead.  Tests that use these fixtures are marked ``s3``.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Iterator

import pytest
from s3helpers import CEPH_SCRIPT, Ceph


def _free_ports() -> tuple[int, int]:
    """Two free TCP ports on 127.0.0.1: a pair's first (the one after it free too: the
    mon's v2 and v1 ports) and another (the S3 gateway's).  All three are held bound until
    all are found, so the kernel cannot hand one of them out twice (it did once: the gateway
    was given the mon's port and S3 clients met the mon's "ceph v2" banner)."""
    held: list[socket.socket] = []
    try:
        for _ in range(50):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port >= 65535:
                continue
            s2 = socket.socket()
            held.append(s2)
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            s3 = socket.socket()
            held.append(s3)
            s3.bind(("127.0.0.1", 0))
            return port, int(s3.getsockname()[1])
        raise RuntimeError("no free port pair")
    finally:
        for s in held:
            s.close()


def _read_env(path: pathlib.Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export ") :].split("=", 1)
            out[k] = v
    return out


_BASE_PREFIX = "/var/tmp/vmarchive-ceph-"


def _stop_orphans() -> None:
    """Stop clusters left by test sessions that were killed (their daemons hold RAM)."""
    for base in pathlib.Path("/var/tmp").glob("vmarchive-ceph-*"):
        pid = base.name.rsplit("-", 1)[1]
        if pid.isdigit() and not pathlib.Path(f"/proc/{pid}").exists():
            subprocess.run([str(CEPH_SCRIPT), "stop", str(base)], check=False, timeout=120)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A running S3 store for the whole session (started here unless one is given)."""
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    # Processes that open s3:// locations as users do keep their cache here, not in ~.
    os.environ["VMARCHIVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("s3cache"))
    external = os.environ.get("VMARCHIVE_TEST_S3_ENDPOINT")
    base: pathlib.Path | None = None
    try:
        if external:
            bucket = os.environ.get("VMARCHIVE_TEST_S3_BUCKET", "")
            if not bucket:
                pytest.fail("VMARCHIVE_TEST_S3_ENDPOINT needs VMARCHIVE_TEST_S3_BUCKET")
            c = Ceph(external, bucket, None, dict(os.environ))
        else:
            if os.geteuid() != 0:
                pytest.skip("starting Ceph needs root (scripts/ceph)")
            _stop_orphans()
            base = pathlib.Path(
                os.environ.get("VMARCHIVE_TEST_CEPH_BASE", f"{_BASE_PREFIX}{os.getpid()}")
            )
            env = dict(os.environ)
            mon_port, rgw_port = _free_ports()
            env["VMARCHIVE_CEPH_MON_PORT"] = str(mon_port)
            env["VMARCHIVE_CEPH_RGW_PORT"] = str(rgw_port)
            subprocess.run([str(CEPH_SCRIPT), "start", str(base)], check=True, env=env, timeout=900)
            creds = _read_env(base / "s3.env")
            os.environ.update(creds)
            env.update(creds)
            c = Ceph(creds["VMARCHIVE_S3_ENDPOINT"], "vmarchive-test", base, env)
            c.backend(f"s3://{c.bucket}")._client.create_bucket(Bucket=c.bucket)
        os.environ["VMARCHIVE_S3_ENDPOINT"] = c.endpoint
        yield c
    finally:
        if base is not None:
            subprocess.run([str(CEPH_SCRIPT), "stop", str(base)], check=False, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "VMARCHIVE_S3_ENDPOINT",
    "VMARCHIVE_CACHE_DIR",
)
