"""Test models: tiny checkpoints, family checkpoints, the trained tiny model, corpus."""
