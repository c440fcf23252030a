"""The Primary gRPC service: the large model in block mode (prefill, verify, release)."""
