"""Experiments on real boxes: agents users started on their own machines, named by a roster."""
