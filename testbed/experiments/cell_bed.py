"""Our agents on loopback, or the user's agents a roster names, behind ONE shared cell
(testbed/links/cell.py) on this machine: the bed `testbed eval --bandwidth` runs on (issue 23).

Every agent's link crosses the cell process, which serialises its bytes at the Shannon rate of
the link's share of the cell's bandwidth B under the policy in force (static, shared, joint).
The settings come from the scenario's `[paper]` channel at the current fading epoch (re-written
every epoch by a thread, as the harness's ScheduleRunner re-shapes links): per link and
direction snr = P g^2 / N0 from the epoch's seeded Rayleigh draw (agent i is device i mod Q),
slowdown = the emulated model's bytes per token / ours, delay = access_delay_ms.
`set_policy` switches the policy and returns once the cell runs with it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from basestation.channel_model import dbm_to_w, draw_rayleigh_gain, path_loss_db, wire_slowdown
from testbed.links.cell import stats_path, write_cell_settings
from testbed.links.procs import alive, free_port, log_tail, spawn, stop_pids
from testbed.links.spec import LinkShape, TestbedError

BACKEND = "shared cell (agents on loopback)"
ROSTER_BACKEND = "shared cell (the user's agents)"
LOCALHOST = "127.0.0.1"
CELL_READY_S = 20.0  # for the cell process to listen on every link
READY_POLL_S = 0.05
SCHEDULE_STOP_S = 10.0
STATS_FRESH_S = 1.2  # > the cell's STATS_INTERVAL_S (0.5 s) plus a loaded machine's delay
# How long a joint allocation may hold the cell (seconds from its arrival). The base station
# sends one per layer, just before the layer's requests; it holds while an allocated link has
# bytes queued (the cell hands what an idle allocated link leaves to the busy ones), so it only
# needs to outlive one layer's requests and replies. Links left out wait meanwhile: their
# heartbeats and probes are late by at most this.
JOINT_ALLOCATION_TTL_S = 0.05


def paper_snr_hz(paper, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(downlink, uplink) P g^2 / N0 in Hz of every device for one epoch: the same seeded
    Rayleigh draw as scenarios.paper_rates_bits_per_s (down first, then up). Pure."""
    channel = paper.channel
    rng = np.random.default_rng([paper.seed, epoch])
    pl_db = path_loss_db(np.asarray(channel.distances_m, dtype=float), channel.carrier_ghz)
    gain_down = draw_rayleigh_gain(rng, pl_db)
    gain_up = draw_rayleigh_gain(rng, pl_db)
    noise_w_per_hz = float(dbm_to_w(channel.noise_dbm_per_hz))
    return (channel.bs_power_w * np.square(gain_down) / noise_w_per_hz,
            channel.device_power_w * np.square(gain_up) / noise_w_per_hz)


def cell_settings(paper, epoch: int, listens: list[str], targets: list[str], slowdown: float,
                  policy: str) -> dict:
    """The cell's settings file at EPOCH (pure): link i listens on listens[i] and forwards
    to targets[i] (HOST:PORT), as device i mod Q of the paper's cell."""
    down, up = paper_snr_hz(paper, epoch)
    q = len(down)
    return {"links": [{"listen": listen, "target": target,
                       "delay_ms": paper.access_delay_ms,
                       "snr_down_hz": float(down[i % q]), "snr_up_hz": float(up[i % q])}
                      for i, (listen, target) in enumerate(zip(listens, targets))],
            "total_bandwidth_hz": paper.channel.total_bandwidth_hz,
            "slowdown": max(1.0, slowdown), "policy": policy,
            "allocation_ttl_s": JOINT_ALLOCATION_TTL_S}


def _hostport(endpoint: str) -> str:
    return endpoint.split("://", 1)[-1]


@dataclass
class CellBed:
    """The loopback agents (links.control.Testbed), the cell in front of them, and the roster
    naming the cell's ports. The bed interface harness.running uses (roster_path, backend,
    endpoints, degrade, down), plus the cell's own (set_policy, start_schedule)."""
    agents: object | None  # testbed.links.control.Testbed on loopback; None: the user's
    roster_path: str
    endpoints: list[str]  # the cell's ports, in link order
    settings_path: str
    control: str  # the cell's UDP control address (HOST:PORT)
    paper: object
    slowdown: float
    listens: list[str]
    targets: list[str]
    cell_pid: int | None = None
    policy: str = "static"
    epoch: int = 0
    current: dict = field(default_factory=dict)  # the settings the cell runs with
    backend: str = BACKEND
    dev: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    errors: list[str] = field(default_factory=list)

    def _write(self, wait: bool) -> bool:
        # under self._lock: the policy and the epoch change from two threads
        self.current = cell_settings(self.paper, self.epoch, self.listens, self.targets,
                                     self.slowdown, self.policy)
        return write_cell_settings(self.settings_path, self.current, wait=wait)

    def set_policy(self, policy: str) -> None:
        """Raises TestbedError when the cell does not confirm it in time."""
        with self._lock:
            self.policy = policy
            if not self._write(wait=True):
                raise TestbedError(f"the cell did not take policy {policy!r} "
                                   f"(see {self.settings_path[:-5]}.log)")

    def start_schedule(self, start_s: float) -> None:
        """Re-write the settings at every fading epoch counted from START_S (monotonic)."""
        def run() -> None:
            while not self._stop.wait(self.paper.epoch_s / 4):
                epoch = int((time.monotonic() - start_s) // self.paper.epoch_s)
                if epoch == self.epoch:
                    continue
                with self._lock:
                    self.epoch = epoch
                    try:
                        self._write(wait=True)
                    except (OSError, ValueError) as e:  # the record notes it; keep going
                        self.errors.append(f"epoch {epoch}: {e}")

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def degrade(self, index: int, shape: LinkShape) -> None:
        raise TestbedError("the cell's links follow the scenario's channel; they are not "
                           "shaped one by one")

    def down(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SCHEDULE_STOP_S)
        if self.cell_pid is not None:
            stop_pids([self.cell_pid])
        return self.agents.down() if self.agents is not None else []  # the user's run on


def open_cell_bed(shards: str, num_agents: int, scenario, agent_args: dict,
                  wire_bytes_per_token: int | None, state_dir: str,
                  roster: str | None = None) -> CellBed:
    """The cell in front of the agents at epoch 0 (policy static), and the roster naming the
    cell's ports: our own agents on loopback, or the user's agents ROSTER names (their keys
    kept: CurveZMQ runs end to end through the cell, which only times bytes). Everything
    started is stopped on any error. Raises TestbedError."""
    from testbed.links import control as links

    paper = scenario.paper
    if paper is None or paper.emulate is None:
        raise TestbedError(f"scenario {scenario.name!r}: --bandwidth needs a [paper] channel "
                           "that emulates a model")
    os.makedirs(state_dir, exist_ok=True)
    if roster is not None:
        agents, source = None, f"{roster} through the shared cell"
        links_of, keys = _roster_links(roster)
    else:
        agents = links.up(shards, num_agents, None, state_dir=state_dir,
                          agent_args=agent_args, mode=links.LOOPBACK)
        by_agent: dict[int, list[int]] = {}
        for expert, index in agents.agent_of.items():
            by_agent.setdefault(index, []).append(expert)
        links_of = [(tuple(sorted(by_agent[i])), agents.endpoints[by_agent[i][0]], None)
                    for i in sorted(by_agent)]
        keys, source = None, None
    bed = None
    try:
        listens = [f"{LOCALHOST}:{free_port()}" for _ in links_of]
        bed = CellBed(agents, os.path.join(state_dir, "cell-roster.toml"),
                      [f"tcp://{listen}" for listen in listens],
                      os.path.join(state_dir, "cell.json"), f"{LOCALHOST}:{free_port()}",
                      paper, wire_slowdown(paper.emulate, wire_bytes_per_token)
                      if wire_bytes_per_token else 1.0, listens,  # not emulating: our bytes
                      [_hostport(endpoint) for _, endpoint, _ in links_of],
                      backend=BACKEND if roster is None else ROSTER_BACKEND)
        with bed._lock:
            bed._write(wait=False)
        log = os.path.join(state_dir, "cell.log")
        bed.cell_pid = spawn([sys.executable, "-m", "testbed.links.cell", "--settings",
                              bed.settings_path, "--control", bed.control], log)
        _wait_ready(bed.cell_pid, log)
        from basestation.roster import RosterAgent, format_roster

        with open(bed.roster_path, "w") as f:
            f.write(format_roster([RosterAgent(group, endpoint, public_key)
                                   for (group, _, public_key), endpoint
                                   in zip(links_of, bed.endpoints)], source, keys=keys))
    except BaseException:
        if bed is not None:
            bed.down()
        elif agents is not None:
            agents.down()
        raise
    return bed


def _roster_links(roster: str) -> tuple[list[tuple[tuple[int, ...], str, str | None]],
                                         str | None]:
    """(experts, endpoint, public key) of each agent ROSTER names, in its order (the cell's
    links), and its key folder. The cell relays TCP. Raises TestbedError."""
    from testbed.experiments.beds import read_roster

    agents, keys = read_roster(roster)
    for agent in agents:
        if not agent.endpoint.startswith("tcp://"):
            raise TestbedError(f"--bandwidth: the cell relays TCP; agent {agent.endpoint} is not "
                               "tcp://HOST:PORT")
    return [(tuple(sorted(a.experts)), a.endpoint, a.public_key) for a in agents], keys


class ShareLedger:
    """Each policy's mean share per link and direction, from the cell's stats file: at every
    switch the counters' change since the last is charged to the policy that ran. The cell
    writes the file every cell.STATS_INTERVAL_S when a counter changed, so a switch first
    waits (up to STATS_FRESH_S) for a write after it: the bytes of the policy that ran are
    then all in it."""

    def __init__(self, bed: CellBed):
        self.path = stats_path(bed.settings_path)
        self.last = self._read()
        self.running: str | None = None
        self.totals: dict[str, dict] = {}  # policy -> "link/way" -> [share_s, busy_s]

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def switch(self, policy: str | None) -> None:
        """POLICY starts (None: the running one's counters are brought up to date)."""
        if self.running is not None:
            asked_s, deadline_s = time.time(), time.monotonic() + STATS_FRESH_S
            while time.monotonic() < deadline_s and _mtime_s(self.path) < asked_s:
                time.sleep(READY_POLL_S)  # nothing changed since the last write: it is current
        now = self._read()
        if self.running is not None:
            totals = self.totals.setdefault(self.running, {})
            before = self.last.get("links") or []
            for i, link in enumerate(now.get("links") or []):
                for way, figures in link.items():
                    old = before[i][way] if i < len(before) else {}
                    cell = totals.setdefault(f"{i}/{way}", [0.0, 0.0])
                    cell[0] += figures["share_s"] - old.get("share_s", 0.0)
                    cell[1] += figures["busy_s"] - old.get("busy_s", 0.0)
        self.last = now
        if policy is not None:
            self.running = policy

    def mean_shares(self, policy: str) -> dict[str, float | None]:
        """"LINK/WAY" -> the mean share while it had bytes queued under POLICY."""
        return {key: round(share_s / busy_s, 4) if busy_s > 0 else None
                for key, (share_s, busy_s) in sorted(self.totals.get(policy, {}).items())}


def _mtime_s(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _wait_ready(pid: int, log: str) -> None:
    deadline_s = time.monotonic() + CELL_READY_S
    while time.monotonic() < deadline_s:
        if os.path.exists(log) and "cell ready" in open(log).read():
            return
        if not alive(pid):
            raise TestbedError(f"the cell exited: {log_tail(log)}")
        time.sleep(READY_POLL_S)
    raise TestbedError(f"the cell did not come up within {CELL_READY_S:g} s (see {log})")


class CellPolicies:
    """The shared cell's side of an experiment (eval, sweep): switches the policy (the cell's,
    the joint allocator's, the runtime's selection latencies, the model's) and keeps what each
    policy used, for its records. Under `joint` the runtime's WLR selects on the allocation's
    latencies (MoeRuntime.box_latency_override; θ = 0 never reads them) and the layer's
    allocation goes to the cell before its requests (MoeRuntime.before_dispatch)."""

    def __init__(self, run, pacing: dict, modeled):
        from testbed.experiments.joint_alloc import JointAllocator

        runtime = run.session.runtime
        # each box's link: the cell port it dials (its roster endpoint; replicas of one
        # expert set are links of their own)
        link_of_box = [run.bed.endpoints.index(agent.name)
                       if agent.name in run.bed.endpoints else None
                       for agent in runtime.table.agents]
        self.bed, self.modeled, self.runtime = run.bed, modeled, runtime
        self.allocator = JointAllocator(run.bed, link_of_box, runtime.table.request_bytes,
                                        pacing, base_latency_s=runtime.box_latency_s)
        runtime.before_dispatch = self.allocator
        self.ledger = ShareLedger(run.bed)
        self.policy: str | None = None
        self.account: str | None = None  # what the bytes and allocations now are charged to
        self.counts: dict[str, dict[str, int]] = {}  # policy -> the allocator's counters
        self._at_switch = {"sent": 0, "unchanged": 0, "layers": 0}
        self._reported: dict[str, dict[str, int]] = {}  # policy -> counts at the last fields

    def set_policy(self, policy: str, counted: bool = True) -> None:
        """POLICY runs from now. Not COUNTED (a quality pass): its bytes and allocations are
        charged apart, never to the policy's record, which is of its latency passes."""
        account = policy if counted else f"{policy} (uncounted)"
        if account != self.account:
            self._count()
            self.account = account
            self.ledger.switch(account)
        if policy == self.policy:
            return
        self.policy = policy
        self.bed.set_policy(policy)
        joint = policy == "joint"
        self.allocator.active = joint
        self.runtime.box_latency_override = self.allocator.box_latencies if joint else None
        if self.modeled is not None:
            self.modeled.bandwidth = policy

    def _count(self) -> None:
        """Charge the allocator's counters since the last switch to the policy that ran."""
        a = self.allocator
        now = {"sent": a.sent, "unchanged": a.unchanged, "layers": a.layers}
        if self.account is not None:
            mine = self.counts.setdefault(self.account, dict.fromkeys(now, 0))
            for key, value in now.items():
                mine[key] += value - self._at_switch[key]
        self._at_switch = now

    def fields(self, policy: str, since_last: bool = False) -> dict:
        """The record's cell fields for POLICY (after its runs): the allocator's counts over
        the whole run, or SINCE_LAST call for POLICY (a sweep's record per θ)."""
        self.ledger.switch(None)  # the last policy's bytes counted
        self._count()
        counts = dict(self.counts.get(policy) or {}) if policy == "joint" else None
        if counts is not None and since_last:
            before = self._reported.get(policy, {})
            self._reported[policy] = dict(counts)
            counts = {key: value - before.get(key, 0) for key, value in counts.items()}
        return {"bandwidth": policy,
                "cell_bandwidth_hz": self.bed.paper.channel.total_bandwidth_hz,
                "cell_slowdown": self.bed.slowdown,
                "shares": self.ledger.mean_shares(policy),
                "joint_allocations_sent": (counts or {}).get("sent", 0)
                if policy == "joint" else None,
                "joint_layers_allocated": (counts or {}).get("layers", 0)
                if policy == "joint" else None,
                "joint_mean_shares_sent": self.allocator.mean_shares()
                if policy == "joint" else None,
                "cell_errors": list(self.bed.errors)}

    def close(self) -> None:
        self.runtime.box_latency_override = None
        self.allocator.close()
