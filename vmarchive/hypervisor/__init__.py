"""Hypervisor layer: everything vmarchive knows about libvirt and QEMU.

The only package that imports ``libvirt``, ``libvirt_qemu`` and ``qemu.qmp``; it never
imports ``vmarchive.store``.  Foreign errors are translated here into
:class:`vmarchive.errors.HypervisorError` subclasses.

* :mod:`.connection` — libvirt connections, domains, state, XML, versions, event loop.
* :mod:`.qmp` — QMP commands through libvirt (with fd passing) and timestamped events.
* :mod:`.blockinfo` — which QEMU block nodes back each disk target.
* :mod:`.nbd` — a pure-Python NBD client (reads, block status, dirty bitmaps).
* :mod:`.export` — QEMU's own NBD server exporting a running domain's nodes.
* :mod:`.probe` — host capability probes used by ``vmarchive doctor``.
"""

#: The libvirt URI every command uses unless told otherwise (here, not in :mod:`.connection`,
#: so that code naming it does not import libvirt).
DEFAULT_URI = "qemu:///system"
