"""Domain XML rewriting for restores and clones (vmarchive.ops.restore_xml), pure."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET

import pytest

from vmarchive.errors import FormatError, UsageError
from vmarchive.ops import restore_xml as rx

XML = """<domain type='qemu'>
  <name>web1</name>
  <uuid>7f0443c0-333d-466c-8bfa-3a29ebaf6413</uuid>
  <memory unit='KiB'>163840</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback'/>
      <source file='/old/web1.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg/data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/iso/install.iso'/>
      <target dev='hdc' bus='ide'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <target dev='vnet7'/>
    </interface>
    <serial type='file'>
      <source path='/old/serial.log' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='/old/serial.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='5901' autoport='no' websocket='5701'/>
  </devices>
</domain>"""


def rewrite(**kw: object) -> tuple[rx.RewriteResult, ET.Element]:
    args: dict[str, object] = {
        "name": "web1-copy",
        "disks": {
            "vda": rx.DiskRewrite("/new/web1-copy-vda.raw", "raw"),
            "vdb": rx.DiskRewrite("/new/web1-copy-vdb.qcow2", "qcow2"),
        },
        "chardev_paths": {"/old/serial.log": "/new/web1-copy-console0.log"},
        "uuid": "",
    }
    args.update(kw)
    res = rx.rewrite(XML, rx.Rewrite(**args), random.Random(1))  # type: ignore[arg-type]
    return res, ET.fromstring(res.xml)


def test_restore_points_disks_and_logs_at_new_files_and_keeps_identity() -> None:
    res, root = rewrite()
    assert root.findtext("name") == "web1-copy"
    assert root.findtext("uuid") == "7f0443c0-333d-466c-8bfa-3a29ebaf6413"
    disks = {d.find("target").get("dev"): d for d in root.iterfind("devices/disk")}  # type: ignore[union-attr]
    vda, vdb, cd = disks["vda"], disks["vdb"], disks["hdc"]
    assert vda.find("source").attrib == {"file": "/new/web1-copy-vda.raw"}  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert vdb.get("type") == "file" and vdb.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert cd.find("source").get("file") == "/iso/install.iso"  # type: ignore[union-attr]
    paths = {e.get("path") for e in root.iterfind("devices/*/source") if e.get("path")}
    assert "/old/serial.log" not in paths and "/new/web1-copy-console0.log" in paths
    # The auto-generated agent socket names the old domain: libvirt makes a new one.
    chan = root.find("devices/channel/source")
    assert chan is not None and "path" not in chan.attrib
    # A restore is the same machine: MAC, link, VNC port stay.
    assert res.macs == ["52:54:00:11:22:33"] and res.links_down == 0
    assert root.find("devices/interface/link") is None
    assert root.find("devices/graphics").get("port") == "5901"  # type: ignore[union-attr]


def test_clone_gets_new_identity_and_no_shared_host_resources() -> None:
    res, root = rewrite(uuid="11111111-2222-4333-8444-555555555555", clone=True)
    assert root.findtext("uuid") == "11111111-2222-4333-8444-555555555555"
    (mac,) = res.macs
    assert mac != "52:54:00:11:22:33" and mac.startswith("52:54:00:")
    iface = root.find("devices/interface")
    assert iface is not None
    assert iface.find("mac").get("address") == mac  # type: ignore[union-attr]
    assert iface.find("link").get("state") == "down"  # type: ignore[union-attr]
    assert iface.find("target") is None  # the original's tap name
    g = root.find("devices/graphics")
    assert g is not None and g.get("autoport") == "yes"
    assert "port" not in g.attrib and "websocket" not in g.attrib
    kept, _ = rewrite(uuid=None, clone=True, keep_network=True)
    assert kept.links_down == 0 and "<uuid>" not in kept.xml


def test_replays_with_one_seed_are_identical() -> None:
    a, _ = rewrite(clone=True)
    b, _ = rewrite(clone=True)
    assert a.xml == b.xml


@pytest.mark.parametrize(
    "target", ["../../etc/x", "/abs", "vda/../../x", "", "VDA", "a" * 40, "vda\0"]
)
def test_forged_targets_refused(target: str) -> None:
    with pytest.raises(FormatError):
        rx.check_target_name(target)


@pytest.mark.parametrize("target", ["vda", "sdb", "hdc", "xvda", "nvme0n1"])
def test_plain_targets_accepted(target: str) -> None:
    assert rx.check_target_name(target) == target


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 101, "a..b"])
def test_bad_domain_names_refused(name: str) -> None:
    with pytest.raises(UsageError):
        rx.check_domain_name(name)


def test_missing_disk_and_bad_xml_refused() -> None:
    with pytest.raises(FormatError, match="no disk"):
        rewrite(disks={"vdz": rx.DiskRewrite("/x", "raw")})
    with pytest.raises(FormatError):
        rx.rewrite("<domain", rx.Rewrite(name="x", disks={}))


def test_helpers() -> None:
    root = rx.parse(XML)
    assert rx.chardev_files(root) == ["/old/serial.log"]
    assert rx.has_agent_channel(root)
    cpu, mode = rx.cpu_definition(XML)
    assert mode == "custom" and cpu is not None and "qemu64" in cpu
    assert rx.cpu_definition("<domain/>") == (None, None)


def test_no_hugepages_gives_ordinary_ram_and_keeps_the_rest_of_the_backing() -> None:
    def with_backing(inner: str) -> str:
        return XML.replace(
            "<memory unit='KiB'>163840</memory>",
            f"<memory unit='KiB'>163840</memory><memoryBacking>{inner}</memoryBacking>",
        )

    args = {"name": "web1", "disks": {}, "uuid": ""}
    said = "guest RAM on ordinary pages (it was on huge pages)"
    huge = with_backing("<hugepages/>")
    assert rx.has_hugepages(rx.parse(huge)) and not rx.has_hugepages(rx.parse(XML))
    # kept as it was unless asked
    res = rx.rewrite(huge, rx.Rewrite(**args))  # type: ignore[arg-type]
    assert rx.has_hugepages(rx.parse(res.xml)) and said not in res.notes
    res = rx.rewrite(huge, rx.Rewrite(**args, no_hugepages=True))  # type: ignore[arg-type]
    root = ET.fromstring(res.xml)
    assert root.find("memoryBacking") is None  # nothing else was in it
    assert said in res.notes
    shared = with_backing(
        "<hugepages><page size='2048' unit='KiB'/></hugepages><access mode='shared'/>"
    )
    res = rx.rewrite(shared, rx.Rewrite(**args, no_hugepages=True))  # type: ignore[arg-type]
    backing = ET.fromstring(res.xml).find("memoryBacking")
    assert backing is not None and [c.tag for c in backing] == ["access"]
    # a guest without huge pages: nothing to say
    res = rx.rewrite(XML, rx.Rewrite(**args, no_hugepages=True))  # type: ignore[arg-type]
    assert said not in res.notes and ET.fromstring(res.xml).find("memoryBacking") is None


DISKS = {
    "vda": rx.DiskRewrite("/new/web2-vda.raw", "raw"),
    "vdb": rx.DiskRewrite("/new/web2-vdb.raw", "raw"),
}
UEFI_OS = (
    "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>"
    "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
    "{nvram}</os>"
)


@pytest.mark.parametrize(
    "nvram",
    [
        "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/nv/web1_VARS.fd</nvram>",
        # the form libvirt >= 8.5 may write
        "<nvram type='file'><source file='/var/lib/nv/web1_VARS.fd'/></nvram>",
    ],
)
def test_uefi_variable_store_is_pointed_at_the_new_file(nvram: str) -> None:
    xml = XML.replace(
        "<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>",
        UEFI_OS.format(nvram=nvram),
    )
    assert rx.nvram_path(rx.parse(xml)) == "/var/lib/nv/web1_VARS.fd"
    out = rx.rewrite(xml, rx.Rewrite("web2", DISKS, nvram="/new/web2-nvram.fd"))
    root = ET.fromstring(out.xml)
    assert rx.nvram_path(root) == "/new/web2-nvram.fd"
    nv = root.find("./os/nvram")
    assert nv is not None and nv.get("template", "") in ("", "/usr/share/OVMF/OVMF_VARS_4M.fd")
    assert root.findtext("./os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    # no new store asked for: the XML keeps its own
    kept = rx.rewrite(xml, rx.Rewrite("web2", DISKS))
    assert rx.nvram_path(ET.fromstring(kept.xml)) == "/var/lib/nv/web1_VARS.fd"


def test_no_variable_store_is_added_to_a_bios_guest() -> None:
    assert rx.nvram_path(rx.parse(XML)) is None
    out = rx.rewrite(XML, rx.Rewrite("web2", DISKS, nvram="/new/web2-nvram.fd"))
    assert ET.fromstring(out.xml).find("./os/nvram") is None
