"""The one error a user can cause in the shard tool: printed as one line, exit code 2."""


class ShardError(Exception):
    pass
