"""The Orchestrator: the public gRPC API; runs SPEED rounds between the Primary and Secondary services."""
