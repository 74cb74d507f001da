"""What every experiment record keeps about its links (pure parts): asked beside measured, in
the roster's order, the table the reports print, and the refusal of an agent that is silent."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from testbed.experiments.beds import on_loopback
from testbed.experiments.link_record import check_answered, link_records, links_lines
from testbed.links.spec import LinkShape, TestbedError


@dataclass(frozen=True)
class Measure:  # the fields of testbed.boxes.linkcheck.LinkMeasure this uses
    index: int
    endpoint: str
    experts: tuple[int, ...]
    answered: bool = True
    rtt_p50_ms: float | None = None
    rtt_p95_ms: float | None = None
    down_mbit: float | None = None
    up_mbit: float | None = None
    compute_us_per_token: float | None = None
    error: str | None = None

    def as_record(self) -> dict:
        return {"rtt_p50_ms": self.rtt_p50_ms, "error": self.error}


BOXES = ["tcp://10.0.0.2:5600", "tcp://10.0.0.3:5600"]


def test_each_link_keeps_its_own_endpoint_what_was_asked_and_what_was_measured():
    measures = [Measure(0, "tcp://127.0.0.1:4001", (0, 1), rtt_p50_ms=81.5, rtt_p95_ms=90.0,
                        down_mbit=19.2, up_mbit=18.9),
                Measure(1, "tcp://127.0.0.1:4002", (2, 3), rtt_p50_ms=4.6, rtt_p95_ms=5.1)]
    shapes = {0: LinkShape(delay_ms=40, jitter_ms=5, rate_mbit=20)}
    links = link_records(measures, shapes, BOXES)
    assert [link["endpoint"] for link in links] == BOXES  # the box's, not the relay it is dialed by
    assert links[0]["dialed"] == "tcp://127.0.0.1:4001"
    assert links[0]["asked_rtt_ms"] == 80.0 and links[0]["measured_rtt_ms"] == 81.5
    assert links[0]["asked_down_mbit"] == 20 and links[0]["measured_down_mbit"] == 19.2
    assert links[1]["asked_rtt_ms"] == 0.0 and links[1]["asked"] == LinkShape().describe()
    table = "\n".join(links_lines(links, "htb+nft+relay", True, "br0"))
    assert "the user's agents (--roster), shaping: htb+nft+relay on br0" in table
    assert "| 0 | tcp://10.0.0.2:5600 | delay 40 ms ±5" in table and "81.5 ms / 90 ms" in table
    assert links_lines([], "netem") == []


def test_a_silent_agent_stops_the_experiment_with_one_line_naming_it():
    links = link_records([Measure(0, BOXES[0], (0,), rtt_p50_ms=1.0),
                          Measure(1, BOXES[1], (1,), answered=False, error="no INFO in 10 s")],
                         {}, BOXES)
    with pytest.raises(TestbedError, match=r"agent 1 \(tcp://10.0.0.3:5600\) did not answer: "
                                           "no INFO in 10 s"):
        check_answered(links)
    check_answered(links[:1])
    assert "did not answer" in "\n".join(links_lines(links, "relays"))


def test_agents_on_loopback_are_counted_as_sharing_this_machine():
    assert on_loopback("tcp://127.0.0.1:5600") and on_loopback("tcp://[::1]:5600")
    assert on_loopback("tcp://localhost:5600") and on_loopback("ipc:///tmp/agent")
    assert not on_loopback("tcp://10.0.0.2:5600")


def test_links_left_as_they_are_ask_nothing():
    links = link_records([Measure(0, BOXES[0], (0,), rtt_p50_ms=0.7)], None, BOXES)
    assert links[0]["asked"] == "not shaped" and links[0]["asked_rtt_ms"] is None
    assert "| 0 | tcp://10.0.0.2:5600 | not shaped | - | 0.7 ms" in "\n".join(
        links_lines(links, "none (links as they are)", True))
