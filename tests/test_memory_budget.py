"""Memory-budgeted agents (issue 14, part 2): `--memory-budget`, the cache policy
(edge_agent/expert_cache.py), the store that loads on demand and on hints (edge_agent/residency.py),
PREFETCH hints (wire/protocol.py), and the base station's predictor
(basestation/prefetch.py). Pure parts with hand numbers; then agents in process; then real agent
processes over ZeroMQ (integration)."""

from __future__ import annotations

import argparse
import random
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq
from agent_fixtures import client, start_agent, start_module_agent  # noqa: F401
from fuzz_messages import MessageFuzzer
from test_agent_math import assert_close_rel
from waiting import wait_until

from basestation.prefetch import PrefetchConfig, RoutePredictor, cache_summary, plan_hints
from edge_agent.cli import memory_size
from edge_agent.expert_cache import CacheConfig, ExpertCache
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from wire import messages as M
from wire import protocol as P

UNIT = 10  # bytes of one unit in the policy tests


# -- --memory-budget --------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [("64MB", 64_000_000), ("1.5GiB", 3 * 2**29),
                                           ("300000", 300_000), ("512 KiB", 2**19),
                                           ("2gb", 2_000_000_000), (".5MiB", 2**19)])
def test_memory_size_units(text, expected):
    assert memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "0", "0.1", "5XB", "nanMB", "1e3MB",
                                  "2PiB", "\u0664MB", "1.2.3GB"])
def test_memory_size_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        memory_size(text)


@pytest.mark.integration
@pytest.mark.parametrize("value", ["lots", "-1MB", "0"])
def test_bad_memory_budget_is_one_line(run_cli, tiny_split, value):
    done = run_cli("edge_agent", "--expert", "0", "--shards", tiny_split, "--memory-budget",
                   value, timeout_s=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--memory-budget" in lines[0], done.stderr


@pytest.mark.integration
def test_budget_below_one_layer_expert_is_one_line(run_cli, tiny_split):
    done = run_cli("edge_agent", "--expert", "0", "--shards", tiny_split, "--bind",
                   "tcp://127.0.0.1:*", "--memory-budget", "1KB", timeout_s=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [("edge_agent: error: --memory-budget 1000 bytes is smaller than one "
                      "layer-expert (98304 bytes)")], done.stderr


# -- the policy (expert_cache.py), by hand ----------------------------------------------------


def replay(cache: ExpertCache, requests) -> str:
    """Serve (layer, experts) requests as the store does: 'h' a hit, 'm' a miss (evict, load)."""
    trace = []
    for layer, experts in requests:
        cache.advance(layer)
        units = [(q, layer) for q in experts]
        for unit in units:
            if unit in cache.sizes:
                trace.append("h")
            else:
                for victim in cache.victims(UNIT, units):
                    cache.evict(victim)
                cache.insert(unit, UNIT)
                trace.append("m")
            cache.touch(unit)
    return "".join(trace)


def test_steps_by_hand():
    cache = ExpertCache([0, 1, 2, 3], CacheConfig(budget_bytes=100))
    cache.advance(0)
    cache.touch((5, 0))
    cache.advance(2)  # layer 1 went by: the clock is at position 2
    # (1): d = (l - c - 1) mod n + 1; the pass in progress does not count in (2)
    assert [cache.distance((5, layer)) for layer in (0, 1, 2, 3)] == [2, 3, 4, 1]
    assert cache.use_probability((5, 0)) == 0.5  # (0 + 0.5 * 1) / (0 + 1)
    assert cache.steps((5, 3)) == 1 + 4 * 0.5 / 0.5
    cache.advance(0)  # the first pass is complete: passes = 1, uses[(5, 0)] = 1
    assert cache.use_probability((5, 0)) == (1 + 0.5) / 2
    cache.touch((5, 0))  # counted when this pass is complete
    assert cache.use_probability((5, 0)) == (1 + 0.5) / 2
    assert cache.use_probability((6, 0)) == 0.5 / 2  # never used: falls
    assert cache.steps((6, 1)) == 1 + 4 * 0.75 / 0.25
    cache.advance(3)
    cache.advance(0)  # passes = 1.95, uses[(5, 0)] = 1.95
    assert cache.use_probability((5, 0)) == pytest.approx((1.95 + 0.5) / 2.95)


def test_a_cycle_longer_than_the_cache_hits_as_beladys_rule_does():
    """LRU hits nothing on a 4-layer cycle with room for 2 (it evicts the unit needed next);
    Belady's rule hits (k - 1) / (n - 1) of the time: 1 in 3, and 2 in 3 with room for 3."""
    cycle = [(layer, [0]) for _ in range(6) for layer in range(4)]
    two = replay(ExpertCache(range(4), CacheConfig(2 * UNIT)), cycle)
    three = replay(ExpertCache(range(4), CacheConfig(3 * UNIT)), cycle)
    assert two == "mmmm" + "hmm" * 6 + "hm"
    assert three == "mmmm" + "hhm" * 6 + "hh"


def test_frequent_units_stay_though_their_layer_comes_later():
    """Expert 0 is used at every layer of 6 passes, expert 1 at layer 1 of the first only: at
    the start of the 7th, (1, 1) comes round first (d = 1) but goes before (0, 3) (d = 3)."""
    cache = ExpertCache(range(4), CacheConfig(2 * UNIT))
    for first in (True, False, False, False, False, False):
        for layer in range(4):
            cache.advance(layer)
            cache.touch((0, layer))
            if first and layer == 1:
                cache.touch((1, 1))
    cache.advance(0)
    cache.insert((0, 3), UNIT)
    cache.insert((1, 1), UNIT)
    passes = (1 - 0.95**6) / 0.05  # 6 completed passes, decayed: 5.298
    p_rare, p_often = (0.95**5 + 0.5) / (passes + 1), (passes + 0.5) / (passes + 1)
    assert cache.steps((1, 1)) == pytest.approx(1 + 4 * (1 - p_rare) / p_rare)  # 17.4
    assert cache.steps((0, 3)) == pytest.approx(3 + 4 * (1 - p_often) / p_often)  # 3.35
    assert cache.victims(UNIT, [(0, 0)]) == [(1, 1)]


def test_hints_protect_until_their_layer_goes_by_and_never_evict_a_sooner_unit():
    cache = ExpertCache(range(4), CacheConfig(2 * UNIT))
    replay(cache, [(0, [0]), (1, [0])])  # resident (0, 0), (0, 1); the clock at 1
    assert cache.hint((0, 3)) and cache.hinted[(0, 3)] == 2  # d = 2
    # steps (1): (0, 0) 3 + 4 = 7, (0, 1) 4 + 4 = 8, both beyond the hint's 2: the last goes
    assert cache.steps((0, 0)) == 7 and cache.steps((0, 1)) == 8
    assert cache.victims(UNIT, for_hint=(0, 3)) == [(0, 1)]
    cache.evict((0, 1))
    cache.insert((0, 3), UNIT)
    assert not cache.hint((0, 3))  # resident: nothing to load, but protected
    assert cache.victims(UNIT, protect=[(0, 0)], for_hint=(0, 2)) is None  # only the hinted
    assert cache.victims(UNIT, protect=[(0, 2)]) == [(0, 0)]  # a request: unhinted first
    cache.advance(2)
    assert cache.hinted == {(0, 3): 1}
    cache.advance(0)  # layer 3 went by unused: the hint is dropped
    assert cache.hinted == {}
    # a hinted unit that is needed sooner than every resident one evicts nothing sooner
    cache.hint((0, 1))
    assert cache.distance((0, 1)) == 1 and cache.victims(UNIT, for_hint=(0, 1)) == [(0, 3)]
    # ...but a hint that is a guess counts as (1) with its probability: 1 + 4 * 0.8 / 0.2 = 17
    # steps, so it evicts neither (0, 0) (used in the one completed pass: p = 0.75, 5.33
    # steps) nor (0, 3) (15)
    cache.hint((0, 1), probability=0.2)
    assert cache.hint_steps((0, 1)) == pytest.approx(17)
    assert cache.steps((0, 0)) == pytest.approx(4 + 4 * 0.25 / 0.75)
    assert cache.victims(UNIT, for_hint=(0, 1)) is None


def test_sizes_and_estimates():
    cache = ExpertCache([0, 1], CacheConfig(100))
    assert cache.estimate((0, 0)) == 0  # the first load measures
    cache.reserve((0, 0), 0)
    cache.insert((0, 0), 40)
    assert cache.estimate((3, 1)) == 40 and cache.used_bytes == 40
    cache.reserve((1, 0), 40)
    assert cache.used_bytes == 80 and cache.resident_bytes == 40
    assert cache.victims(40, protect=[(1, 0)]) == [(0, 0)]
    cache.cancel((1, 0))
    assert cache.victims(40) == []
    with pytest.raises(ValueError):
        ExpertCache([0], CacheConfig(0))


# -- the predictor (basestation/prefetch.py), by hand ----------------------------------------


def test_predictor_learns_transitions_and_predicts_by_hand():
    predictor = RoutePredictor(num_experts=4)
    for _ in range(3):  # layer 0 -> 1: expert 0 goes to 2, expert 1 to 3
        predictor.observe(0, np.array([[0, 1]]))
        predictor.observe(1, np.array([[2, 3]]))
    predictor.observe(0, np.array([[0, 1]]))
    predictor.observe(1, np.array([[2, 0]]))
    assert predictor.next_layer == {0: 1, 1: 0}  # the last layer counts into the next pass
    assert predictor.counts[0].tolist() == [[1, 0, 4, 3], [1, 0, 4, 3], [0] * 4, [0] * 4]
    predictor.observe(0, np.array([[0, 1]]))
    following, p = predictor.predict(0, np.array([[0, 1]]))
    # (1): q_j = 2 * (1 + 1, 0, 4 + 4, 3 + 3)_j / 16
    assert following == 1 and p.tolist() == pytest.approx([0.25, 0.0, 1.0, 0.75])
    # two tokens: P_j = 1 - (1 - q_1j)(1 - q_2j); a token from unseen experts guesses nothing
    predictor.observe(1, np.array([[2, 3], [0, 1]]))  # T changed: not counted
    assert predictor.counts[0][0].tolist() == [1, 0, 4, 3]
    predictor.observe(0, np.array([[0, 1], [1, 2]]))
    predictor.observe(1, np.array([[3, 2], [1, 0]]))  # counted as a product of multi-hots
    assert predictor.counts[0].tolist() == [[1, 0, 5, 4], [2, 1, 5, 4], [1, 1, 0, 0], [0] * 4]
    following, p = predictor.predict(0, np.array([[0, 1], [2, 3]]))
    q1 = 2 * np.array([3, 1, 10, 8]) / 22  # capped at 1
    q2 = 2 * np.array([1, 1, 0, 0]) / 2
    assert p.tolist() == pytest.approx((1 - (1 - np.minimum(q1, 1)) * (1 - q2)).tolist())
    assert predictor.predict(0, np.array([[3]])) is None  # expert 3 never seen at layer 0
    assert predictor.predict(3, np.array([[0, 1]])) is None  # nothing known of layer 3
    again = RoutePredictor.from_state(predictor.state())
    assert (again.counts[0] == predictor.counts[0]).all() and again.next_layer == {0: 1, 1: 0}


def test_plan_hints_threshold_cap_and_owners():
    p = np.array([0.25, 0.0, 1.0, 0.75, 0.31])
    owner = {0: "a", 2: "b", 3: "a", 4: "b"}
    assert plan_hints(p, owner) == {"b": [2, 4], "a": [3]}
    assert plan_hints(p, owner, PrefetchConfig(max_experts=2)) == {"b": [2], "a": [3]}
    assert plan_hints(p, {1: "a"}) == {}  # expert 1 is unlikely; the others have no budget


def test_cache_summary_from_a_reply_or_info():
    reply = P.cache_figures([3, 1, 2500, 9, 5, 4096, 2])
    assert cache_summary(reply) == {
        "cache_hits": 3, "cache_misses": 1, "cache_hit_rate": 0.75, "cache_stall_ms": 2.5,
        "cache_loads": 9, "cache_evictions": 5, "cache_resident_bytes": 4096,
        "cache_hinted_hits": 2}
    assert cache_summary({"hits": 0, "misses": 0, "stall_s": 0.0})["cache_hit_rate"] is None


# -- the protocol ---------------------------------------------------------------------------


def test_prefetch_fields_round_trip_and_garbage_is_refused():
    header = P.unpack(P.pack(P.PREFETCH, None, **P.prefetch_fields(3, [5, 1])))
    assert M.Prefetch.decode(header) == M.Prefetch(3, (5, 1))
    header = P.unpack(P.pack(P.PREFETCH, 7, **P.prefetch_fields(3, [5, 1], [120, 40.4])))
    assert M.Prefetch.decode(header) == M.Prefetch(3, (5, 1), (100, 40))
    for bad in ({"layer": True, "experts": [1]}, {"layer": -1, "experts": [1]},
                {"layer": 1, "experts": "1"}, {"layer": 1, "experts": [1.0]},
                {"layer": 1, "experts": [[1]]}, {"layer": 1, "experts": [-2]},
                {"layer": "1", "experts": []}, {"experts": [1]},
                {"layer": 1, "experts": [1], "percent": [101]},
                {"layer": 1, "experts": [1], "percent": [50, 50]},
                {"layer": 1, "experts": [1], "percent": 50}):
        with pytest.raises(P.ProtocolError):
            M.Prefetch.decode(bad)
    with pytest.raises(P.ProtocolError) as e:
        M.Prefetch.decode({"layer": 1, "experts": list(range(P.MAX_PREFETCH_EXPERTS + 1))})
    assert e.value.code == P.ERR_TOO_LARGE
    with pytest.raises(P.ProtocolError):
        M.Prefetch.decode({"layer": 1, "experts": [1]}, [b"payload"])
    assert len(P.prefetch_fields(0, range(1000))["experts"]) == P.MAX_PREFETCH_EXPERTS
    for bad in (None, [1, 2], [1, 2, 3, 4, 5, 6, -7], [1, 2, 3, 4, 5, 6, True], "x", {}):
        assert P.cache_figures(bad) is None


# -- the store, in process ------------------------------------------------------------------


def unit_bytes(split: str) -> int:
    return load_experts(split, [0], device="cpu").weights[0][0].nbytes


@pytest.mark.parametrize("bits", [16, 4])
def test_a_budgeted_store_computes_what_the_full_load_does(tiny_checkpoint, tiny_split,
                                                           tmp_path, bits):
    split = tiny_split
    if bits != 16:
        from shard_tool.split import split as split_checkpoint

        split = str(tmp_path / "q")
        split_checkpoint(tiny_checkpoint, split, bits=bits)
    full = load_experts(split, [0, 1, 2], device="cpu", quant_kernels="off")
    unit = full.weights[0][0].nbytes
    budgeted = load_experts(split, [0, 1, 2], device="cpu", quant_kernels="off",
                            memory_budget_bytes=4 * unit)
    store = budgeted.store
    assert store.figures()["resident_units"] == 4 and store.counters.loads == 4
    torch.manual_seed(0)
    x = torch.randn(5, full.hidden_size)
    for _ in range(4):
        for layer in full.moe_layers:
            weights = store.acquire(layer, [0, 2, 1])
            for q in (0, 1, 2):
                assert torch.equal(expert_forward(x, weights[q][layer]),
                                   expert_forward(x, full.weights[q][layer]))
            assert store.resident_bytes <= 4 * unit
    c = store.counters
    assert c.hits + c.misses == 24 and c.misses > 0 and c.evictions > 0
    assert c.loads == 4 + c.misses and c.stall_s > 0
    assert budgeted.weights[1][0] is not None and 0 in budgeted.weights[1]  # a Mapping
    assert budgeted.weight_bytes <= 4 * unit + (budgeted.scratch.nbytes if budgeted.scratch
                                                 else 0)
    store.close()


def test_hints_load_in_the_background_and_turn_misses_into_hits(tiny_split):
    unit = unit_bytes(tiny_split)
    stores = {}
    for hinted in (False, True):
        store = load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit,
                             prefetch_hints="on").store
        for step in range(12):  # 2 layers, room for 1 unit: each request needs the other
            layer, following = step % 2, (step + 1) % 2
            if hinted:
                store.hint(following, [0])
            store.acquire(layer, [0])
            if hinted:
                wait_until(lambda f=following, s=store: (0, f) in s.resident, 60,
                           what=f"the hinted unit of layer {following} to load")
        stores[hinted] = store.counters
        store.close()
    assert stores[False].hits == 1 and stores[False].misses == 11  # only the warm unit
    assert stores[True].misses <= 2 and stores[True].hinted_hits >= 10
    assert stores[True].hints == 12 and stores[True].hinted_loads >= 10


def test_prefetch_garbage_never_answers_nor_breaks_the_agent(tiny_split):
    """Regression guard for the fuzzer: a PREFETCH gets no reply whatever it holds, and the
    agent computes correctly afterwards."""
    from edge_agent.server import Agent, AgentConfig

    unit = unit_bytes(tiny_split)
    agent = Agent(AgentConfig(experts=(0, 3), shards_dir=tiny_split, self_benchmark=False,
                              memory_budget_bytes=2 * unit, prefetch_hints="on"))
    agent.load(tiny_split)
    fuzz = MessageFuzzer(14, hidden=64, experts=(0, 3, 5), layers=3, frame_cap=1 << 20)
    rng = random.Random(14)
    try:
        with torch.inference_mode():
            for _ in range(400):
                fields = {"layer": fuzz.junk() if rng.random() < 0.5 else rng.randrange(-1, 4),
                          "experts": fuzz.junk() if rng.random() < 0.5 else
                          [rng.randrange(-1, 9) for _ in range(rng.randrange(0, 5))]}
                if rng.random() < 0.2:
                    fields.pop(rng.choice(["layer", "experts"]))
                request_id = fuzz.junk() if rng.random() < 0.3 else None
                header = msgpack.packb({"v": P.PROTOCOL_VERSION, "kind": P.PREFETCH,
                                        "id": request_id, **fields})
                payload = [zmq.Frame(b"x" * rng.randrange(1, 9))] if rng.random() < 0.1 else []
                reply = agent.handle([zmq.Frame(header), *payload])
                if request_id is None or isinstance(request_id, int):
                    assert reply is None, P.unpack(reply[0])
                else:  # the header itself is malformed: an ERROR, as for any kind
                    assert P.unpack(reply[0])["code"] == P.ERR_MALFORMED
            x = torch.randn(4, 64)
            frames, fields = P.encode_tensor(x, "float32")
            reference = load_experts(tiny_split, [3], device="cpu")
            for _ in range(100):  # a hint carried by an EXPERT: garbled, it never fails it
                carried = fuzz.junk() if rng.random() < 0.7 else P.prefetch_fields(
                    rng.randrange(3), [3, 0, 5], [rng.randrange(101) for _ in range(3)])
                out = agent.handle([zmq.Frame(P.pack(P.EXPERT, 1, layer=1, experts=[[3, 4]],
                                                     prefetch=carried, **fields)),
                                    *map(zmq.Frame, [f.copy() for f in frames])])
                assert P.unpack(out[0])["kind"] == P.EXPERT_REPLY
                assert_close_rel(P.decode_tensor(P.unpack(out[0]), out[1:]),
                                 expert_forward(x, reference.weights[3][1]), rel=1e-6)
        assert agent.info()["memory_budget"]["hints"] > 0
    finally:
        agent.close()


def test_hint_in_time_by_hand():
    from edge_agent.expert_cache import hint_in_time

    assert hint_in_time(1, 0.0, 5, 1.0)  # no step measured yet: taken
    assert hint_in_time(1, 1.0, 0, 1.0) and hint_in_time(1, 0.5, 0, 1.0)  # up to 2x late
    assert not hint_in_time(1, 0.4, 0, 1.0)
    assert hint_in_time(4, 0.1, 3, 0.1) and not hint_in_time(1, 0.1, 3, 0.1)  # a queue ahead


def test_hints_that_cannot_come_in_time_are_dropped(tiny_split):
    """Regression (issue 20): a flood of hints made 919 loads of which 158 were used; a hint
    whose load would end long after its layer's turn is now dropped, not loaded."""
    unit = unit_bytes(tiny_split)
    store = load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit,
                         prefetch_hints="on").store
    try:
        store.acquire(0, [0])  # the clock at layer 0: layer 1 comes round in one step
        store.load_wall_s, store.step_s = 1.0, 0.01  # measured: a load takes 100 steps
        store.hint(1, [0])
        assert store.counters.hints_late == 1 and store.counters.hinted_loads == 0
        assert (0, 1) not in store.cache.hinted and not store._pending
        store.step_s = 1.0  # now a load takes one step: in time
        store.hint(1, [0])
        wait_until(lambda: (0, 1) in store.resident, 60, what="the hinted unit to load")
        assert store.counters.hinted_loads == 1 and store.counters.hints_late == 1
        assert store.figures()["hints_late"] == 1
    finally:
        store.close()


def test_a_request_naming_every_expert_stays_within_the_budget_and_one_unit(tiny_split):
    """Regression (issue 20): a request naming 8 experts loaded all 8 before computing any,
    each protected from eviction, and left 7.9x the --memory-budget resident. Now each is
    loaded just before it is computed (residency.ExpertStore.acquire_each)."""
    from edge_agent.server import Agent, AgentConfig

    unit = unit_bytes(tiny_split)
    experts = tuple(range(8))
    agent = Agent(AgentConfig(experts=experts, shards_dir=tiny_split, self_benchmark=False,
                              memory_budget_bytes=unit, prefetch_hints="off"))
    agent.load(tiny_split)
    store = agent.loaded.store
    held = []  # the store's bytes, resident and being loaded, at every load
    load = store.reader.load

    def watched_load(expert, layer):
        held.append(store.cache.used_bytes)
        return load(expert, layer)

    store.reader.load = watched_load
    reference = load_experts(tiny_split, list(experts), device="cpu")
    x = torch.randn(16, 64)
    frames, fields = P.encode_tensor(x, "float32")
    counts = [[q, 2] for q in experts]
    try:
        with torch.inference_mode():
            for layer in (1, 0, 1):
                out = agent.handle([zmq.Frame(P.pack(P.EXPERT, 1, layer=layer, experts=counts,
                                                     **fields)),
                                    *map(zmq.Frame, [f.copy() for f in frames])])
                got = P.decode_tensor(P.unpack(out[0]), out[1:])
                want = torch.cat([expert_forward(x[2 * q:2 * q + 2],
                                                 reference.weights[q][layer]) for q in experts])
                assert_close_rel(got, want, rel=1e-6)
                assert store.resident_bytes <= unit
    finally:
        agent.close()
    assert len(held) >= 8 * 3 - 1 and max(held) <= 2 * unit, (max(held) / unit, len(held))


# -- real agents over ZeroMQ ---------------------------------------------------------------


@pytest.fixture(scope="module")
def budgeted_pair(start_module_agent, tiny_split):  # noqa: F811
    """Experts 0-3 and 4-7 with half their layer-experts' bytes, and the same unbudgeted."""
    unit = unit_bytes(tiny_split)
    agents = {}
    for budget in (None, 4 * unit):  # 8 units each: half; slow storage, so hints are taken
        extra = ("--memory-budget", str(budget), "--pace-load-mb-per-s", "50") if budget else ()
        started = [start_module_agent("--expert", ids, "--shards", tiny_split, "--bind",
                                      "tcp://127.0.0.1:*", "--no-self-benchmark", *extra,
                                      ready=None) for ids in ("0-3", "4-7")]
        agents[budget is not None] = started
    for started in agents.values():
        for agent in started:
            agent.wait_line("edge_agent ready")
    return {budgeted: [f"{ids}={a.endpoint}" for ids, a in zip(("0-3", "4-7"), started)]
            for budgeted, started in agents.items()}


@pytest.mark.integration
def test_a_budgeted_agent_serves_what_an_unbudgeted_one_does(budgeted_pair, client,  # noqa: F811
                                                            tiny_split):
    budgeted = client.connect(budgeted_pair[True][0].split("=", 1)[1])
    full = client.connect(budgeted_pair[False][0].split("=", 1)[1])
    torch.manual_seed(4)
    x = torch.randn(6, 64)
    for _ in range(3):
        for layer in (0, 1):
            for counts in ([(0, 6)], [(1, 2), (2, 4)], [(3, 3), (0, 3)]):
                want, plain = client.expert(full, layer, x, counts)
                got, reply = client.expert(budgeted, layer, x, counts)
                assert_close_rel(got, want, rel=1e-6)
                assert "cache" not in plain.header
                figures = P.cache_figures(reply.header["cache"])
                assert figures is not None and figures["resident_bytes"] <= 4 * 98304
    info = client.info(budgeted)
    budget = info["memory_budget"]
    assert budget["evictions"] > 0 and budget["loads"] > budget["resident_units"]
    assert budget["misses"] > 0 and budget["units"] == 8 and budget["budget_bytes"] == 4 * 98304
    assert "memory_budget" not in client.info(full)


@pytest.mark.integration
def test_generation_on_budgeted_agents_equals_unbudgeted_and_hints_flow(budgeted_pair,
                                                                       tiny_split):
    from basestation.generate import generate
    from basestation.session import build_roster, open_session

    tokens, figures = {}, {}
    for budgeted, flags in budgeted_pair.items():
        session = open_session(tiny_split, build_roster(flags, None, None), dtype="float32",
                               wait_s=30, progress=False)
        try:
            assert session.runtime.prefetching == budgeted  # on by default with a budget only
            ids = session.base.tokenizer("Return the list of items", return_tensors="pt"
                                         ).input_ids
            result = generate(session, ids, max_new_tokens=12, ignore_eos=True, theta=0.0)
            tokens[budgeted] = result.token_ids
            figures[budgeted] = session.runtime.agent_figures()
            if budgeted:
                assert session.runtime.hints_sent > 0
                infos = [session.client.info(a.peer) for a in session.agents]
        finally:
            session.close()
    assert tokens[True] == tokens[False] and len(tokens[True]) == 12
    assert all("cache_hits" not in a for a in figures[False])
    for agent, info in zip(figures[True], infos):
        assert agent["cache_hits"] + agent["cache_misses"] > 0
        assert info["memory_budget"]["hints"] > 0


@pytest.mark.integration
def test_hints_over_the_wire_raise_the_hit_rate(start_agent, client, tiny_split):  # noqa: F811
    """Deterministic: one expert, 2 layers, room for one unit, a pause between layers (the
    base station's own work); hinted, the next layer's unit is loaded during the pause."""
    unit = unit_bytes(tiny_split)
    rates = {}
    for hinted in (False, True):
        agent = start_agent("--expert", "5", "--shards", tiny_split, "--bind",
                            "tcp://127.0.0.1:*", "--no-self-benchmark", "--memory-budget",
                            str(unit), "--pace-load-mb-per-s", "50")
        peer = client.connect(agent.endpoint)
        x = torch.randn(1, 64)
        for step in range(10):
            layer = step % 2
            if hinted:
                client.send(peer, P.PREFETCH, **P.prefetch_fields(1 - layer, [5]))
            client.expert(peer, layer, x, [(5, 1)])
            # the base station's own work between layers, the thing under test: a hinted load
            # (about 2 ms at 50 MB/s) must end within it, with a wide margin for a loaded machine
            time.sleep(0.3)
        budget = client.info(peer)["memory_budget"]
        rates[hinted] = budget["hits"] / (budget["hits"] + budget["misses"])
        assert client.recv(0.2) is None  # no reply to any hint
        agent.stop()
    assert rates[False] == 0.1  # the warm unit only
    assert rates[True] >= 0.8


def test_runtime_hints_budgeted_agents_only_and_shows_their_figures():
    """MoeRuntime with a stand-in dispatcher: hints go to the budgeted agent once the table
    knows the transition; the cache figures its replies carry (kept by the dispatcher on its
    AgentLink) reach agent_figures, /stats and /metrics."""
    import asyncio
    import json
    from types import SimpleNamespace

    from basestation.agents import AgentTable
    from basestation.liveness import AgentLink
    from basestation.metrics import EngineMetrics
    from basestation.moe_layer import MoeRuntime
    from basestation.serve import Server

    budgeted = AgentLink(name="tcp://a:1", peer=b"a", experts=(0, 1),
                         info={"memory_budget": {"hits": 0, "misses": 0, "stall_s": 0.0}})
    plain = AgentLink(name="tcp://b:1", peer=b"b", experts=(2, 3))
    sent = []
    fake = SimpleNamespace(send=lambda peer, kind, frames=(), **f: sent.append((peer, kind, f)))
    table = AgentTable([budgeted, plain], num_experts=4, hidden_size=64)
    runtime = MoeRuntime(table, SimpleNamespace(client=fake), SimpleNamespace(), ffn_size=128)
    assert runtime.prefetching

    def plan(layer, experts):  # what the dispatcher's run of this layer will carry
        hints = runtime._hints(layer, torch.tensor(experts))
        sent.extend((agent.peer, fields) for agent, fields in hints.values())

    for _ in range(2):  # layer 0 -> 1: experts {0, 2} go to {1, 3}
        plan(0, [[0, 2]])
        plan(1, [[1, 3]])
    # nothing before the first transition is known; 3 and 2 are not on a budgeted agent
    assert sent == [(b"a", {"layer": 1, "experts": [1], "percent": [100]}),
                    (b"a", {"layer": 0, "experts": [0], "percent": [100]})]
    plan(0, [[0, 2]])
    assert len(sent) == 3 and sent[-1] == sent[0]
    assert runtime.set_prefetch(False) is False and runtime.set_prefetch(True) is True
    budgeted.info["memory_budget"]["prefetch"] = False  # its loads cost no waiting
    assert runtime.set_prefetch(True) is False and not runtime.budgeted_agents()
    budgeted.info["memory_budget"]["prefetch"] = True
    assert runtime.set_prefetch(True) is True

    budgeted.cache = P.cache_figures([5, 1, 2000, 8, 3, 4096, 2])  # as dispatch.run keeps it
    figures = runtime.agent_figures()
    assert figures[0]["cache_hits"] == 5 and figures[0]["cache_stall_ms"] == 2.0
    assert "cache_hits" not in figures[1]

    engine = SimpleNamespace(session=SimpleNamespace(runtime=runtime), metrics=EngineMetrics(),
                             queue_depth=0)
    server = Server(engine, "tiny")
    stats = json.loads(asyncio.run(server.stats(None)).body)
    assert stats["agents"][0]["cache_hit_rate"] == 0.8333  # 5 / 6, rounded
    assert stats["prefetch"] == {"hints": True, "hints_sent": 3}
    text = asyncio.run(server.metrics(None)).body.decode()
    assert 'wdmoe_agent_cache_hits_total{agent="tcp://a:1",experts="0,1"} 5.0' in text
    assert 'wdmoe_agent_cache_stall_seconds_total{agent="tcp://a:1",experts="0,1"} 0.002' \
        in text
    assert 'agent="tcp://b:1"' in text.split("wdmoe_agent_cache_hits_total")[0]


def test_a_store_takes_hints_only_while_loads_wait_on_storage(tiny_split):
    """Loads from memory are CPU work: hints are ignored (the base station sends none, info's
    prefetch is false); on slow storage (emulated) they are taken; "on" forces them."""
    unit = unit_bytes(tiny_split)
    fast = load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit).store
    slow = load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit,
                        load_bytes_per_s=10e6).store
    forced = load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit,
                          prefetch_hints="on").store
    try:
        # A load at memory speed takes as long as its CPU time; measured here, a loaded machine
        # makes it look like waiting on storage (descheduled mid-load), so it is set by hand.
        fast._measured(wall_s=0.010, cpu_s=0.010, seed=True)
        assert fast.figures()["prefetch"] is False and slow.figures()["prefetch"] is True
        assert forced.figures()["prefetch"] is True
        for store in (fast, slow):
            store.hint(1, [0])
        assert fast.counters.hints_ignored == 1 and fast.counters.hints == 0
        assert slow.counters.hints == 1
        wait_until(lambda: (0, 1) in slow.resident, 60, what="the hinted unit to load")
        with pytest.raises(ValueError):
            load_experts(tiny_split, [0], device="cpu", memory_budget_bytes=unit,
                         prefetch_hints="maybe")
    finally:
        for store in (fast, slow, forced):
            store.close()


def test_the_dispatcher_carries_hints_in_requests_and_sends_the_rest_after_them():
    """A hint for an agent this layer calls rides in its EXPERT request (no message of its
    own); one for an agent not called goes as a PREFETCH, after every request."""
    from types import SimpleNamespace

    from basestation.agents import AgentTable
    from basestation.dispatch import Dispatcher
    from basestation.liveness import AgentLink

    a = AgentLink(name="tcp://a:1", peer=b"a", experts=(0, 1))
    b = AgentLink(name="tcp://b:1", peer=b"b", experts=(2, 3))
    log = []
    fake = SimpleNamespace(
        send_expert=lambda peer, layer, x, counts, **kw: log.append(("expert", peer, kw)) or
        len(log), send=lambda peer, kind, frames=(), **f: log.append((kind, peer, f)),
        recv=lambda timeout_s: None, connected=lambda peer: False)  # never answers: gone
    dispatcher = Dispatcher(fake, AgentTable([a, b], num_experts=4, hidden_size=4),
                            prober=SimpleNamespace(in_flight={}))
    hint_a, hint_b = P.prefetch_fields(1, [1], [80]), P.prefetch_fields(1, [3], [60])
    hints = {id(a): (a, hint_a), id(b): (b, hint_b)}
    x = torch.randn(1, 4)
    dispatcher.run(0, x, {0: (torch.tensor([0]), torch.tensor([0]))}, hints)
    assert log == [("expert", b"a", {"wire_dtype": None, "prefetch": hint_a}),
                   (P.PREFETCH, b"b", hint_b)]
