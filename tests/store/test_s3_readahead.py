"""Read-ahead on S3: a sequential reader (restore) gets the next pack fetched while it
decodes the current one, so after the first pack no blob costs its own round trip."""

from __future__ import annotations

import os

import pytest
from s3helpers import Ceph
from storehelpers import small_options, write_archive

from vmarchive.store import Repository
from vmarchive.store.s3 import S3Backend

pytestmark = pytest.mark.s3


def _data_gets(b: S3Backend) -> list[str]:
    seen: list[str] = []

    def note(request: object, **_: object) -> None:
        url = str(getattr(request, "url", ""))
        if "/data/" in url:
            seen.append(url)

    b._client.meta.events.register("before-send.s3.GetObject", note)
    return seen


@pytest.mark.parametrize("read_ahead", [True, False])
def test_sequential_read_fetches_each_pack_once(ceph: Ceph, read_ahead: bool) -> None:
    location = ceph.fresh_location()
    Repository.init(location, small_options(), backend=ceph.backend(location))
    data = os.urandom(40 * 64 * 1024)  # 640 chunks of 4 KiB: about 40 packs of 64 KiB
    aid = write_archive(Repository.open(location, backend=ceph.backend(location)), {"d": data})

    b = ceph.backend(location, read_ahead=read_ahead, cache_dir=None)
    gets = _data_gets(b)
    repo = Repository.open(location, backend=b)
    archive = repo.load_archive(aid)
    packs = len(
        {
            loc.pack_id
            for loc in (repo._chunk_location(c) for c in archive.stream("d").chunk_ids())
            if loc
        }
    )
    assert packs >= 20
    assert repo.open_stream(archive, "d").read_all() == data
    if read_ahead:  # one whole GET per pack; plain blob reads only until the first is whole
        assert len(gets) <= packs + 2
    else:  # negative control: every pack is first read blob by blob, then fetched whole
        assert len(gets) >= 3 * packs - 2
    b.close()
