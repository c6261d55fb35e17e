"""Held-out evaluation of a run's checkpoints, and its results files."""
