"""The wire all three programs share: protocol, client socket and its guard, keys, per-peer limits."""
