"""Offline RL trainer and the Simic simulator."""
