"""The base station: non-expert model, WLR selection, dispatch to agents, front ends."""
