"""Generated from protos/tandemrpc/v1/tandem.proto by `make protos`; do not edit."""
