"""The Secondary gRPC service serves the drafters (Tandem and vanilla): one bidirectional stream per request.

May import `tandemrpc` and `tandem`; not the other services, not `apps`.
"""
