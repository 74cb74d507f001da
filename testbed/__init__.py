"""Shaped links, scenarios and experiments; test models."""
