"""The repository and maintenance tests of the local backend, run again on Ceph.

The test functions of ``test_store_repository`` and ``test_store_maintenance`` are
collected here a second time; an autouse fixture turns every repository "path" they use
into an ``s3://`` location of its own (a fresh prefix in the session bucket), both where
they name a path (``open_backend``) and where they build a ``LocalBackend`` themselves.
Nothing in those tests knows which backend runs under them.  Tests that inspect local
files by hand (temporaries, ``os.listdir``) are listed in ``LOCAL_ONLY`` and skipped here,
each with its reason.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import test_store_maintenance as maint_tests
import test_store_repository as repo_tests
from s3helpers import Ceph

from vmarchive.store import local as local_module
from vmarchive.store import repository as repository_module
from vmarchive.store.backend import Backend

pytestmark = pytest.mark.s3

#: name -> why it cannot run on S3.
LOCAL_ONLY = {
    "test_gc_removes_old_temporaries_only": "plants a .tmp file in the repository directory",
}


def _collect(module: object) -> dict[str, object]:
    return {
        name: obj
        for name, obj in vars(module).items()
        if name.startswith("test_") and callable(obj) and name not in LOCAL_ONLY
    }


# Collected by pytest as tests of this module (with their parametrisations).
globals().update(_collect(repo_tests))
globals().update(_collect(maint_tests))


@pytest.fixture(autouse=True)
def _paths_are_s3_locations(ceph: Ceph, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    run = os.urandom(4).hex()

    def location(path: object) -> str:
        digest = hashlib.sha256(str(os.path.abspath(str(path))).encode()).hexdigest()[:16]
        return f"s3://{ceph.bucket}/r/{run}/{digest}"

    def backend_for(path: object) -> Backend:
        text = str(path)
        return ceph.backend(text if text.startswith("s3://") else location(text))

    monkeypatch.setattr(repository_module, "open_backend", backend_for)
    # Also for tests that import LocalBackend inside their body.
    monkeypatch.setattr(local_module, "LocalBackend", backend_for)
    for mod in (repo_tests, maint_tests):
        if hasattr(mod, "LocalBackend"):
            monkeypatch.setattr(mod, "LocalBackend", backend_for)
    yield
