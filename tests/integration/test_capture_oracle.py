"""Oracle: the archived RAM is exactly the guest's RAM at the instant, page by page.

The capture is held (``VMARCHIVE_HOLD_AT``, vmarchive/store/crashpoint.py) at
``capture-disks-fixed``: in switchover mode the guest is paused at ``pre-switchover`` and
stays paused until the capture's ``cont`` after ``completed``; in snapshot mode it is stopped
before ``migrate`` starts (background-snapshot saves the pages as of that moment).  While
held, QEMU writes every RAM-backed guest-physical range to a file (``pmemsave``): the truth.
The archive's ``ram:<block>`` streams are compared with it range by range, page by page.

Negative control: a second dump taken after the capture, the guest running its RAM churn,
must differ from the archive (else the comparison could not see anything).
"""

from __future__ import annotations

import io
import os
import pathlib
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

import vmarchive.format.migstream as ms
from vmarchive.hypervisor.connection import Connection
from vmarchive.hypervisor.memmap import MemoryMap, collect_memory_map
from vmarchive.hypervisor.qmp import QMP
from vmarchive.ops.capture import CaptureOptions, CaptureResult, Mode, capture, snapshot_supported
from vmarchive.store import Repository
from vmarchive.store.codecs import InitOptions

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import guestlib  # noqa: E402

pytestmark = pytest.mark.libvirt

HOLD_POINT = "capture-disks-fixed"
CONT_POINT = "capture-cont"
RUNS = int(os.environ.get("ORACLE_RUNS", "2"))


@pytest.fixture(scope="module")
def guest(module_guest_factory: guestlib.GuestFactory) -> guestlib.Guest:
    spec = guestlib.GuestSpec(memory_mib=160, params={"tick_ms": 50, "churn": 32, "fill": 32})
    g = module_guest_factory(spec)
    g.wait_ticks(3)
    return g


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    base = tmp_path_factory.mktemp("oracle")
    Repository.init(str(base / "repo"), InitOptions()).close()
    (base / "state").mkdir()
    return {"repo": base / "repo", "state": base / "state", "base": base}


def dump(g: guestlib.Guest, where: pathlib.Path) -> tuple[MemoryMap, dict[int, bytes]]:
    """The guest's RAM-backed physical ranges, written by QEMU itself (``pmemsave``)."""
    with Connection.open(guestlib.URI) as c:
        q = QMP(c.lookup(g.name))
        mmap = MemoryMap.from_json(collect_memory_map(q)["memory_map"])
        out: dict[int, bytes] = {}
        for r in mmap.ranges:
            f = where / f"{r.start:x}.bin"
            q.execute("pmemsave", {"val": r.start, "size": r.size, "filename": str(f)})
            out[r.start] = f.read_bytes()
            f.unlink()
    return mmap, out


def differing(repo: Repository, aid: str, mmap: MemoryMap, truth: dict[int, bytes]) -> list[str]:
    """``block+offset@phys`` of every page whose archived bytes differ from ``truth``."""
    archive = repo.load_archive(aid)
    names = {s.name for s in archive.streams}
    bad: list[str] = []
    for r in mmap.ranges:
        if r.readonly:
            continue
        stream = f"ram:{r.block}"
        assert stream in names, f"no {stream} in the archive"
        got = repo.open_stream(archive, stream).read_range(r.offset, r.size)
        want = truth[r.start]
        assert len(got) == len(want) == r.size
        for p in range(0, r.size, guestlib.PAGE):
            if got[p : p + guestlib.PAGE] != want[p : p + guestlib.PAGE]:
                bad.append(f"{r.block}+{r.offset + p:#x}@{r.start + p:#x}")
    return bad


def page_diffs(mmap: MemoryMap, a: dict[int, bytes], b: dict[int, bytes]) -> list[str]:
    """``phys(block+offset, n bytes)`` of every page that differs between two dumps."""
    out = []
    for rg in mmap.ranges:
        for p in range(0, rg.size, guestlib.PAGE):
            x = a[rg.start][p : p + guestlib.PAGE]
            y = b[rg.start][p : p + guestlib.PAGE]
            if x != y:
                n = sum(i != j for i, j in zip(x, y, strict=True))
                out.append(f"{rg.start + p:#x}({rg.block}+{rg.offset + p:#x},{n}B)")
    return out


@pytest.fixture
def holddir(monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="vmatest-hold") as d:
        p = pathlib.Path(d)
        os.chmod(p, 0o777)  # QEMU (libvirt-qemu) writes the pmemsave files here
        monkeypatch.setenv("VMARCHIVE_HOLD_AT", f"{HOLD_POINT},{CONT_POINT}:{p}")
        yield p


def _await(hold: pathlib.Path, point: str, t: threading.Thread) -> bool:
    while not (hold / f"{point}.reached").exists() and t.is_alive():
        time.sleep(0.01)
    return (hold / f"{point}.reached").exists()


def held_capture(
    g: guestlib.Guest,
    env: dict[str, pathlib.Path],
    mode: Mode,
    hold: pathlib.Path,
    **kw: object,
) -> tuple[CaptureResult, MemoryMap, dict[int, bytes], dict[int, bytes] | None]:
    """Capture; the RAM dumped at the hold point and (switchover) again just before ``cont``."""
    for p in (HOLD_POINT, CONT_POINT):
        for f in ("reached", "release"):
            (hold / f"{p}.{f}").unlink(missing_ok=True)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["r"] = capture(
                CaptureOptions(
                    domain=g.name,
                    repo=str(env["repo"]),
                    uri=guestlib.URI,
                    state_dir=env["state"],
                    mode=mode,
                    **kw,  # type: ignore[arg-type]
                )
            )
        except BaseException as e:  # re-raised below
            box["e"] = e

    t = threading.Thread(target=run)
    t.start()
    at_cont: dict[int, bytes] | None = None
    try:
        assert _await(hold, HOLD_POINT, t), f"capture never reached {HOLD_POINT}: {box}"
        mmap, truth = dump(g, hold)
        (hold / f"{HOLD_POINT}.release").touch()
        if mode == Mode.SWITCHOVER and _await(hold, CONT_POINT, t):
            _mmap, at_cont = dump(g, hold)
    finally:
        for p in (HOLD_POINT, CONT_POINT):
            (hold / f"{p}.release").touch()
        t.join()
    if "e" in box:
        raise box["e"]  # type: ignore[misc]
    r = box["r"]
    assert isinstance(r, CaptureResult)
    return r, mmap, truth, at_cont


@pytest.mark.parametrize("mode", [Mode.SWITCHOVER, Mode.SNAPSHOT])
def test_archived_ram_is_the_ram_at_the_instant(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], holddir: pathlib.Path, mode: Mode
) -> None:
    if mode == Mode.SNAPSHOT:
        with Connection.open(guestlib.URI) as c:
            ok, why = snapshot_supported(QMP(c.lookup(guest.name)))
        if not ok:
            pytest.skip(why)
    mark = guest.serial.mark()
    for run in range(RUNS):
        r, mmap, truth, at_cont = held_capture(guest, env, mode, holddir)
        with Repository.open(str(env["repo"])) as repo:
            # Switchover: the RAM did not move while paused, and the archive is that RAM.
            if at_cont is not None:
                moved = page_diffs(mmap, truth, at_cont)
                assert not moved, f"RAM changed while paused: {len(moved)} pages {moved[:30]}"
            bad = differing(repo, r.id, mmap, truth)
            assert not bad, f"{mode.value} run {run}: {len(bad)} pages differ: {bad[:20]}"
            # Negative control: the same comparison sees the guest's churn a moment later.
            time.sleep(1)
            mmap2, later = dump(guest, holddir)
            assert differing(repo, r.id, mmap2, later), "a later dump matched: blind oracle"
    assert not guest.serial.trouble(mark), guest.serial.tail()


@pytest.mark.skipif(
    not os.environ.get("ORACLE_TCG_BUG"),
    reason="evidence of QEMU 7.2's TCG dirty-tracking bug; ORACLE_TCG_BUG=1 runs it",
)
def test_live_precopy_under_tcg_still_misses_writes(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], holddir: pathlib.Path
) -> None:
    """Why switchover mode stops a TCG guest for the whole copy (capture_cleanup.stop_if_tcg).

    QEMU 7.2 does not re-arm TCG's write tracking after each dirty-bitmap sync (fixed in
    QEMU 9.0 by "physmem: Fix migration dirty bitmap coherency with TCG memory access"):
    a page written again through a TLB entry already marked dirty is never sent again.
    Copied live, the archive then holds stale pages although the guest was paused at the
    end.  If this test fails, the QEMU in use is fixed and the stop can go for it.

    Evidence, not a product check (the exactness tests above are that): the bug needs
    a page re-written through a TLB entry marked dirty before a sync, which a fresh guest
    showed in the first run every time (26-36 stale pages) but a guest already captured
    a few times did not in 4 runs under CI load.  So it runs on request only:
    ``ORACLE_TCG_BUG=1 pytest tests/integration/test_capture_oracle.py -k live``.
    """
    stale: list[int] = []
    for _run in range(4):
        r, mmap, truth, _ = held_capture(
            guest, env, Mode.SWITCHOVER, holddir, tcg_live_precopy=True
        )
        with Repository.open(str(env["repo"])) as repo:
            stale.append(len(differing(repo, r.id, mmap, truth)))
        if stale[-1]:
            break
    print(f"stale pages per live run: {stale}")
    assert stale[-1] > 0, f"live precopy under TCG was exact in {len(stale)} runs: {stale}"


class _Pages(ms.NullSink):
    """Every block's final pages from a plain parse (the bisect's reference)."""

    def __init__(self) -> None:
        self.blocks: dict[str, bytearray] = {}

    def ram_blocks(self, blocks: list[ms.RamBlock]) -> None:
        self.blocks = {b.idstr: bytearray(b.used_length) for b in blocks}
        self._by_index = {b.index: self.blocks[b.idstr] for b in blocks}

    def ram_page(self, block: ms.RamBlock, offset: int, data: memoryview | None) -> None:
        buf = self._by_index[block.index]
        buf[offset : offset + block.page_size] = (
            bytes(block.page_size) if data is None else bytes(data)
        )


def test_plain_parse_of_the_opaque_stream_is_exact(
    guest: guestlib.Guest, env: dict[str, pathlib.Path], holddir: pathlib.Path
) -> None:
    """The bisect step: QEMU's raw stream (stored opaquely, parsed by the plain parser, no
    RamImage, no chunk reopening) against the RAM just before ``cont``.  This is how the
    TCG precopy loss was told apart from a store/RamImage bug: the raw stream itself
    lacked the last writes to ~20 pages (see capture_cleanup.stop_if_tcg)."""
    r, mmap, truth, at_cont = held_capture(guest, env, Mode.SWITCHOVER, holddir, parse_memory=False)
    assert at_cont is not None
    moved = page_diffs(mmap, truth, at_cont)
    assert not moved, f"RAM changed while paused: {len(moved)} pages {moved[:30]}"
    with Repository.open(str(env["repo"])) as repo:
        a = repo.load_archive(r.id)
        (s,) = [s for s in a.streams if s.kind == "stream"]
        raw = repo.open_stream(a, s.name).read_all()
    sink = _Pages()
    ms.parse_stream(io.BytesIO(raw), sink)
    parsed = {
        rg.start: bytes(sink.blocks[rg.block][rg.offset : rg.offset + rg.size])
        for rg in mmap.ranges
    }
    writable = MemoryMap(tuple(rg for rg in mmap.ranges if not rg.readonly))
    bad = page_diffs(writable, parsed, at_cont)
    assert not bad, f"plain parse vs RAM at cont: {len(bad)} pages differ: {bad[:30]}"
