"""Fault injection for tests and demos, kept apart from the wire types.

`--fault delay=0.5` sleeps before every expert reply, `--fault drop=3` drops every 3rd expert
request without a reply, `--fault crash=5` kills the process (exit code CRASH_EXIT_CODE, no
cleanup) on the 5th expert request. Only expert requests count, so probes still work.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

CRASH_EXIT_CODE = 17


@dataclass(frozen=True)
class FaultConfig:
    delay_s: float = 0.0
    drop_every: int = 0  # 0: never
    crash_at: int = 0  # 0: never; else the n-th expert request (1-based)

    @property
    def active(self) -> bool:
        return bool(self.delay_s or self.drop_every or self.crash_at)


def parse_faults(specs: list[str]) -> FaultConfig:
    """['delay=0.1', 'drop=3'] -> FaultConfig. Raises ValueError with a user-facing message."""
    fields: dict = {}
    for spec in specs:
        key, _, value = spec.partition("=")
        try:
            if key == "delay":
                fields["delay_s"] = float(value)
                if not 0 <= fields["delay_s"] < float("inf"):  # NaN too: sleep(nan) raises
                    raise ValueError
            elif key == "drop":
                fields["drop_every"] = int(value)
            elif key == "crash":
                fields["crash_at"] = int(value)
            else:
                raise ValueError
            if fields.get("drop_every", 0) < 0 or fields.get("crash_at", 0) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--fault {spec!r}: expected delay=SECONDS, drop=N or crash=N "
                             "(numbers >= 0)") from None
    return FaultConfig(**fields)


class FaultInjector:
    def __init__(self, config: FaultConfig):
        self.config = config
        self.expert_requests = 0

    def before_expert(self) -> bool:
        """Called before computing an expert request; False means drop it silently."""
        if not self.config.active:
            return True
        self.expert_requests += 1
        n = self.expert_requests
        if self.config.crash_at and n >= self.config.crash_at:
            print(f"edge_agent: fault injection: crashing on expert request {n}",
                  file=sys.stderr, flush=True)
            os._exit(CRASH_EXIT_CODE)
        if self.config.drop_every and n % self.config.drop_every == 0:
            return False
        if self.config.delay_s:
            time.sleep(self.config.delay_s)
        return True
