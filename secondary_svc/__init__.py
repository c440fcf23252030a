"""The Secondary gRPC service: the drafters, one bidirectional stream per request."""
