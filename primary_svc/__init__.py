"""The Primary gRPC service serves the primary (the large model) in block mode: prefill, verify, release.

May import `tandemrpc` and `tandem`; not the other services, not `apps`.
"""
