"""Which QEMU block nodes back a domain's disks (hypervisor layer).

libvirt 9 starts QEMU with ``-blockdev``: each disk is a *format* node (qcow2, raw...)
on top of a *protocol* node (file, host_device, nbd...), named ``libvirt-N-format`` and
``libvirt-N-storage``.  The capture code needs those node names to put overlays on them,
export them over NBD, or read them.  This module joins three views:

* the live domain XML (target ``vda``, device kind, bus, source, ``<alias>``, readonly),
* ``query-block`` (the guest device's ``qdev`` path and the node attached to it),
* ``query-named-block-nodes`` + the block graph (driver, filename, size, the format
  node's ``file`` child).

Pure parsing lives in :func:`parse_disks` / :func:`join_disks` so it can be tested without
a running QEMU.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from vmarchive.errors import HypervisorError, QMPCommandError
from vmarchive.hypervisor.qmp import QMP

log = logging.getLogger(__name__)

#: Protocol drivers that reach over the network.
NETWORK_DRIVERS = frozenset(
    {"nbd", "iscsi", "rbd", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs", "nvme-of"}
)
#: Protocol drivers that sit on a host block device.
BLOCK_DEVICE_DRIVERS = frozenset({"host_device", "host_cdrom"})


class XMLDisk(msgspec.Struct, frozen=True):
    """One ``<disk>`` of the live domain XML."""

    target: str
    device: str  # disk, cdrom, floppy, lun
    bus: str
    source_type: str  # file, block, network, volume, ...
    source: str | None  # path, device, or protocol/name for network disks
    format: str | None  # <driver type=...>
    readonly: bool
    alias: str | None


class BlockNode(msgspec.Struct, frozen=True):
    """One named QEMU block node."""

    node_name: str
    driver: str
    filename: str
    virtual_size: int
    read_only: bool


class DiskInfo(msgspec.Struct, frozen=True):
    """A domain disk and the QEMU nodes behind it.

    ``node_name`` is the top node the guest device uses (normally the format node), or
    None for an empty drive (a CD-ROM without medium).  ``file_node`` is its protocol
    child when known.
    """

    target: str
    device: str
    bus: str
    source_type: str
    source: str | None
    format: str | None
    readonly: bool
    removable: bool
    qdev: str | None
    node_name: str | None
    driver: str | None
    file_node: str | None
    file_driver: str | None
    filename: str | None
    virtual_size: int | None
    is_block_device: bool
    is_network: bool

    @property
    def has_medium(self) -> bool:
        """False for an empty removable drive."""
        return self.node_name is not None


def parse_disks(xml: str) -> list[XMLDisk]:
    """The ``<disk>`` elements of a domain XML, in document order.

    Raises:
        HypervisorError: the XML does not parse.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise HypervisorError(f"domain XML does not parse: {e}") from e
    disks: list[XMLDisk] = []
    for d in root.findall("./devices/disk"):
        target_el = d.find("target")
        if target_el is None or not target_el.get("dev"):
            continue
        src_el = d.find("source")
        source: str | None = None
        stype = d.get("type", "file")
        if src_el is not None:
            if stype == "network":
                proto = src_el.get("protocol", "")
                name = src_el.get("name", "")
                source = f"{proto}:{name}" if proto else name or None
            else:
                source = src_el.get("file") or src_el.get("dev") or src_el.get("volume")
        drv = d.find("driver")
        alias_el = d.find("alias")
        disks.append(
            XMLDisk(
                target=str(target_el.get("dev")),
                device=d.get("device", "disk"),
                bus=target_el.get("bus", ""),
                source_type=stype,
                source=source,
                format=drv.get("type") if drv is not None else None,
                readonly=d.find("readonly") is not None,
                alias=alias_el.get("name") if alias_el is not None else None,
            )
        )
    return disks


def _qdev_matches(qdev: str, alias: str) -> bool:
    return qdev == alias or qdev.startswith(f"/machine/peripheral/{alias}/")


def file_children(graph: Mapping[str, Any] | None) -> dict[str, str]:
    """From ``x-debug-query-block-graph``: node name -> name of its ``file`` child."""
    if not graph:
        return {}
    names = {n["id"]: n["name"] for n in graph.get("nodes", [])}
    out: dict[str, str] = {}
    for e in graph.get("edges", []):
        if e.get("name") == "file" and e.get("parent") in names and e.get("child") in names:
            out[names[e["parent"]]] = names[e["child"]]
    return out


def join_disks(
    xml_disks: Sequence[XMLDisk],
    query_block: Sequence[Mapping[str, Any]],
    named_nodes: Sequence[Mapping[str, Any]],
    file_child: Mapping[str, str],
) -> list[DiskInfo]:
    """Combine the XML view with QEMU's replies (see the module docstring)."""
    nodes = {
        str(n["node-name"]): BlockNode(
            node_name=str(n["node-name"]),
            driver=str(n.get("drv", "")),
            filename=str(n.get("file", "")),
            virtual_size=int(n.get("image", {}).get("virtual-size", 0)),
            read_only=bool(n.get("ro", False)),
        )
        for n in named_nodes
        if n.get("node-name")
    }
    out: list[DiskInfo] = []
    for xd in xml_disks:
        dev: Mapping[str, Any] | None = None
        if xd.alias:
            dev = next(
                (b for b in query_block if _qdev_matches(str(b.get("qdev", "")), xd.alias)), None
            )
        inserted: Mapping[str, Any] = (dev or {}).get("inserted") or {}
        node_name = inserted.get("node-name")
        top = nodes.get(node_name) if node_name else None
        file_name = file_child.get(node_name) if node_name else None
        if node_name and file_name is None and node_name.endswith("-format"):
            guess = node_name[: -len("-format")] + "-storage"
            file_name = guess if guess in nodes else None
        fnode = nodes.get(file_name) if file_name else None
        proto_driver = fnode.driver if fnode else (top.driver if top else None)
        removable = bool((dev or {}).get("removable", False)) or xd.device in ("cdrom", "floppy")
        out.append(
            DiskInfo(
                target=xd.target,
                device=xd.device,
                bus=xd.bus,
                source_type=xd.source_type,
                source=xd.source,
                format=xd.format,
                readonly=xd.readonly or bool(inserted.get("ro", False)),
                removable=removable,
                qdev=str(dev["qdev"]) if dev and dev.get("qdev") else None,
                node_name=str(node_name) if node_name else None,
                driver=top.driver if top else inserted.get("drv"),
                file_node=file_name,
                file_driver=fnode.driver if fnode else None,
                filename=(top.filename if top else inserted.get("file")) or xd.source,
                virtual_size=top.virtual_size if top else None,
                is_block_device=proto_driver in BLOCK_DEVICE_DRIVERS or xd.source_type == "block",
                is_network=proto_driver in NETWORK_DRIVERS or xd.source_type == "network",
            )
        )
    return out


def list_disks(
    qmp: QMP, xml: str | None = None, known: Mapping[str, Any] | None = None
) -> list[DiskInfo]:
    """Every disk of the running domain with its QEMU nodes, in XML order.

    ``xml`` defaults to the domain's live XML (it must be the live form: it carries the
    ``<alias>`` names that connect disks to QEMU devices).  ``known``: QEMU's answers to
    ``query-block`` and ``query-named-block-nodes`` (flat) by those names, when the
    caller has just had them (the missing ones are asked for).

    Raises:
        QMPCommandError, HypervisorError, DomainNotFoundError.
    """
    if xml is None:
        xml = qmp.domain.xml()
    known = known or {}
    qb = known.get("query-block")
    if qb is None:
        qb = qmp.execute("query-block")
    named = known.get("query-named-block-nodes")
    if named is None:
        named = qmp.execute("query-named-block-nodes", {"flat": True})
    try:
        graph = qmp.execute("x-debug-query-block-graph")
    except QMPCommandError:
        log.debug("x-debug-query-block-graph unavailable; using libvirt's node naming")
        graph = None
    return join_disks(parse_disks(xml), qb, named, file_children(graph))
