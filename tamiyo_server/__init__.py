"""Tamiyo's gRPC server: sessions, deadline-aware batching, policy inference, reloads."""
