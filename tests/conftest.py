"""Shared fixtures: real servers on port 0, real files in tmp dirs."""
