"""What `generate` reports (basestation/generate.py GenerationResult): the faults in --json and
in the summary line, and the stop of an exact run at the first lost expert."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from basestation.generate import GenerationResult, StopOnFault


def result(**faults) -> GenerationResult:
    fields = {"fault_drops": 0, "retries": 0, "failed_requests": 0, **faults}
    return GenerationResult(text="hi", token_ids=[1, 2], token_latency_ms=[10.0, 10.0],
                            expert_calls=30, experts_dropped=10, **fields)


def test_json_carries_the_faults():
    out = result(fault_drops=3, retries=1, failed_requests=2).to_json()
    assert (out["fault_drops"], out["retries"], out["failed_requests"]) == (3, 1, 2)
    assert out["experts_dropped"] == 10 and "step_logits" not in out


def test_summary_names_faults_only_when_there_are_some():
    assert result().summary() == ("[2 tokens, 100.0 tokens/s, mean token latency 10.0 ms, "
                                  "experts dropped 10 (25.0 %)]")
    assert result(fault_drops=3, retries=1).summary().endswith(
        "experts dropped 10 (25.0 %), fault drops 3, retries 1]")


def test_an_exact_run_stops_at_the_first_lost_expert():
    stats = SimpleNamespace(fault_drops=5)
    stop = StopOnFault(stats, fault_drops_before=5)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert stop(ids, None).tolist() == [False]
    stats.fault_drops = 6
    assert stop(ids, None).tolist() == [True]
