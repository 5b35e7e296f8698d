"""Generated protobuf and gRPC code for package ``tamiyo.v1``. Do not edit: run ``make protos``."""
