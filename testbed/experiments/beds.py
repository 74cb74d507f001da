"""Where an experiment's agents are, and who shapes their links: the `Bed` `harness` runs on.

Three kinds, one interface (`roster_path` to dial, `backend`, `endpoints`, `degrade`, `down`):
- our own agents in network namespaces (`testbed up`, testbed/links/): the default;
- agents the user started on real boxes, named by a roster (`--roster`), their links shaped
  from this machine's interface towards them (`--shape-dev`, testbed/boxes/shaper.py);
- the same boxes with nothing shaped (`--roster` alone): the links as they are.
Links are numbered in the roster's order, as `testbed up` numbers its agents.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.links.spec import LinkShape, TestbedError

AS_IS = "none (links as they are)"


@dataclass
class Placement:
    """What the experiment asked for: a roster of the user's agents or our own agents."""
    roster: str | None = None  # the user's agents (None: `testbed up` our own)
    shape_dev: str | None = None  # the base station's interface towards them (None: unshaped)
    shape_backend: str = "auto"  # testbed/boxes/shaper.py SHAPE_BACKENDS
    force: bool = False  # shape a DEV that already has a non-default root qdisc
    agents_on_host: int | None = None  # roster agents sharing this machine's cores (default:
    # those on a loopback address)


@dataclass
class AsIsBoxes:
    """The user's boxes with their links left alone: `degrade` is refused."""
    roster_path: str
    endpoints: list[str]
    backend: str = AS_IS
    dev: str | None = None
    shapes: dict[int, LinkShape] = field(default_factory=dict)

    def degrade(self, index: int, shape: LinkShape) -> None:
        raise TestbedError("links are not shaped (no --shape-dev): they cannot change")

    def down(self) -> list[str]:
        return []


def roster_endpoints(roster: str) -> list[str]:
    """The roster's agent endpoints in its order. Raises TestbedError."""
    return [agent.endpoint for agent in read_roster(roster)[0]]


def read_roster(roster: str) -> tuple[list, str | None]:
    """The roster's agents (basestation.roster.RosterAgent, in its order) and its [basestation]
    key folder (None without one). Raises TestbedError."""
    from basestation.roster import RosterError, read_roster_agents, read_roster_keys

    try:
        return read_roster_agents(roster), read_roster_keys(roster)
    except RosterError as e:
        raise TestbedError(str(e)) from None


def on_loopback(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if endpoint.startswith("ipc://"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def agents_on_host(placement: Placement, endpoints: Sequence[str]) -> int:
    if placement.agents_on_host is not None:
        return placement.agents_on_host
    return sum(on_loopback(e) for e in endpoints)


def check_roster_scenario(placement: Placement, scenario, num_agents_asked: int | None,
                          emulate: bool, cell: bool = False) -> list[str]:
    """The roster's endpoints, after checking the scenario fits them (behind a CELL, which
    shapes every link itself, or on placement.shape_dev). Raises TestbedError."""
    from testbed.boxes.shaper import check_scenario_fits

    if num_agents_asked is not None:
        raise TestbedError("--agents counts our own agents; with --roster the roster names them")
    endpoints = roster_endpoints(placement.roster)
    if cell:
        if placement.shape_dev is not None:
            raise TestbedError("--shape-dev: not with --bandwidth (the cell on this machine "
                               "shapes every link to the boxes)")
        return endpoints
    check_scenario_fits(scenario, len(endpoints))
    if placement.shape_dev is None and (scenario.changes_over_time or emulate):
        raise TestbedError(f"scenario {scenario.name!r} shapes links while it runs: give "
                           "--shape-dev DEV (the base station's interface towards the boxes)")
    return endpoints


def open_roster_bed(placement: Placement, shapes: dict[int, LinkShape], endpoints: list[str]):
    """The user's boxes, shaped to SHAPES on placement.shape_dev, or as they are. Raises
    TestbedError."""
    if placement.shape_dev is None:
        return AsIsBoxes(os.path.abspath(placement.roster), endpoints)
    from testbed.boxes.shaper import shape_boxes

    return shape_boxes(placement.roster, placement.shape_dev, shapes,
                       backend=placement.shape_backend, force=placement.force)
