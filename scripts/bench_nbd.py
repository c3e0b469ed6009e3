#!/usr/bin/env python3
"""Benchmark vmarchive's NBD client: read rate from qemu-nbd and from an export made
inside a libvirt-run QEMU, for several request sizes and depths, against the peer
qemu-img (``convert`` from the same qemu-nbd export to a null target).  Prints MB/s and ratios; asserts nothing.

Usage: scripts/bench_nbd.py [--size-mib 256] [--no-libvirt]
Needs qemu-utils; the libvirt part needs a running libvirtd (starts a transient TCG
domain named vmatest-hv-bench-*, destroyed at the end).
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable

from vmarchive.hypervisor.nbd import NBDClient

MiB = 1024 * 1024


def rate(fn: Callable[[], int], repeat: int = 3) -> float:
    best = 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t) / 1e6)
    return best


def read_all(c: NBDClient, request: int, depth: int) -> int:
    n = 0
    for _, buf in c.read_many(c.split_ranges([(0, c.size)], request), depth=depth):
        n += len(buf)
    return n


def qemu_img_rate(sock: str, export: str, size: int) -> float:
    """The peer: qemu-img copying the same export to a null target (includes its start-up)."""

    def go() -> int:
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-n",
                "-f",
                "raw",
                "--target-image-opts",
                f"nbd+unix:///{export}?socket={sock}",
                f"driver=null-co,size={size}",
            ],
            check=True,
        )
        return size

    return rate(go)


def variants(sock: str, export: str) -> dict[str, float]:
    out = {}
    with NBDClient.connect(sock, export, meta_contexts=()) as c:
        for request in (256 * 1024, 1 * MiB, 4 * MiB):
            for depth in (1, 4):
                out[f"{request // 1024}K x{depth}"] = rate(
                    functools.partial(read_all, c, request, depth)
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--no-libvirt", action="store_true")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="vmatest-hv-bench-")
    os.chmod(d, 0o755)
    img = os.path.join(d, "disk.raw")
    try:
        with open(img, "wb") as f:
            for _ in range(a.size_mib):
                f.write(secrets.token_bytes(MiB))
        sock = os.path.join(d, "qemu-nbd.sock")
        proc = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "-k", sock, "-x", "d", img])
        try:
            while not os.path.exists(sock):
                time.sleep(0.05)
            base = qemu_img_rate(sock, "d", a.size_mib * MiB)
            print(f"image: {a.size_mib} MiB random, raw; qemu-img convert via NBD: {base:.0f} MB/s")
            for k, v in variants(sock, "d").items():
                print(f"qemu-nbd      {k:>10}: {v:7.0f} MB/s  ({v / base:.2f} of qemu-img)")
        finally:
            proc.terminate()
            proc.wait()
        if not a.no_libvirt:
            bench_libvirt(d, img, base)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench_libvirt(d: str, img: str, base: float) -> None:
    from vmarchive.hypervisor.blockinfo import list_disks
    from vmarchive.hypervisor.connection import Connection
    from vmarchive.hypervisor.export import NBDServer
    from vmarchive.hypervisor.qmp import QMP

    name = f"vmatest-hv-bench-{secrets.token_hex(4)}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
      <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{img}'/><target dev='vda' bus='virtio'/><readonly/></disk>
      </devices></domain>"""
    with Connection.open() as conn:
        t = time.perf_counter()
        dom = conn.raw.createXML(xml, 0)
        print(f"libvirt domain start: {time.perf_counter() - t:.1f} s")
        try:
            qmp = QMP(conn.lookup(name))
            t = time.perf_counter()
            for _ in range(50):
                qmp.execute("query-status")
            print(f"QMP round trip through libvirt: {(time.perf_counter() - t) / 50 * 1000:.2f} ms")
            node = list_disks(qmp)[0].node_name
            assert node
            with NBDServer(qmp, os.path.join(d, "qemu.sock")) as srv, srv.export(node) as ex:
                for k, v in variants(srv.socket_path, ex).items():
                    print(f"libvirt QEMU  {k:>10}: {v:7.0f} MB/s  ({v / base:.2f} of qemu-img)")
        finally:
            dom.destroy()


if __name__ == "__main__":
    main()
