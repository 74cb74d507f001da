"""Agents behind real, shaped links: namespaces, shaping, relays, the plan and its state."""
