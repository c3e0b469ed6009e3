"""`vmarchive doctor`: tells the truth on this host, and each detector can say no.

Facts are checked against independent evidence (sysfs, /proc, the QEMU package), not
against the doctor's own code.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from vmarchive.hypervisor.probe import (
    LibvirtProbe,
    QemuProbe,
    UffdProbe,
    probe_kvm,
    probe_qemu,
    probe_userfaultfd,
)
from vmarchive.ops.doctor import (
    DoctorOptions,
    Status,
    check_huge_pages,
    check_hugetlbfs,
    check_kvm,
    check_modes,
    check_switchover,
    check_userfaultfd,
    run_doctor,
)

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
BAD_URI = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def _vmarchive(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmarchive", *args], capture_output=True, text=True, timeout=120
    )


def _hardware_kvm_here() -> bool:
    mods = any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd"))
    flags = pathlib.Path("/proc/cpuinfo").read_text().split()
    return mods and ("vmx" in flags or "svm" in flags) and os.path.exists("/dev/kvm")


@pytest.mark.libvirt
def test_doctor_reports_this_host_truthfully() -> None:
    report = run_doctor()
    by = {c.name: c for c in report.checks}
    assert by["libvirt"].status is Status.OK and "libvirt 9." in by["libvirt"].summary
    assert by["qemu"].status is Status.OK
    qemu_ver = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    assert by["qemu"].details["version"].split(".")[:2] == qemu_ver.split()[3].split(".")[:2]
    # QEMU >= 6.0 has both capabilities
    assert by["pause-before-switchover"].status is Status.OK
    assert by["background-snapshot"].status is Status.OK
    kvm = by["kvm"]
    if _hardware_kvm_here():
        assert kvm.status is Status.OK
    else:
        assert kvm.status is Status.WARN and "TCG" in kvm.summary
    sysctl = int(pathlib.Path("/proc/sys/vm/unprivileged_userfaultfd").read_text())
    if os.geteuid() == 0:
        assert by["userfaultfd"].status is (Status.OK if sysctl == 1 else Status.WARN)
        if sysctl == 0:
            assert "sysctl vm.unprivileged_userfaultfd=1" in by["userfaultfd"].action
    assert by["capture"].status is Status.OK and report.ok
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if os.geteuid() == 0 and "[never]" not in thp and _kernel_at_least(6, 1):
        assert by["huge-pages"].status is Status.OK, by["huge-pages"]


def _kernel_at_least(major: int, minor: int) -> bool:
    rel = os.uname().release.split("-")[0].split(".")
    return (int(rel[0]), int(rel[1])) >= (major, minor)


def test_huge_page_remap_detector_can_say_no(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each way the remap is out of reach is reported (WARN, with the reason), and a host
    without transparent huge pages has nothing to remap (OK)."""
    from vmarchive.hypervisor import hugepages

    always = tmp_path / "enabled"
    always.write_text("[always] madvise never\n")
    here = check_huge_pages(hugepages.probe_remap(always))
    if os.geteuid() == 0 and _kernel_at_least(6, 1):
        assert here.status is Status.OK  # the positive case the controls below differ from
    with monkeypatch.context() as m:
        m.setitem(hugepages._SYS_PROCESS_MADVISE, os.uname().machine, 9999)  # no such call
        c = check_huge_pages(hugepages.probe_remap(always))
        assert c.status is Status.WARN and "not implemented" in c.explanation, c
    with monkeypatch.context() as m:
        m.setattr(hugepages, "_PM_PFN_MASK", 0)  # as an unprivileged reader sees them
        c = check_huge_pages(hugepages.probe_remap(always))
        assert c.status is Status.WARN and "not root" in c.explanation, c
    never = tmp_path / "never"
    never.write_text("always madvise [never]\n")
    c = check_huge_pages(hugepages.probe_remap(never))
    assert c.status is Status.OK and "off" in c.summary


def test_hugetlbfs_advice_tells_each_case_apart(tmp_path: pathlib.Path) -> None:
    from vmarchive.hypervisor.hugepages import probe_hugetlbfs

    mounts = tmp_path / "mounts"
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal: 24000000 kB\nHugePages_Total:     300\nHugePages_Free:      44\n"
        "Hugepagesize:       2048 kB\n"
    )
    mounts.write_text("/dev/vda / ext4 rw 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw 0 0\n")
    p = probe_hugetlbfs(mounts, meminfo)
    assert (p.mountpoint, p.page_kib, p.total, p.free) == ("/dev/hugepages", 2048, 300, 44)
    c = check_hugetlbfs(p)
    assert c.status is Status.OK and "44 of 300 huge pages of 2 MiB free" in c.summary, c
    meminfo.write_text("HugePages_Total: 0\nHugePages_Free: 0\nHugepagesize: 2048 kB\n")
    c = check_hugetlbfs(probe_hugetlbfs(mounts, meminfo))
    assert "no huge page is reserved" in c.summary and "vm.nr_hugepages" in c.explanation, c
    mounts.write_text("/dev/vda / ext4 rw 0 0\nnone /dev/hugepages tmpfs rw 0 0\n")
    c = check_hugetlbfs(probe_hugetlbfs(mounts, meminfo))
    assert "no hugetlbfs mounted" in c.summary and "mount -t hugetlbfs" in c.explanation, c
    missing = probe_hugetlbfs(tmp_path / "nope", tmp_path / "nope")  # never raises
    assert missing.mountpoint is None and missing.total == 0
    # this host: set up by scripts/setup-host, which mounts it
    assert probe_hugetlbfs().mountpoint is not None


@pytest.mark.libvirt
def test_cli_json_and_text() -> None:
    r = _vmarchive("doctor", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert {c["name"] for c in doc["checks"]} >= {
        "libvirt",
        "qemu",
        "kvm",
        "userfaultfd",
        "capture",
    }
    assert all(c["status"] in ("ok", "warn", "fail") for c in doc["checks"])
    t = _vmarchive("doctor")
    assert t.returncode == 0 and "[ok  ] libvirt:" in t.stdout and "capture is possible" in t.stdout


def test_cli_bad_uri_fails_cleanly() -> None:
    r = _vmarchive("doctor", "--connect", BAD_URI)
    assert r.returncode == 7
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[FAIL] libvirt")]
    assert len(lines) == 1 and "cannot use libvirt" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert "capture is NOT possible" in r.stdout


@pytest.mark.qemu
def test_cli_missing_qemu_binary_reported() -> None:
    r = _vmarchive("doctor", "--json", "--qemu", "/nonexistent/qemu-system-x86_64")
    assert r.returncode == 7
    doc = json.loads(r.stdout)
    qemu = next(c for c in doc["checks"] if c["name"] == "qemu")
    assert qemu["status"] == "fail" and "/nonexistent/qemu-system-x86_64" in qemu["summary"]


@pytest.mark.qemu
def test_qemu_probe_positive_and_not_a_qemu() -> None:
    p = probe_qemu(QEMU)
    assert p.ran and p.capabilities == {
        "pause-before-switchover": True,
        "background-snapshot": True,
    }
    assert p.background_snapshot_accepted is True or os.geteuid() != 0
    fake = probe_qemu("/bin/false", timeout=10)  # runs, exits, never speaks QMP
    assert not fake.ran and fake.error and "did not start" in fake.error


def test_userfaultfd_detector_root_vs_unprivileged(tmp_path: pathlib.Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to test as another user")
    zero = tmp_path / "sysctl0"
    zero.write_text("0\n")
    as_root = probe_userfaultfd(sysctl_path=str(zero), qemu_user="root")
    assert as_root.syscall_ok and as_root.wp_supported and as_root.qemu_user_ok is True
    assert check_userfaultfd(as_root).status is Status.OK
    if int(pathlib.Path("/proc/sys/vm/unprivileged_userfaultfd").read_text()) == 0:
        nobody = probe_userfaultfd(sysctl_path=str(zero), qemu_user="nobody")
        assert nobody.qemu_user_ok is False and "EPERM" in (nobody.qemu_user_error or "")
        c = check_userfaultfd(nobody)
        assert c.status is Status.WARN and "unprivileged_userfaultfd = 0" in c.summary
    missing = probe_userfaultfd(sysctl_path=str(tmp_path / "absent"), qemu_user="no-such-user-x")
    assert missing.unprivileged_sysctl is None and missing.qemu_user_ok is None


def _fake_host(tmp_path: pathlib.Path, modules: list[str], flags: str) -> tuple[str, str]:
    sysfs = tmp_path / "module"
    for m in modules:
        (sysfs / m).mkdir(parents=True)
    sysfs.mkdir(exist_ok=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return str(sysfs), str(cpuinfo)


def test_kvm_detector_tells_hardware_from_paravirtual(tmp_path: pathlib.Path) -> None:
    absent = probe_kvm(str(tmp_path / "kvm"))
    assert not absent.device_present and not absent.usable
    assert check_kvm(absent, LibvirtProbe("x", True)).status is Status.WARN
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host")
    sysfs, cpuinfo = _fake_host(tmp_path / "hw", ["kvm_intel"], "vmx")
    hw = probe_kvm("/dev/kvm", sysfs_modules=sysfs, cpuinfo=cpuinfo)
    if hw.create_vcpu_ok:  # the device works; the module decides
        assert hw.usable and check_kvm(hw, LibvirtProbe("x", True)).status is Status.OK
    sysfs, cpuinfo = _fake_host(tmp_path / "pv", ["kvm_pvm"], "")
    pv = probe_kvm("/dev/kvm", sysfs_modules=sysfs, cpuinfo=cpuinfo)
    assert pv.paravirtual_only and not pv.usable
    c = check_kvm(pv, LibvirtProbe("x", True, libvirt_offers_kvm=True))
    assert c.status is Status.WARN and "kvm_pvm" in c.explanation and "TCG" in c.summary


def test_kvm_on_this_host_matches_sysfs() -> None:
    k = probe_kvm()
    assert k.usable == _hardware_kvm_here()
    assert ("kvm_pvm" in k.modules) == os.path.isdir("/sys/module/kvm_pvm")


def test_capture_needs_at_least_one_mode() -> None:
    lv = LibvirtProbe("x", True, libvirt_version="9.0.0", qemu_version="7.2.0")
    good_uffd = UffdProbe(syscall_ok=True, wp_supported=True, qemu_user_ok=True)
    bad_uffd = UffdProbe(syscall_ok=True, wp_supported=True, qemu_user_ok=False)
    both = QemuProbe(
        "q", True, capabilities={"pause-before-switchover": True, "background-snapshot": True}
    )
    none = QemuProbe(
        "q", True, capabilities={"pause-before-switchover": False, "background-snapshot": False}
    )
    assert check_modes(lv, both, good_uffd).details == {"switchover": True, "snapshot": True}
    assert check_modes(lv, both, bad_uffd).details == {"switchover": True, "snapshot": False}
    c = check_modes(lv, none, good_uffd)
    assert c.status is Status.FAIL and c.required
    assert check_switchover(none).status is Status.FAIL
    down = LibvirtProbe("x", False, error="cannot connect")
    assert check_modes(down, both, good_uffd).status is Status.FAIL


def test_doctor_with_everything_missing_is_not_ok(tmp_path: pathlib.Path) -> None:
    report = run_doctor(
        DoctorOptions(
            uri=BAD_URI,
            qemu_binary=str(tmp_path / "no-qemu"),
            kvm_device=str(tmp_path / "no-kvm"),
            uffd_sysctl=str(tmp_path / "no-sysctl"),
            qemu_user="no-such-user-x",
        )
    )
    assert not report.ok
    assert {c.name for c in report.checks if c.status is Status.FAIL} >= {
        "libvirt",
        "qemu",
        "capture",
    }
    assert (
        report.check("kvm").status is Status.WARN
        and "does not exist" in report.check("kvm").explanation
    )


FAKE_QEMU = """#!{python}
# A stand-in for qemu-system-x86_64: speaks just enough QMP, lacks background-snapshot,
# and hangs up on "quit" without replying (as a dying QEMU may).
import json, socket, sys
path = sys.argv[sys.argv.index("-qmp") + 1].removeprefix("unix:")
s = socket.socket(socket.AF_UNIX)
s.connect(path)
def send(obj):
    s.sendall(json.dumps(obj).encode() + b"\\r\\n")
send({{"QMP": {{"version": {{"qemu": {{"major": 5, "minor": 0, "micro": 1}}, "package": ""}}, "capabilities": []}}}})
buf, dec = "", json.JSONDecoder()
while data := s.recv(65536):
    buf += data.decode()
    while buf.strip():
        try:
            msg, end = dec.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        cmd = msg["execute"]
        if cmd == "quit":
            s.shutdown(socket.SHUT_RDWR)
            sys.exit(0)
        ret = {{}}
        if cmd == "query-version":
            ret = {{"qemu": {{"major": 5, "minor": 0, "micro": 1}}, "package": ""}}
        elif cmd == "query-migrate-capabilities":
            ret = [{{"capability": "pause-before-switchover", "state": False}}, {{"capability": "xbzrle", "state": False}}]
        send({{"return": ret, "id": msg["id"]}} if "id" in msg else {{"return": ret}})
"""


def test_qemu_probe_against_fake_qemu_without_background_snapshot(tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text(FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    for _ in range(5):  # the hang-up after "quit" must never turn into a crash
        p = probe_qemu(str(fake), timeout=20)
        assert p.ran, p.error
        assert p.version == "5.0.1"
        assert p.capabilities == {"pause-before-switchover": True, "background-snapshot": False}
        assert p.background_snapshot_accepted is None
    from vmarchive.ops.doctor import check_background_snapshot

    c = check_background_snapshot(p, UffdProbe(syscall_ok=True, wp_supported=True))
    assert c.status is Status.WARN and "lacks background-snapshot" in c.summary
