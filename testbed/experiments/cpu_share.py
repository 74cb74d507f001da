"""How many torch threads a base station gets when its agents run on the same host.

torch's CPU kernels run on an OpenMP pool with one thread per core, whose workers spin and
whose parallel regions wait for every worker. On a host where agents and relays also run, a
worker descheduled for one of them holds up the whole region: on this 2-core VM with 8 agents,
one decode step's attention call (scaled_dot_product_attention) took 3.3 ms instead of 27 us,
and the base station's share of a token went from 3.4 to 18-37 ms, more than the whole modeled
latency that `testbed eval` compares it with. Agents already get one thread each
(testbed/links/procs.py); the base station gets the cores they leave, at least one.
"""

from __future__ import annotations

import os


def base_station_threads(agents_on_host: int, cpus: int | None = None) -> int:
    """Threads for a base station that shares `cpus` cores with `agents_on_host` agents."""
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, cpus - agents_on_host)


def share_with_agents(agents_on_host: int) -> int:
    """Set this process's torch threads for its agents on this host; returns the count."""
    import torch

    threads = base_station_threads(agents_on_host)
    torch.set_num_threads(threads)
    return threads
