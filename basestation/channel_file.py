"""The channel file: a scenario's [paper] table, for `--latency model`."""

from __future__ import annotations

import tomllib

from basestation.channel_model import ChannelScenario
from basestation.roster import RosterError


def read_channel_file(path: str) -> ChannelScenario:
    """The [paper] table of a scenario file, for --latency model. Raises RosterError."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)["paper"]
        return ChannelScenario.from_dict(table)
    except OSError as e:
        raise RosterError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise RosterError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise RosterError(f"{path}: not valid TOML: not UTF-8 text") from None
    except (KeyError, TypeError, ValueError) as e:
        raise RosterError(f"{path}: needs a [paper] table with the channel ({e})") from None
