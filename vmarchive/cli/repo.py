"""Repository commands: init, list, info, stats, verify, forget, prune, gc (placeholder)."""
