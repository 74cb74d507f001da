"""Link scenarios: TOML files in this folder (or the user's), turned into per-link shapes.

A scenario gives every link a `LinkShape` (delay, jitter, loss, rate, down) that may change
with time: a `schedule` repeats over a period (`flaky`), and a `[paper]` channel redraws
Rayleigh fading every epoch and turns it into a Shannon rate (`paper`). `shapes_at` is a pure
function of (scenario, number of agents, time): the sweep calls it and applies the result.

File format:
    description = "..."
    [default]                 # every link: delay_ms, jitter_ms, loss_pct, rate_mbit, down
    [links.N]                 # agent N's link: the same keys override the default, and
    period_s = 5.0            #   optionally a schedule repeating every period_s:
    schedule = [{ at_s = 0.0, down = false }, { at_s = 3.0, down = true }]
    [paper]                   # the paper's channel (see paper.toml)
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field

import numpy as np

from basestation.channel_model import (
    EMULATED_MODELS,
    ChannelScenario,
    EmulatedModel,
    emulated_compute_s_per_token,
    scenario_rates_bits_per_s,
    wire_slowdown,
)
from testbed.links.control import LinkShape, TestbedError

SCENARIO_DIR = os.path.dirname(os.path.abspath(__file__))
SHAPE_KEYS = {f.name for f in dataclasses.fields(LinkShape)}


@dataclass(frozen=True)
class PaperChannel:
    channel: ChannelScenario
    epoch_s: float
    access_delay_ms: float
    seed: int
    # the model whose deployment is emulated (None: our messages as they are, at the rate)
    emulate: EmulatedModel | None = None
    # each device's peak FLOP/s: with many tokens a call is compute-bound (device_flops, the
    # paper's C_q, is the one-token rate, bound by reading the expert's weights)
    device_peak_flops: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    default: LinkShape = LinkShape()
    links: dict[int, LinkShape] = field(default_factory=dict)
    # agent -> (period_s, [(at_s, shape)]) with at_s ascending
    schedules: dict[int, tuple[float, list[tuple[float, LinkShape]]]] = field(
        default_factory=dict)
    paper: PaperChannel | None = None

    @property
    def changes_over_time(self) -> bool:
        return bool(self.schedules) or self.paper is not None

    @property
    def step_s(self) -> float:
        """How often the shapes may change (the sweep re-applies them this often)."""
        steps = [self.paper.epoch_s] if self.paper else []
        for period_s, points in self.schedules.values():
            steps += [b - a for a, b in zip([p[0] for p in points], [p[0] for p in points[1:]])]
            steps.append(period_s - points[-1][0] + points[0][0])
        return max(0.1, min(steps)) if steps else float("inf")


def available() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SCENARIO_DIR) if f.endswith(".toml"))


def _shape(values: dict, base: LinkShape, where: str) -> LinkShape:
    unknown = set(values) - SHAPE_KEYS
    if unknown:
        raise TestbedError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(SHAPE_KEYS)})")
    try:
        shape = dataclasses.replace(base, **values)
    except TypeError as e:
        raise TestbedError(f"{where}: {e}") from None
    if shape.delay_ms < 0 or shape.jitter_ms < 0 or not 0 <= shape.loss_pct <= 100 or (
            shape.rate_mbit is not None and shape.rate_mbit <= 0):
        raise TestbedError(f"{where}: out of range: {shape}")
    return shape


def load(name_or_path: str) -> Scenario:
    """A packaged scenario by name, or a TOML file. Raises TestbedError."""
    path = name_or_path
    if not os.path.exists(path):
        path = os.path.join(SCENARIO_DIR, f"{name_or_path}.toml")
        if not os.path.exists(path):
            raise TestbedError(f"no scenario {name_or_path!r} (packaged: {', '.join(available())}; "
                               "or give a TOML file)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TestbedError(f"{path}: {e}") from None
    name = os.path.basename(path).removesuffix(".toml")
    default = _shape(data.get("default", {}), LinkShape(), f"{path} [default]")
    links, schedules = {}, {}
    for key, values in data.get("links", {}).items():
        try:
            agent = int(key)
        except ValueError:
            raise TestbedError(f"{path}: [links.{key}]: agent index must be an integer") from None
        values = dict(values)
        period_s, schedule = values.pop("period_s", None), values.pop("schedule", None)
        links[agent] = _shape(values, default, f"{path} [links.{key}]")
        if schedule is not None:
            if not period_s or period_s <= 0 or not schedule:
                raise TestbedError(f"{path} [links.{key}]: a schedule needs period_s > 0")
            points = sorted((float(p.pop("at_s", 0.0)),
                             _shape(p, links[agent], f"{path} [links.{key}] schedule"))
                            for p in map(dict, schedule))
            schedules[agent] = (float(period_s), points)
    paper = None
    if "paper" in data:
        p = dict(data["paper"])
        try:
            paper = PaperChannel(
                channel=ChannelScenario.from_dict(p),
                epoch_s=float(p.get("epoch_s", 2.0)),
                access_delay_ms=float(p.get("access_delay_ms", 1.0)),
                seed=int(p.get("seed", 0)),
                emulate=_emulated(p.get("emulate")),
                device_peak_flops=tuple(float(f) for f in p["device_peak_flops"])
                if "device_peak_flops" in p else None)
        except (KeyError, TypeError, ValueError) as e:
            raise TestbedError(f"{path} [paper]: {e}") from None
    return Scenario(name=name, description=str(data.get("description", "")), default=default,
                    links=links, schedules=schedules, paper=paper)


def _emulated(value) -> EmulatedModel | None:
    """`emulate = "mixtral-8x7b"` (a known model) or a table {name, hidden_size, ffn_size,
    bytes_per_element}."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() not in EMULATED_MODELS:
            raise ValueError(f"emulate = {value!r}: one of {', '.join(EMULATED_MODELS)} or a "
                             "table {name, hidden_size, ffn_size, bytes_per_element}")
        return EMULATED_MODELS[value.lower()]
    model = EmulatedModel(name=str(value.get("name", "custom")),
                          hidden_size=int(value["hidden_size"]), ffn_size=int(value["ffn_size"]),
                          bytes_per_element=float(value.get("bytes_per_element", 2.0)))
    if model.hidden_size <= 0 or model.ffn_size <= 0 or model.bytes_per_element <= 0:
        raise ValueError(f"emulate: sizes must be > 0: {model}")
    return model


def paper_rates_bits_per_s(paper: PaperChannel, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(downlink, uplink) Shannon rates of every device for one epoch's fading draw; the
    draw is seeded by (seed, epoch), so a run can be replayed and checked."""
    rng = np.random.default_rng([paper.seed, epoch])
    return scenario_rates_bits_per_s(paper.channel, rng)


def shapes_at(scenario: Scenario, num_agents: int, t_s: float,
              wire_bytes_per_token: float | None = None) -> dict[int, LinkShape]:
    """Every agent's link shape at time t_s after the start (pure). With a paper channel
    that emulates a model, and our own bytes per token on the wire given, each direction of a
    link carries our messages at its Shannon rate / (the emulated model's bytes per token /
    ours), so they take as long on the wire as the emulated model's would."""
    shapes = {i: scenario.links.get(i, scenario.default) for i in range(num_agents)}
    for agent, (period_s, points) in scenario.schedules.items():
        if agent < num_agents:
            phase = t_s % period_s
            current = points[-1][1] if phase < points[0][0] else points[0][1]
            for at_s, shape in points:
                if at_s <= phase:
                    current = shape
            shapes[agent] = current
    paper = scenario.paper
    if paper is not None and paper.emulate is not None and wire_bytes_per_token:
        slowdown = wire_slowdown(paper.emulate, wire_bytes_per_token)
        downlink, uplink = paper_rates_bits_per_s(paper, int(t_s // paper.epoch_s))
        for agent in range(num_agents):
            q = agent % len(uplink)
            shapes[agent] = dataclasses.replace(
                shapes[agent], rate_mbit=None, delay_ms=paper.access_delay_ms,
                wire_down_mbit=float(downlink[q]) / slowdown / 1e6,
                wire_up_mbit=float(uplink[q]) / slowdown / 1e6)
    elif paper is not None:
        _, uplink = paper_rates_bits_per_s(scenario.paper, int(t_s // scenario.paper.epoch_s))
        for agent in range(num_agents):
            rate_bits_per_s = float(uplink[agent % len(uplink)])
            shapes[agent] = dataclasses.replace(
                shapes[agent], rate_mbit=rate_bits_per_s / 1e6,
                delay_ms=scenario.paper.access_delay_ms)
    return shapes


def with_total_bandwidth(scenario: Scenario, total_bandwidth_hz: float) -> Scenario:
    """SCENARIO with its `[paper]` cell's total bandwidth replaced (pure). Raises TestbedError
    for a scenario without a [paper] channel or a bandwidth <= 0."""
    if scenario.paper is None:
        raise TestbedError(f"scenario {scenario.name!r} has no [paper] channel: no cell "
                           "bandwidth to set")
    if not total_bandwidth_hz > 0:
        raise TestbedError(f"cell bandwidth {total_bandwidth_hz!r} Hz: must be > 0")
    channel = dataclasses.replace(scenario.paper.channel, total_bandwidth_hz=total_bandwidth_hz)
    return dataclasses.replace(scenario, paper=dataclasses.replace(scenario.paper,
                                                                   channel=channel))


def agent_pacing_us(scenario: Scenario, num_agents: int) -> dict[int, tuple[float, float]]:
    """Per agent, (µs per call, µs per token) of the emulated model's expert on its device, for
    `edge_agent --pace-compute-us-per-call/--pace-compute-us-per-token`: a roofline where one
    token costs Eq. 4 / C_q (reading the weights) and many cost FLOPs / peak FLOP/s each. Empty
    when the scenario emulates no model."""
    paper = scenario.paper
    if paper is None or paper.emulate is None:
        return {}
    flops = paper.channel.device_flops
    peak = paper.device_peak_flops or flops
    return {agent: (1e6 * emulated_compute_s_per_token(paper.emulate, flops[agent % len(flops)]),
                    1e6 * emulated_compute_s_per_token(paper.emulate, peak[agent % len(peak)]))
            for agent in range(num_agents)}


def wire_bytes_per_token(shards: str, dtype: str = "auto") -> int:
    """Our bytes per token on the wire: the model's hidden size x the activation dtype the base
    station uses by default here (`--dtype auto`: the model's on a GPU, float32 on a CPU)."""
    from common.devices import resolve_device, resolve_dtype
    from shard_tool.manifest import load_manifest

    manifest = load_manifest(shards)
    return int(manifest.model["hidden_size"]) * \
        resolve_dtype(dtype, manifest.model.get("dtype"), resolve_device("auto")).itemsize


def bring_up(scenario: Scenario, shards: str, num_agents: int, dtype: str = "auto"
             ) -> tuple[dict[int, LinkShape], dict[int, list[str]], int | None]:
    """What `testbed up` / `testbed eval` start agents with: the shapes at time 0, each agent's
    extra arguments (compute pacing when the scenario emulates a model) and our wire bytes per
    token (None when nothing is emulated)."""
    emulating = scenario.paper is not None and scenario.paper.emulate is not None
    wire = wire_bytes_per_token(shards, dtype) if emulating else None
    args = {a: ["--pace-compute-us-per-call", f"{call:.1f}",
                "--pace-compute-us-per-token", f"{token:.1f}"]
            for a, (call, token) in agent_pacing_us(scenario, num_agents).items()}
    return shapes_at(scenario, num_agents, 0.0, wire), args, wire


def load_scenario(name_or_path: str, num_agents: int) -> dict[int, LinkShape]:
    """The shapes to bring links up with (time 0). Raises TestbedError."""
    return shapes_at(load(name_or_path), num_agents, 0.0)
