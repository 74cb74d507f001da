"""The agent's configuration, typed and frozen, grouped by concern: what it serves (the top
level), how it is reached (NetworkConfig) and what it emulates (EmulationConfig)."""

from __future__ import annotations

import socket as pysocket
from dataclasses import dataclass, field

from edge_agent.faults import FaultConfig
from wire.keys import KeyFolder
from wire.peer_limits import PeerLimits
from wire.protocol import SocketConfig


@dataclass(frozen=True)
class NetworkConfig:
    bind: str | None = None  # listening mode
    basestation: str | None = None  # dial-in mode
    advertise: str | None = None  # the address reported in info (None: from the interfaces)
    agent_id: str | None = None  # dial-in routing id; default from host name and experts
    sockets: SocketConfig = field(default_factory=SocketConfig)
    keys: KeyFolder | None = None  # --keys: CURVE on every socket, peers by public key
    basestation_key: bytes | None = None  # with keys and dial-in: the base station's public key
    limits: PeerLimits | None = None  # the bound socket's per-peer limits; None: from sockets


@dataclass(frozen=True)
class EmulationConfig:
    """Off at zero: a fast box made to behave like a slower one, and faults on command."""

    # each (token, expert) takes at least this long, as an emulated model's expert would on an
    # emulated device (the paper's Eq. 4 / C_q; testbed sets it)
    pace_s_per_token: float = 0.0
    # ... and each expert call at least this long whatever its tokens (reading the expert's
    # weights once: a roofline, max(per call, tokens x per token), per expert in a request)
    pace_s_per_call: float = 0.0
    # with a memory budget, a layer-expert loaded after the start takes at least its shard
    # bytes / this (the storage of a small box: SD card, eMMC)
    pace_load_bytes_per_s: float = 0.0
    faults: FaultConfig = field(default_factory=FaultConfig)


@dataclass(frozen=True)
class AgentConfig:
    experts: tuple[int, ...]
    shards_dir: str | None = None  # --shards: must hold the shards now
    store_dir: str | None = None  # --store: waits for pushed shards
    # --accept-fingerprint: the model --store takes pushes of (None: the one it holds, or on a
    # loopback --bind with none held the first one pushed whole; see store.py)
    accept_fingerprint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    self_benchmark: bool = True
    # --memory-budget: bytes of layer-experts kept in memory, the rest loaded on demand or on a
    # hint (residency.ExpertStore); None: every layer-expert resident, loaded at start
    memory_budget_bytes: int | None = None
    # take prefetch hints: auto (while loads wait on storage, residency.HINT_LOAD_RATIO), on, off
    prefetch_hints: str = "auto"
    network: NetworkConfig = field(default_factory=NetworkConfig)
    emulation: EmulationConfig = field(default_factory=EmulationConfig)

    @property
    def agent_id(self) -> str:
        """The routing id this agent dials in with and reports in its info."""
        return self.network.agent_id or default_agent_id(self.experts)


def default_agent_id(experts: tuple[int, ...]) -> str:
    return f"edge-{pysocket.gethostname()}-e{','.join(map(str, experts))}"
