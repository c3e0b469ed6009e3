"""Pure parts of the hypervisor layer (no libvirt needed): QMP reply translation, the
XML/QEMU join behind disk targets, STOP/RESUME pause arithmetic."""

from __future__ import annotations

import types
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qemu.qmp import ExecuteError

from vmarchive.errors import HypervisorError, QMPCommandError
from vmarchive.hypervisor.blockinfo import file_children, join_disks, list_disks, parse_disks
from vmarchive.hypervisor.qmp import QMP, QMPEvent, pause_us


def _qmp() -> QMP:
    return QMP(types.SimpleNamespace(name="g1"))  # type: ignore[arg-type]


def test_reply_translation() -> None:
    q, sent = _qmp(), dict[str, object](execute="query-x")
    assert q._parse_reply("query-x", sent, '{"return": {"a": 1}, "id": "libvirt-1"}') == {"a": 1}
    with pytest.raises(QMPCommandError) as ei:
        q._parse_reply(
            "query-x", sent, '{"id": "l", "error": {"class": "DeviceNotFound", "desc": "no node"}}'
        )
    assert ei.value.fields == {
        "domain": "g1",
        "command": "query-x",
        "error_class": "DeviceNotFound",
        "desc": "no node",
    }
    assert isinstance(ei.value.__cause__, ExecuteError)
    assert ei.value.__cause__.sent["execute"] == "query-x"
    for bad in ("not json", "[1, 2]", '{"id": 1}', '{"error": {"class": 3}}'):
        with pytest.raises(HypervisorError) as e2:
            q._parse_reply("query-x", sent, bad)
        assert not isinstance(e2.value, QMPCommandError)


def _ev(name: str, us: int) -> QMPEvent:
    return QMPEvent(name, us // 1_000_000, us % 1_000_000)


def test_pause_from_events() -> None:
    assert pause_us([]) is None
    assert pause_us([_ev("STOP", 1_999_990)]) is None  # never resumed: not a pause figure
    evs = [_ev("STOP", 1_999_990), _ev("MIGRATION", 2_000_000), _ev("RESUME", 2_000_007)]
    assert pause_us(evs) == 17  # crosses a second boundary
    assert pause_us([*evs, _ev("STOP", 3_000_000), _ev("RESUME", 3_000_100)]) == 117


@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=20))
def test_pause_is_sum_of_pairs(gaps: list[int]) -> None:
    t, evs, total = 10**9, [], 0
    for i, g in enumerate(gaps):
        t += g
        evs.append(_ev("STOP" if i % 2 == 0 else "RESUME", t))
        if i % 2:
            total += g
    assert pause_us(evs) == total


XML = """<domain type='qemu'><name>g</name><devices>
  <disk type='block' device='disk'><driver name='qemu' type='raw'/>
    <source dev='/dev/loop7' index='4'/><target dev='vdc' bus='virtio'/>
    <alias name='virtio-disk2'/></disk>
  <disk type='network' device='disk'><driver name='qemu' type='raw'/>
    <source protocol='nbd' name='exp' index='5'><host name='h' port='10809'/></source>
    <target dev='vdd' bus='virtio'/><alias name='virtio-disk3'/></disk>
  <disk type='file' device='cdrom'><driver name='qemu' type='raw'/>
    <source file='/iso/x.iso' index='6'/><target dev='sda' bus='sata'/><readonly/>
    <alias name='sata0-0-0'/></disk>
  <disk type='file' device='disk'><target dev='vde' bus='virtio'/></disk>
</devices></domain>"""


def _node(name: str, drv: str, file: str, size: int, ro: bool = False) -> dict[str, Any]:
    return {"node-name": name, "drv": drv, "file": file, "ro": ro, "image": {"virtual-size": size}}


QB = [
    {"qdev": "/machine/peripheral/virtio-disk2/virtio-backend", "removable": False,
     "inserted": {"node-name": "libvirt-4-format", "ro": False}},
    {"qdev": "/machine/peripheral/virtio-disk3/virtio-backend", "removable": False,
     "inserted": {"node-name": "libvirt-5-format", "ro": False}},
    {"qdev": "sata0-0-0", "removable": True, "inserted": {"node-name": "libvirt-6-format", "ro": True}},
]  # fmt: skip
NODES = [
    _node("libvirt-4-format", "raw", "/dev/loop7", 1 << 30),
    _node("libvirt-4-storage", "host_device", "/dev/loop7", 1 << 30),
    _node("libvirt-5-format", "raw", "nbd://h:10809/exp", 1 << 20),
    _node("libvirt-5-storage", "nbd", "nbd://h:10809/exp", 1 << 20),
    _node("libvirt-6-format", "raw", "/iso/x.iso", 4096, ro=True),
    _node("libvirt-6-storage", "file", "/iso/x.iso", 4096, ro=True),
]


def test_join_block_network_cdrom_and_unknown() -> None:
    disks = {d.target: d for d in join_disks(parse_disks(XML), QB, NODES, {})}
    assert list(disks) == ["vdc", "vdd", "sda", "vde"]
    vdc, vdd, sda, vde = disks["vdc"], disks["vdd"], disks["sda"], disks["vde"]
    assert vdc.is_block_device and not vdc.is_network and vdc.file_node == "libvirt-4-storage"
    assert vdc.virtual_size == 1 << 30 and vdc.source == "/dev/loop7"
    assert vdd.is_network and not vdd.is_block_device and vdd.file_driver == "nbd"
    assert vdd.source == "nbd:exp"
    assert sda.removable and sda.readonly and sda.has_medium and not sda.is_block_device
    assert vde.node_name is None and not vde.has_medium  # no alias: not in QEMU (inactive XML)


def test_list_disks_asks_only_for_what_it_was_not_given() -> None:
    """The capture hands over the leftover sweep's block answers: list_disks then asks
    QEMU only for the graph, and joins the same disks as when it asks for everything."""
    asked: list[str] = []

    class Fake:
        def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
            asked.append(cmd)
            if cmd == "x-debug-query-block-graph":
                raise QMPCommandError("no graph here", command=cmd)
            return {"query-block": QB, "query-named-block-nodes": NODES}[cmd]

    q: Any = Fake()
    full = list_disks(q, XML)
    assert asked == ["query-block", "query-named-block-nodes", "x-debug-query-block-graph"]
    asked.clear()
    known = {"query-block": QB, "query-named-block-nodes": NODES}
    assert list_disks(q, XML, known=known) == full
    assert asked == ["x-debug-query-block-graph"]
    asked.clear()
    list_disks(q, XML, known={"query-block": QB})  # the one missing is asked for
    assert asked == ["query-named-block-nodes", "x-debug-query-block-graph"]


def test_graph_overrides_naming_convention() -> None:
    graph = {
        "nodes": [{"id": 1, "name": "libvirt-4-format"}, {"id": 2, "name": "other-proto"}],
        "edges": [{"parent": 1, "child": 2, "name": "file"}],
    }
    kids = file_children(graph)
    assert kids == {"libvirt-4-format": "other-proto"}
    nodes = [*NODES, _node("other-proto", "host_device", "/dev/loop7", 1 << 30)]
    vdc = join_disks(parse_disks(XML), QB, nodes, kids)[0]
    assert vdc.file_node == "other-proto"


def test_bad_xml_is_hypervisor_error() -> None:
    with pytest.raises(HypervisorError, match="does not parse"):
        parse_disks("<domain")
