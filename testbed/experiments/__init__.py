"""Experiments: sweeps, evaluations, their statistics and reports."""
