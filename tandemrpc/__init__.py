"""The wire layer shared by the services: generated stubs (v1/), proto <-> library conversions, server lifecycle and
the public Python client. JAX-free."""
