"""--pin for the benches: servers on the last CPU, this process on the others."""

from __future__ import annotations

import os


def split_cpus(pin: bool) -> set[int] | None:
    """With `pin`, move this process (client, base station, local run) off the last CPU and
    return that CPU for the servers it starts (agents, echo), as if they were machines of their
    own; without it the scheduler mixes them on every core and this returns None."""
    if not pin:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench: --pin needs at least 2 CPUs")
    os.sched_setaffinity(0, set(cpus[:-1]))
    return {cpus[-1]}
