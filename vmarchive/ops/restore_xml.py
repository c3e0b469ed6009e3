"""Rewriting an archived domain XML for a restore or a clone (ops layer, pure).

The archive keeps the *migratable* domain XML (what libvirt itself puts into a save
image).  A restore points its disks at the rebuilt images and its file-backed character
devices (serial/console logs) at new files, and may rename it; a clone also gets a new
UUID and new MAC addresses, its NICs' links go down (unless asked otherwise), and every
other host resource that two running copies would share (VNC/SPICE ports, auto-generated
channel sockets) is left for libvirt to allocate.  Nothing here touches the host.
"""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from vmarchive.errors import FormatError, UsageError

#: Disk target names QEMU/libvirt use (vda, sdb, hdc, xvda, nvme0n1, ...): nothing that can
#: name a directory.
_TARGET_RE = re.compile(r"^[a-z][a-z0-9]{0,31}$")
#: A domain name we are willing to put into file names.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
AGENT_CHANNEL = "org.qemu.guest_agent.0"
#: The ``meta`` stream in which a disk-only capture keeps a shut-off UEFI domain's variable
#: store file (formats/FORMAT.md; a live capture has the store as flash RAM instead).
NVRAM_META_STREAM = "nvram.fd"
#: libvirt generates these socket paths itself; they contain the old domain's name.
_AUTO_CHANNEL_DIR = "/var/lib/libvirt/qemu/channel/"


def check_target_name(target: str) -> str:
    """``target`` if it is a plain disk target name; raises FormatError (a forged archive)."""
    if not _TARGET_RE.match(target):
        raise FormatError(f"archive names a disk target {target!r}: refused (not a plain name)")
    return target


def check_domain_name(name: str) -> str:
    """Raises UsageError for a name that cannot safely be part of a file name."""
    if not _NAME_RE.match(name) or ".." in name:
        raise UsageError(f"domain name {name!r} is not allowed (letters, digits, . _ + -)")
    return name


class DiskRewrite(msgspec.Struct, frozen=True):
    path: str  # the new image (a file path on the target host)
    fmt: str  # raw | qcow2


@dataclass
class Rewrite:
    """What to change in the domain XML."""

    name: str
    disks: dict[str, DiskRewrite]
    #: new path for each file-backed character device, keyed by its old path (see
    #: :func:`chardev_files`).
    chardev_paths: dict[str, str] = field(default_factory=dict)
    uuid: str | None = None  # None: drop it (libvirt makes one); "" keep
    clone: bool = False
    keep_network: bool = False
    #: give the guest ordinary RAM where it had huge pages (a target without them)
    no_hugepages: bool = False
    #: the new UEFI variable store (``<os><nvram>``) of a guest that has one; None: as is
    nvram: str | None = None


@dataclass
class RewriteResult:
    xml: str
    macs: list[str] = field(default_factory=list)
    links_down: int = 0
    notes: list[str] = field(default_factory=list)


def parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as e:
        raise FormatError(f"archived domain XML does not parse: {e}") from e


def chardev_files(root: ET.Element) -> list[str]:
    """Distinct file paths written by character devices (serial, console, ...) and logs."""
    out: list[str] = []
    for dev in root.iterfind("./devices/*"):
        if dev.tag not in ("serial", "console", "parallel", "channel"):
            continue
        paths = []
        if dev.get("type") == "file":
            src = dev.find("source")
            if src is not None and src.get("path"):
                paths.append(str(src.get("path")))
        lg = dev.find("log")
        if lg is not None and lg.get("file"):
            paths.append(str(lg.get("file")))
        for p in paths:
            if p not in out:
                out.append(p)
    return out


def nvram_path(root: ET.Element) -> str | None:
    """The UEFI variable store file of the domain (``<os><nvram>``), if it has one."""
    nv = root.find("./os/nvram")
    if nv is None:
        return None
    src = nv.find("source")  # libvirt >= 8.5 may write <nvram type='file'><source file=.../>
    path = src.get("file") if src is not None else (nv.text or "").strip()
    return path or None


def has_hugepages(root: ET.Element) -> bool:
    """The domain's RAM is on huge pages (``<memoryBacking><hugepages/>``)."""
    return root.find("./memoryBacking/hugepages") is not None


def has_agent_channel(root: ET.Element) -> bool:
    return any(t.get("name") == AGENT_CHANNEL for t in root.iterfind("./devices/channel/target"))


def cpu_definition(xml: str) -> tuple[str | None, str | None]:
    """(``<cpu>`` element as text, its mode) of a domain XML, (None, None) if absent."""
    cpu = parse(xml).find("cpu")
    if cpu is None:
        return None, None
    return ET.tostring(cpu, encoding="unicode"), cpu.get("mode", "custom")


def random_mac(rng: Callable[[int], int]) -> str:
    """A locally administered MAC in QEMU's 52:54:00 range."""
    tail = rng(1 << 24)
    return "52:54:00:" + ":".join(f"{(tail >> s) & 0xFF:02x}" for s in (16, 8, 0))


def rewrite(xml: str, rw: Rewrite, rng: random.Random | None = None) -> RewriteResult:
    """The domain XML with ``rw`` applied. Raises FormatError for XML we cannot handle."""
    rng = rng or random.Random()
    root = parse(xml)
    if root.tag != "domain":
        raise FormatError("archived domain XML has no <domain> root")
    res = RewriteResult(xml="")
    name = root.find("name")
    if name is None:
        name = ET.SubElement(root, "name")
    name.text = rw.name
    uuid = root.find("uuid")
    if rw.uuid is None and uuid is not None:
        root.remove(uuid)
    elif rw.uuid:
        if uuid is None:
            uuid = ET.SubElement(root, "uuid")
        uuid.text = rw.uuid
    devices = root.find("devices")
    if devices is None:
        raise FormatError("archived domain XML has no <devices>")
    seen: set[str] = set()
    for disk in devices.iterfind("disk"):
        t = disk.find("target")
        dev = t.get("dev") if t is not None else None
        if dev is None or dev not in rw.disks:
            continue
        seen.add(dev)
        new = rw.disks[dev]
        disk.set("type", "file")
        for child in list(disk):
            if child.tag in ("source", "backingStore"):
                disk.remove(child)
        drv = disk.find("driver")
        if drv is None:
            drv = ET.Element("driver", {"name": "qemu"})
            disk.insert(0, drv)
        drv.set("type", new.fmt)
        src = ET.Element("source", {"file": new.path})
        disk.insert(list(disk).index(drv) + 1, src)
    missing = set(rw.disks) - seen
    if missing:
        raise FormatError(f"archived domain XML has no disk {sorted(missing)}")

    for chardev in devices:
        if chardev.tag not in ("serial", "console", "parallel", "channel"):
            continue
        if chardev.get("type") == "file":
            csrc = chardev.find("source")
            if csrc is not None and csrc.get("path") in rw.chardev_paths:
                csrc.set("path", rw.chardev_paths[str(csrc.get("path"))])
        lg = chardev.find("log")
        if lg is not None and lg.get("file") in rw.chardev_paths:
            lg.set("file", rw.chardev_paths[str(lg.get("file"))])
        if chardev.get("type") == "unix":
            csrc = chardev.find("source")
            path = csrc.get("path", "") if csrc is not None else ""
            if csrc is not None and path and (path.startswith(_AUTO_CHANNEL_DIR) or rw.clone):
                # libvirt generates a fresh socket path for the new domain.
                del csrc.attrib["path"]
                res.notes.append(f"channel socket {path} left for libvirt to allocate")

    nv = root.find("./os/nvram")
    if rw.nvram is not None and nv is not None:
        # Two domains must never share a variable store: QEMU writes the guest's UEFI
        # variables into it (and, after an incoming migration, all of it).
        nv_src = nv.find("source")
        if nv_src is not None:
            nv_src.set("file", rw.nvram)
        else:
            nv.text = rw.nvram

    backing = root.find("memoryBacking")
    if rw.no_hugepages and backing is not None:
        huge = backing.find("hugepages")
        if huge is not None:
            # Migration does not care how RAM is backed: the same RAM blocks, in 4 KiB
            # pages, load into ordinary memory.
            backing.remove(huge)
            if not len(backing):
                root.remove(backing)
            res.notes.append("guest RAM on ordinary pages (it was on huge pages)")

    if rw.clone:
        for iface in devices.iterfind("interface"):
            mac = iface.find("mac")
            if mac is None:
                mac = ET.Element("mac")
                iface.insert(0, mac)
            new_mac = random_mac(rng.randrange)
            mac.set("address", new_mac)
            res.macs.append(new_mac)
            if not rw.keep_network:
                link = iface.find("link")
                if link is None:
                    link = ET.SubElement(iface, "link")
                link.set("state", "down")
                res.links_down += 1
            tgt = iface.find("target")
            if tgt is not None:  # tap device name of the original
                iface.remove(tgt)
        for g in devices.iterfind("graphics"):
            if g.get("port") or g.get("autoport") == "no":
                g.set("autoport", "yes")
                for attr in ("port", "tlsPort", "websocket"):
                    g.attrib.pop(attr, None)
            for lst in g.iterfind("listen"):
                if lst.get("type") == "socket":
                    lst.attrib.pop("socket", None)
    else:
        res.macs = [
            str(m.get("address")) for m in devices.iterfind("interface/mac") if m.get("address")
        ]
    res.xml = ET.tostring(root, encoding="unicode")
    return res
