"""Simic: the simulator that generates behaviour data and scores policies (see env.py)."""
