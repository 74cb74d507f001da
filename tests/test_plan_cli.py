"""`basestation plan` (basestation/plan_cli.py, plan_steps.py): the printed commands as data,
bad input refused in one line with nothing written, and the issue's done-when on real agents:
with one slow box, the hot experts' extra copies go to the fast boxes, and the printed roster
runs as printed with the same greedy tokens."""

from __future__ import annotations

import json
import os
import shlex

import pytest
from agent_fixtures import start_agent  # noqa: F401

from basestation.cli import main
from basestation.placement import Placement
from basestation.plan_cli import memory_bytes
from basestation.plan_steps import MeasuredBox, box_commands, merge_boxes, planned_roster
from basestation.popularity import load_popularity
from basestation.roster import RosterAgent, RosterError, read_roster_agents

KEY = b"rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a well-formed Z85 public key
PROMPT = "The quick brown fox"
DELAY_S = 0.04  # the slow box's extra time per expert call (the 40 ms)


def _box(endpoint: str, key: bytes | None = None) -> MeasuredBox:
    return MeasuredBox(endpoint, (0,), key, 1.0, 100.0, 50.0, 0.001, 4)


def test_commands_are_data_per_box():
    boxes = [_box("tcp://127.0.0.1:5600"), _box("tcp://10.0.0.3:5600", KEY),
             _box("tcp://10.0.0.4:5600")]
    placement = Placement(((0, 1, 2), (2, 3), ()), ((0,), (0,), (0, 1), (1,)), (1.0, 1.0, 0.0))
    pushed = box_commands(boxes, placement, "split", basestation_keys="keys/bs")
    assert [c.endpoint for c in pushed] == ["tcp://127.0.0.1:5600", "tcp://10.0.0.3:5600"]
    assert pushed[0].start == ("edge_agent", "--expert", "0,1,2", "--bind",
                               "tcp://127.0.0.1:5600", "--store", "wdmoe-store")
    assert pushed[0].push == ("shard_tool", "push", "split", "--expert", "0,1,2", "--to",
                              "tcp://127.0.0.1:5600")
    assert pushed[1].start[-2:] == ("--keys", "keys")  # a keyed box starts with its keys
    assert pushed[1].push[-4:] == ("--keys", "keys/bs", "--agent-key", KEY.decode())
    local = box_commands(boxes, Placement(((0, 1), (2,), (3,)), ((0,), (0,), (1,), (2,)),
                                          (1.0, 1.0, 1.0)), "split", agent_shards="/srv/split")
    assert [c.push for c in local] == [None, None, None]  # the split is on the boxes
    assert local[2].start == ("edge_agent", "--expert", "3", "--bind", "tcp://10.0.0.4:5600",
                              "--shards", "/srv/split", "--insecure")  # plain, beyond loopback
    assert planned_roster(boxes, placement) == [
        RosterAgent((0, 1, 2), "tcp://127.0.0.1:5600", None),
        RosterAgent((2, 3), "tcp://10.0.0.3:5600", KEY)]


def test_roster_entries_merge_by_endpoint():
    merged = merge_boxes([RosterAgent((0, 1), "tcp://a:1"), RosterAgent((5,), "tcp://b:1", KEY),
                          RosterAgent((3,), "tcp://a:1")])
    assert merged == [RosterAgent((0, 1, 3), "tcp://a:1"), RosterAgent((5,), "tcp://b:1", KEY)]


def test_memory_figures_per_box():
    gib = 2**30
    assert memory_bytes(["2"], ["tcp://a:1", "tcp://b:1"]) == {"tcp://a:1": 2 * gib,
                                                                "tcp://b:1": 2 * gib}
    assert memory_bytes(["1", "tcp://b:1=0.5"], ["tcp://a:1", "tcp://b:1"]) == {
        "tcp://a:1": gib, "tcp://b:1": gib / 2}
    for values, says in ((["tcp://a:1=1"], "no figure for tcp://b:1"),
                         (["x"], "expected GB or ENDPOINT=GB"),
                         (["-1"], "expected GB or ENDPOINT=GB"),
                         (["tcp://c:1=1"], "is not an agent of the roster")):
        with pytest.raises(RosterError, match=says):
            memory_bytes(values, ["tcp://a:1", "tcp://b:1"])


def _roster(path, lines: dict[str, str]) -> str:
    path.write_text("[agents]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in lines.items()))
    return str(path)


def _refused(capsys, argv: list[str], says: str, out: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("basestation: error: ") and err.count("\n") == 1, err
    assert says in err, err
    assert not os.path.exists(out)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_split, capsys):
    out = str(tmp_path / "out.toml")
    roster = _roster(tmp_path / "r.toml", {"0-7": "tcp://127.0.0.1:9"})
    base = ["plan", "--shards", tiny_split, "--out", out]
    _refused(capsys, [*base, "--roster", str(tmp_path / "none.toml"), "--experts-per-box", "8"],
             "none.toml", out)
    (tmp_path / "bad.json").write_text("{")
    _refused(capsys, [*base, "--roster", roster, "--experts-per-box", "8", "--popularity",
                      str(tmp_path / "bad.json")], "not JSON", out)
    (tmp_path / "nine.json").write_text(json.dumps(
        {"version": 1, "num_experts": 9, "layers": {"0": [0] * 9}, "slots": 0}))
    _refused(capsys, [*base, "--roster", roster, "--experts-per-box", "8", "--popularity",
                      str(tmp_path / "nine.json")], "counts 9 experts, the split has 8", out)
    _refused(capsys, [*base, "--roster", roster, "--experts-per-box", "7"],
             "the boxes hold 7 experts in all", out)
    _refused(capsys, [*base, "--roster", roster, "--memory", "0.0001"],
             "the boxes hold 0 experts in all", out)
    # nothing listens there: refused at the deadline, before any plan
    _refused(capsys, [*base, "--roster", roster, "--experts-per-box", "8", "--wait-s", "1"],
             "no agent for experts 0,1,2,3,4,5,6,7 after 1 s", out)


def _generate(run_cli, split: str, roster: str, *extra: str) -> dict:
    result = run_cli("basestation", "generate", "--shards", split, "--agents", roster,
                     "--dtype", "float32", "--prompt", PROMPT, "--max-new-tokens", "8",
                     "--ignore-eos", "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.integration
def test_plan_puts_hot_replicas_on_fast_boxes_and_its_roster_runs(start_agent, tiny_split,
                                                                   run_cli, tmp_path):
    fast_a = start_agent("--expert", "0-2", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    fast_b = start_agent("--expert", "3-5", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    slow = start_agent("--expert", "6-7", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                       "--fault", f"delay={DELAY_S}")
    a, b, c = fast_a.endpoint, fast_b.endpoint, slow.endpoint
    roster = _roster(tmp_path / "roster.toml", {"0-2": a, "3-5": b, "6-7": c})

    # --popularity-out from generate writes a file the plan reads; its tokens are the baseline
    counted = str(tmp_path / "counted.json")
    before = _generate(run_cli, tiny_split, roster, "--popularity-out", counted)
    pop = load_popularity(counted)
    assert sorted(pop.snapshot()) == [0, 1]  # the tiny model's two MoE layers
    assert pop.slots == 2 * 2 * pop.tokens  # every token, top-2, both layers
    assert pop.tokens >= len(before["token_ids"])  # the prompt's and the generated ones

    # a clear hot expert on the slow box: expert 6 takes most slots in both layers
    hot = str(tmp_path / "hot.json")
    # one hot expert: two hot ones (as 400 and 300) balance over two fast boxes with one copy
    # each, and the planner rightly makes no copy (seen in CI: 800 vs 600 slots)
    counts = [5, 5, 5, 5, 5, 5, 800, 20]
    with open(hot, "w") as f:
        json.dump({"version": 1, "num_experts": 8, "tokens": 365,
                   "layers": {"0": counts, "1": counts}, "slots": 2 * sum(counts)}, f)
    out = str(tmp_path / "planned.toml")
    result = run_cli("basestation", "plan", "--roster", roster, "--shards", tiny_split,
                     "--experts-per-box", "5", "--popularity", hot,
                     "--agent-shards", tiny_split, "--out", out)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    measured = {line.split()[0]: float(line.split()[5]) for line in result.stdout.splitlines()
                if line.startswith("tcp://") and len(line.split()) == 7}
    assert measured[c] > DELAY_S * 1e3 / 2 and measured[c] > max(measured[a], measured[b])
    planned = read_roster_agents(out)
    holders = {e: {agent.endpoint for agent in planned if e in agent.experts} for e in range(8)}
    assert holders[6] == {a, b}  # the hot one twice, both copies on the fast boxes
    assert all(holders[e] for e in range(8))  # every expert somewhere
    assert result.stdout.count("roster (written to") == 1

    # start the boxes exactly as printed (the old agents first stopped: same ports)
    starts = [shlex.split(line.removeprefix("on the box:").strip())
              for line in result.stdout.splitlines() if line.startswith("on the box:")]
    assert {s[s.index("--bind") + 1] for s in starts} == {agent.endpoint for agent in planned}
    for agent in (fast_a, fast_b, slow):
        agent.stop()
    for argv in starts:
        assert argv[0] == "edge_agent"
        start_agent(*argv[1:])
    after = _generate(run_cli, tiny_split, out)
    assert after["token_ids"] == before["token_ids"]  # θ = 0 on replicas: the same tokens
    assert after["experts_dropped"] == 0
