"""`vmarchive doctor` (placeholder until the hypervisor layer lands)."""
