"""vmarchive: archive and restore the complete state of running libvirt/QEMU guests.

Layers (imports go downward only, enforced by import-linter in pyproject.toml)::

    cli  ->  ops  ->  store | hypervisor  ->  format  ->  errors | progress

``cli`` is the only layer that prints or imports typer/tqdm; ``hypervisor`` is the only
one that imports libvirt or qemu.qmp; ``store`` and ``hypervisor`` do not know each other.
"""

__version__ = "0.1.0"
