"""secondary_svc."""
