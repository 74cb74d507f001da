"""Split HuggingFace MoE checkpoints into a base-station shard and one shard per expert id."""

try:
    from importlib.metadata import version as _version

    __version__ = _version("wdmoe-testbed")
except Exception:  # running from a source tree that is not installed
    __version__ = "0+unknown"
