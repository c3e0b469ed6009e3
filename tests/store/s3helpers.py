"""The S3 store the S3 tests run against (the ``ceph`` fixture of ``conftest.py``)."""

from __future__ import annotations

import pathlib
import secrets
import subprocess
from dataclasses import dataclass

from vmarchive.store.s3 import S3Backend, S3Options

ROOT = pathlib.Path(__file__).resolve().parents[2]
CEPH_SCRIPT = ROOT / "scripts" / "ceph"


@dataclass
class Ceph:
    """A running S3 store: endpoint, one bucket for the session, and how to break it."""

    endpoint: str
    bucket: str
    base: pathlib.Path | None  # None: an external store (no gateway restarts)
    env: dict[str, str]

    def options(self, **kw: object) -> S3Options:
        return S3Options(endpoint=self.endpoint, **kw)  # type: ignore[arg-type]

    def fresh_location(self) -> str:
        """An empty ``s3://`` location of its own (a new prefix in the session bucket)."""
        return f"s3://{self.bucket}/t/{secrets.token_hex(6)}"

    def backend(self, location: str | None = None, **kw: object) -> S3Backend:
        return S3Backend.from_location(location or self.fresh_location(), self.options(**kw))

    def script(self, command: str) -> None:
        assert self.base is not None, "an external store cannot be stopped"
        subprocess.run(
            [str(CEPH_SCRIPT), command, str(self.base)], check=True, env=self.env, timeout=120
        )
