"""hypervisor layer."""
