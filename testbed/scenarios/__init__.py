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

from basestation.channel_model import ChannelScenario, scenario_rates_bits_per_s
from testbed.links import LinkShape, TestbedError

SCENARIO_DIR = os.path.dirname(os.path.abspath(__file__))
SHAPE_KEYS = {f.name for f in dataclasses.fields(LinkShape)}


@dataclass(frozen=True)
class PaperChannel:
    channel: ChannelScenario
    epoch_s: float
    access_delay_ms: float
    seed: int


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
                seed=int(p.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise TestbedError(f"{path} [paper]: {e}") from None
    return Scenario(name=name, description=str(data.get("description", "")), default=default,
                    links=links, schedules=schedules, paper=paper)


def paper_rates_bits_per_s(paper: PaperChannel, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(downlink, uplink) Shannon rates of every device for one epoch's fading draw; the
    draw is seeded by (seed, epoch), so a run can be replayed and checked."""
    rng = np.random.default_rng([paper.seed, epoch])
    return scenario_rates_bits_per_s(paper.channel, rng)


def shapes_at(scenario: Scenario, num_agents: int, t_s: float) -> dict[int, LinkShape]:
    """Every agent's link shape at time t_s after the start (pure)."""
    shapes = {i: scenario.links.get(i, scenario.default) for i in range(num_agents)}
    for agent, (period_s, points) in scenario.schedules.items():
        if agent < num_agents:
            phase = t_s % period_s
            current = points[-1][1] if phase < points[0][0] else points[0][1]
            for at_s, shape in points:
                if at_s <= phase:
                    current = shape
            shapes[agent] = current
    if scenario.paper is not None:
        _, uplink = paper_rates_bits_per_s(scenario.paper, int(t_s // scenario.paper.epoch_s))
        for agent in range(num_agents):
            rate_bits_per_s = float(uplink[agent % len(uplink)])
            shapes[agent] = dataclasses.replace(
                shapes[agent], rate_mbit=rate_bits_per_s / 1e6,
                delay_ms=scenario.paper.access_delay_ms)
    return shapes


def load_scenario(name_or_path: str, num_agents: int) -> dict[int, LinkShape]:
    """The shapes to bring links up with (time 0). Raises TestbedError."""
    return shapes_at(load(name_or_path), num_agents, 0.0)
