"""The wire layer shared by the services: generated stubs (v1/), proto <-> library conversions (convert.py), server
lifecycle and the error -> status map (server.py), TLS and bearer tokens (security.py), the public Python client
(client.py) and the services' side of running under a launcher (process.py).

May import `tandem` (its JAX-free modules only: config, errors, decoding.speculative; an import contract checks it)
and gRPC; not the services, not `apps`.
"""
