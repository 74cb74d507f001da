"""The harness `testbed sweep` and `testbed eval` share: agents behind a scenario's shaped links
(re-shaped while it runs when the scenario changes with time), a base-station session on them
with the cores the agents leave, the θ = 0 reference of the divergence, and one JSON record per
θ appended to OUT/results.jsonl as it is made (Ctrl-C keeps what is done). Each command keeps
only what it measures per θ and how it prints it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from basestation.generate import generate
from basestation.session import build_roster, open_session
from testbed import scenarios
from testbed.experiments import divergence, pass_counts
from testbed.experiments.beds import Placement
from testbed.experiments.cpu_share import share_with_agents

TESTBED_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # testbed/
HELDOUT_TEXT = os.path.join(TESTBED_DIR, "data", "heldout-sample.txt")
DEFAULT_PROMPTS = (
    "The queue module implements",
    "To open a file for reading, use",
    "A dictionary maps keys to",
    "The following example shows how to",
)
RESULTS_NAME = "results.jsonl"
STATE_DIR_NAME = "testbed-state"  # OUT/testbed-state: each run has its own testbed
SESSION_WAIT_S = 60.0  # for every agent's INFO when the session opens
WARM_UP_TOKENS = 4  # decoded once before measuring, so the link estimates have samples
SCHEDULE_STOP_S = 10.0
EMULATED_LINKCHECK_BYTES = 1 << 14  # each link's check on links at an emulated wire time


def code_version() -> str:
    """shard_tool's version and, in a git checkout, `git describe` of it."""
    from shard_tool import __version__

    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


class ScheduleRunner(threading.Thread):
    """Re-applies the scenario's shapes while an experiment runs (flaky links, fading epochs)."""

    def __init__(self, testbed, scenario, num_agents: int,
                 wire_bytes_per_token: float | None = None, start_s: float | None = None):
        super().__init__(daemon=True, name="link-schedule")
        self.testbed, self.scenario, self.num_agents = testbed, scenario, num_agents
        self.wire_bytes_per_token = wire_bytes_per_token  # emulation: see scenarios.shapes_at
        self.start_s = start_s  # the clock the fading epochs count from (default: run())
        self.stop_event = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        start = time.monotonic() if self.start_s is None else self.start_s
        applied = scenarios.shapes_at(self.scenario, self.num_agents, 0.0,
                                      self.wire_bytes_per_token)
        while not self.stop_event.wait(self.scenario.step_s / 2):
            shapes = scenarios.shapes_at(self.scenario, self.num_agents,
                                         time.monotonic() - start, self.wire_bytes_per_token)
            for agent, shape in shapes.items():
                if shape != applied.get(agent):
                    try:
                        self.testbed.degrade(agent, shape)
                    except Exception as e:  # keep the experiment going; the record notes it
                        self.errors.append(f"agent {agent}: {e}")
                    applied[agent] = shape

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=SCHEDULE_STOP_S)


@dataclass
class Run:
    """What `running` brought up, for the experiment inside it."""
    manifest: object
    scenario: scenarios.Scenario
    num_agents: int
    bed: object  # testbed.links.control.Testbed
    session: object  # basestation.session.Session
    threads: int  # the base station's torch threads
    start_s: float  # time.monotonic() when the session opened: the fading epochs count from it
    results_path: str
    wire_bytes_per_token: int | None = None  # emulating a model's wire time (eval), else None
    links: list[dict] = field(default_factory=list)  # link_record.link_records, at the start
    endpoints: list[str] = field(default_factory=list)  # each agent's own, in link order
    real_boxes: bool = False  # the user's agents (--roster), not ours
    shape_dev: str | None = None
    schedule: ScheduleRunner | None = field(default=None, repr=False)

    def tokenize(self, prompts) -> list:
        tokenizer = self.session.base.tokenizer
        return [tokenizer(p, return_tensors="pt").input_ids for p in prompts]

    def warm_up(self, prompt_ids) -> None:
        """A few tokens through the agents before anything is measured: the link estimates
        start from samples, not from their defaults."""
        generate(self.session, prompt_ids, max_new_tokens=WARM_UP_TOKENS, ignore_eos=True)

    def record(self, kind: str) -> dict:
        """The fields every record of this run starts with."""
        return {"kind": kind, "scenario": self.scenario.name, "backend": self.bed.backend,
                "agents": self.num_agents, "agent_endpoints": list(self.endpoints),
                "real_boxes": self.real_boxes, "shape_dev": self.shape_dev,
                "links": self.links, "fingerprint": self.manifest.fingerprint,
                "base_station_threads": self.threads, "code_version": code_version()}

    @contextmanager
    def results(self) -> Iterator[Callable[[dict], None]]:
        """Yields append(record): stamps the schedule's errors so far and the time, and writes
        the record to results.jsonl at once."""
        with open(self.results_path, "a") as f:
            def append(record: dict) -> None:
                record["schedule_errors"] = list(self.schedule.errors) if self.schedule else []
                record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                f.write(json.dumps(record) + "\n")
                f.flush()

            yield append


@contextmanager
def running(shards: str, out: str, scenario: str, num_agents: int | None = None, *,
            emulate: bool = False, dtype: str = "auto", placement: Placement | None = None,
            cell: bool = False, total_bandwidth_hz: float | None = None,
            **session_options) -> Iterator[Run]:
    """Agents for SHARDS behind SCENARIO's links and a session on them (DTYPE and
    SESSION_OPTIONS go to open_session). Without a roster (PLACEMENT), our own agents come up
    in namespaces (one per expert unless NUM_AGENTS), state in OUT/testbed-state; with one,
    the user's agents are used, their links shaped from placement.shape_dev (or left as they
    are without it). Every link is measured before the session opens (`Run.links`).
    EMULATE: a `[paper]` scenario's emulated model sets the wire time and, on our own agents,
    paces their compute (scenarios.bring_up); real boxes compute at their own speed.
    CELL: our agents on loopback, or the roster's, behind one shared cell on this machine
    (cell_bed; `Run.bed.set_policy`), its bandwidth TOTAL_BANDWIDTH_HZ (default: the
    scenario's).
    Everything is taken down when the block ends, raised or not. Raises TestbedError,
    RosterError."""
    from shard_tool.manifest import load_manifest
    from testbed.experiments import beds, link_record
    from testbed.links import control as links

    placement = placement or Placement()
    manifest = load_manifest(shards)
    loaded = scenarios.load(scenario)
    if total_bandwidth_hz is not None:
        loaded = scenarios.with_total_bandwidth(loaded, total_bandwidth_hz)
    if placement.roster:
        endpoints = beds.check_roster_scenario(placement, loaded, num_agents, emulate, cell)
        num_agents = len(endpoints)
    else:
        num_agents = num_agents or manifest.num_experts
    if emulate:
        shapes, agent_args, wire_bytes = scenarios.bring_up(loaded, shards, num_agents, dtype)
    else:
        shapes, agent_args, wire_bytes = scenarios.shapes_at(loaded, num_agents, 0.0), None, None
    os.makedirs(out, exist_ok=True)
    if cell:
        from testbed.experiments.cell_bed import open_cell_bed

        bed = open_cell_bed(shards, num_agents, loaded, agent_args or {}, wire_bytes,
                            os.path.join(out, STATE_DIR_NAME), roster=placement.roster)
        if placement.roster:  # the user's agents, named as the roster names them
            on_host = beds.agents_on_host(placement, endpoints)
        else:
            endpoints, on_host = list(bed.endpoints), num_agents
        shapes = None
    elif placement.roster:
        bed = beds.open_roster_bed(placement, shapes, endpoints)
        on_host = beds.agents_on_host(placement, endpoints)
    else:
        bed = links.up(shards, num_agents, shapes, state_dir=os.path.join(out, STATE_DIR_NAME),
                       agent_args=agent_args)
        endpoints = beds.roster_endpoints(bed.roster_path)
        on_host = num_agents
    run = session = None
    try:
        # an emulated model's wire time slows every link (to a few Mbit/s): a small transfer
        transfer = EMULATED_LINKCHECK_BYTES if cell or wire_bytes else None
        measured = link_record.measure(
            bed.roster_path, None if cell or bed.backend == beds.AS_IS else shapes, endpoints,
            transfer_bytes=transfer)
        link_record.check_answered(measured)
        threads = share_with_agents(on_host)
        session = open_session(shards, build_roster([], bed.roster_path, None), dtype=dtype,
                               wait_s=SESSION_WAIT_S, progress=False, **session_options)
        run = Run(manifest, loaded, num_agents, bed, session, threads, time.monotonic(),
                  os.path.join(out, RESULTS_NAME), wire_bytes, links=measured,
                  endpoints=endpoints, real_boxes=bool(placement.roster),
                  shape_dev=placement.shape_dev)
        if cell:
            bed.start_schedule(run.start_s)
        elif loaded.changes_over_time and bed.backend != beds.AS_IS:
            run.schedule = ScheduleRunner(bed, loaded, num_agents,
                                          wire_bytes_per_token=wire_bytes, start_s=run.start_s)
            run.schedule.start()
        yield run
    finally:
        if run is not None and run.schedule is not None:
            run.schedule.stop()
        if session is not None:
            session.close()
        bed.down()


def reference_pass(session, text_path: str, max_tokens: int):
    """The θ = 0 next-token distributions over held-out blocks of TEXT_PATH (at most
    MAX_TOKENS tokens), and what the pass cost in experts. Raises OSError."""
    with open(text_path) as f:
        blocks = divergence.heldout_blocks(session.base.tokenizer, f.read(),
                                           max_tokens=max_tokens)
    with pass_counts.quality_pass(session, 0.0) as counts:
        reference = divergence.Divergence.measure_reference(session.base.model, blocks)
    return reference, counts


def divergence_against(session, reference, reference_counts: dict) -> dict:
    """The record's "divergence": KL and top-1 agreement of the session's model (at the θ of
    the quality pass this runs in) against the θ = 0 REFERENCE, and what that reference cost."""
    return dict(reference.against(session.base.model), reference_pass=reference_counts)
