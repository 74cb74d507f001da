"""Replicas (issue 24): the pure split over an expert's holders, by hand numbers, and the agent
table's route from link estimates."""

from __future__ import annotations

import pytest

from basestation import link_estimator as links
from basestation.agents import AgentTable
from basestation.liveness import AgentLink
from basestation.replicas import SPREAD_CHUNKS, BoxCost, cut, spread
from basestation.roster import build_roster

FAST = BoxCost(fixed_s=0.002, per_token_s=0.001)
SLOW = BoxCost(fixed_s=0.040, per_token_s=0.001)


def test_one_token_goes_to_the_replica_with_the_lowest_time():
    # expert 5 on boxes 1 (slow) and 2 (fast): the fast one, whatever the holders' order
    assert spread({5: 1}, {5: [1, 2]}, {1: SLOW, 2: FAST}) == {5: [(2, 1)]}
    assert spread({5: 1}, {5: [2, 1]}, {1: SLOW, 2: FAST}) == {5: [(2, 1)]}


def test_unreplicated_experts_are_load_not_plan():
    assert spread({0: 3}, {0: [0]}, {0: FAST}) == {}


def test_an_idle_replica_takes_the_token_before_a_busy_one():
    # box 0 already carries expert 0's token (2 + 1 ms = 3 ms); expert 1 on boxes 0 and 1, both
    # fast: on 0 the layer ends at 4 ms, on idle 1 at 3 ms
    assert spread({0: 1, 1: 1}, {0: [0], 1: [0, 1]}, {0: FAST, 1: FAST}) == {1: [(1, 1)]}


def test_behind_a_slow_box_anyway_the_faster_finish_wins_the_tie():
    # box 2 (slow, 41 ms) bounds the layer whatever expert 1 does: both replicas tie on the
    # layer's end, and the one that itself finishes first takes it
    plan = spread({7: 1, 1: 1}, {7: [2], 1: [0, 1]},
                  {0: BoxCost(0.003, 0.001), 1: FAST, 2: SLOW})
    assert plan == {1: [(1, 1)]}


def test_a_batch_is_spread_so_the_layer_ends_earliest():
    # 64 tokens of expert 3 on two equal boxes: 32 each (in chunks of 2)
    plan = spread({3: 64}, {3: [0, 1]}, {0: FAST, 1: FAST})
    assert plan == {3: [(0, 32), (1, 32)]}
    # a box twice as slow per token takes about a third
    plan = spread({3: 96}, {3: [0, 1]}, {0: BoxCost(0.0, 0.001), 1: BoxCost(0.0, 0.002)})
    shares = dict(plan[3])
    assert sum(shares.values()) == 96
    assert abs(shares[1] - 32) <= 96 // SPREAD_CHUNKS


def test_a_slow_replica_gets_no_batch_tokens_while_the_fast_one_is_quicker():
    # 10 tokens: fast alone ends at 12 ms; any token on the slow box ends at 41 ms or more
    assert spread({3: 10}, {3: [0, 1]}, {0: FAST, 1: SLOW}) == {3: [(0, 10)]}


def test_cut_follows_the_shares_and_the_last_takes_any_rest():
    assert cut(5, [("a", 3), ("b", 2)]) == [("a", 0, 3), ("b", 3, 5)]
    assert cut(2, [("a", 3), ("b", 2)]) == [("a", 0, 2)]  # the selector dropped some since
    assert cut(7, [("a", 3), ("b", 2)]) == [("a", 0, 3), ("b", 3, 7)]
    assert cut(0, [("a", 3)]) == []


def _agent(name: str, experts, rtt_s: float) -> AgentLink:
    state = links.initial_state()._replace(srtt_s=rtt_s)
    return AgentLink(name=name, peer=name.encode(), experts=tuple(experts), state=state)


def test_table_routes_replicated_experts_on_the_estimates_now():
    a, b, slow = _agent("a", range(4), 0.002), _agent("b", range(4, 8), 0.002), \
        _agent("s", range(4, 8), 0.040)
    table = AgentTable([a, slow, b], num_experts=8, hidden_size=16)
    assert table.replicated == frozenset(range(4, 8))
    assert table.boxes().box_list[5] == 1  # the cached table: the first live holder
    route = table.route({1: 1, 5: 1})
    assert route.box_list[5] == 2 and route.box_list[1] == 0
    assert [(agent.name, n) for agent, n in route.parts[5]] == [("b", 1)]
    assert table.route({1: 1, 2: 1}) is None  # nothing to choose
    # the fast replica dies: the slow one is the only choice, no route; its tokens go there
    table.fail(b, "test", 0.0)
    assert table.route({5: 1}) is None and table.boxes().box_list[5] == 1
    assert table.other_holder(5, {id(b)}) is slow
    assert table.other_holder(5, {id(b), id(slow)}) is None
    assert a.figures().get("replica_calls") is None
    assert slow.figures()["replica_calls"] == {str(e): 0 for e in range(4, 8)}


def test_drops_are_charged_to_the_replica_weighed():
    a, b = _agent("a", range(8), 0.002), _agent("b", range(8), 0.002)
    table = AgentTable([a, b], num_experts=8, hidden_size=16)
    box_list = [1] * 8
    table.count_drops([3, 3, 4], None, box_list)
    assert (a.drops, b.drops) == (0, 3)


def test_the_roster_gives_an_expert_to_several_agents():
    roster = build_roster(["0-3=tcp://127.0.0.1:5601", "4-7=tcp://127.0.0.1:5602",
                           "4-5=tcp://127.0.0.1:5603"], None, None)
    assert roster.endpoints["tcp://127.0.0.1:5603"] == (4, 5)
    assert roster.endpoints["tcp://127.0.0.1:5602"] == (4, 5, 6, 7)


@pytest.mark.parametrize("demand", [{4: 1}, {4: 40, 5: 3, 0: 9}])
def test_route_parts_sum_to_the_demand(demand):
    a, b, c = _agent("a", range(8), 0.002), _agent("b", range(4, 8), 0.003), \
        _agent("c", range(4, 8), 0.010)
    table = AgentTable([a, b, c], num_experts=8, hidden_size=16)
    route = table.route(demand)
    for expert, parts in route.parts.items():
        assert sum(n for _, n in parts) == demand[expert]
        assert all(expert in agent.experts for agent, _ in parts)


def test_a_roster_file_holds_replicas_as_a_list_and_format_roster_writes_it(tmp_path):
    from basestation.roster import RosterAgent, format_roster, read_roster_agents

    key = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
    agents = [RosterAgent((0, 1, 2, 3), "tcp://10.0.0.2:5600"),
              RosterAgent((4, 5, 6, 7), "tcp://10.0.0.3:5600"),
              RosterAgent((4, 5, 6, 7), "tcp://10.0.0.5:5600", public_key=key)]
    text = format_roster(agents)
    assert '"4,5,6,7" = ["tcp://10.0.0.3:5600", { endpoint = "tcp://10.0.0.5:5600"' in text
    path = tmp_path / "roster.toml"
    path.write_text(text)
    assert read_roster_agents(str(path)) == agents
    path.write_text('[agents]\n"4-7" = []\n')
    with pytest.raises(Exception, match="empty list"):
        read_roster_agents(str(path))
