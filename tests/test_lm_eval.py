"""lm-eval tasks through the distributed model (`testbed.experiments.lm_eval_model.DistributedLM`, real
agents over real sockets) against lm-eval on transformers' own model in this process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from agent_fixtures import start_module_agent, two_agents  # noqa: F401

pytestmark = pytest.mark.integration
TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "testbed", "tasks")
TASKS = ["wdmoe_mc_heldout", "wdmoe_heldout_ppl", "wdmoe_heldout_next_word"]
LIMIT = 10


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def evaluate(lm) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, limit=LIMIT, log_samples=True,
                                   task_manager=TaskManager(include_path=TASKS_DIR),
                                   bootstrap_iters=200, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def per_item(result: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(result["samples"][task],
                                                key=lambda s: s["doc_id"])]


def test_tasks_through_agents_equal_transformers_at_theta_0(two_agents, tiny_split,
                                                             tiny_checkpoint):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from basestation.session import build_roster, open_session
    from testbed.experiments.lm_eval_model import DistributedLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    local = evaluate(HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(
        tiny_checkpoint), batch_size=4))
    session = open_session(tiny_split, build_roster(two_agents, None, None), dtype="float32",
                           wait_s=20, progress=False)
    try:
        lm = DistributedLM(session, theta=0.0, batch_size=4)
        distributed = evaluate(lm)
        calls = session.runtime.stats.expert_calls
        assert calls > 0 and session.runtime.stats.experts_dropped == 0
        lm.theta = 0.5  # k = 2: always drops one of the two
        dropping = evaluate(lm)
        assert session.runtime.stats.experts_dropped > 0
    finally:
        session.close()

    for task in TASKS:
        ours, theirs = distributed["results"][task], local["results"][task]
        metrics = [k for k in theirs if "," in k and "stderr" not in k]
        assert metrics, theirs
        for key in metrics:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (task, key)
    for task in ("wdmoe_mc_heldout", "wdmoe_heldout_ppl"):  # log-likelihoods, item by item
        for ours, theirs in zip(per_item(distributed, task), per_item(local, task),
                                strict=True):
            got = torch.tensor([float(r[0]) if isinstance(r, tuple) else float(r)
                                for r in ours])
            want = torch.tensor([float(r[0]) if isinstance(r, tuple) else float(r)
                                 for r in theirs])
            assert torch.allclose(got, want, atol=1e-4), (task, got, want)
    assert per_item(distributed, "wdmoe_heldout_next_word") == \
        per_item(local, "wdmoe_heldout_next_word")  # greedy generations, word for word
    mc_dropping = per_item(dropping, "wdmoe_mc_heldout")
    assert mc_dropping != per_item(distributed, "wdmoe_mc_heldout")  # θ reached the layers


def test_lm_eval_command_line_runs_wdmoe(two_agents, tiny_split, tmp_path, run_cli):
    """`--model wdmoe` from lm-eval's own command line: lm-eval knows only its own models, so
    `python -m testbed.experiments.lm_eval_cli` registers ours and runs lm-eval's cli_evaluate unchanged
    (model_args reach DistributedLM as the dict lm-eval's CLI makes of them)."""
    roster = tmp_path / "roster.toml"
    roster.write_text("[agents]\n" + "".join(
        f'"{flag.split("=", 1)[0]}" = "{flag.split("=", 1)[1]}"\n' for flag in two_agents))
    result = run_cli("testbed.experiments.lm_eval_cli", "--model", "wdmoe", "--model_args",
                     f"shards={tiny_split},agents={roster},theta=0.5,dtype=float32",
                     "--tasks", "wdmoe_mc_heldout", "--include_path", TASKS_DIR,
                     "--limit", "3", "--batch_size", "3", "--output_path", str(tmp_path / "out"),
                     timeout_s=300, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                             HF_DATASETS_OFFLINE="1",
                                             HF_DATASETS_CACHE=str(tmp_path / "datasets")))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wdmoe_mc_heldout" in result.stdout and "acc" in result.stdout
    assert "wdmoe ({'shards'" in result.stdout  # lm-eval's summary line names our model
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1, results
    saved = json.loads(results[0].read_text())
    assert saved["config"]["model"] == "wdmoe"
    assert saved["n-samples"]["wdmoe_mc_heldout"]["effective"] == 3


def test_wdmoe_model_args_are_checked():
    from testbed.experiments.lm_eval_model import DistributedLM

    with pytest.raises(ValueError, match="agents"):
        DistributedLM.create_from_arg_obj({"shards": "x"}, {"batch_size": 1})
