"""8-bit, 4-bit and auto (mixed) splits served by real agent processes: generation runs, and the
distributed model scores text as transformers does with the same quantised expert weights."""

from __future__ import annotations

import os

import pytest
import torch
from agent_fixtures import start_agent  # noqa: F401
from test_quant_search import SENSITIVE, TOLERANCE_PCT, sensitive_checkpoint  # noqa: F401

from basestation.generate import generate
from basestation.session import build_roster, open_session
from shard_tool.families import ModelShape
from shard_tool.manifest import load_manifest
from shard_tool.split import bits_request, split
from testbed.models import quality

pytestmark = pytest.mark.integration
PROMPT = "Return the list of items in the queue."
TEXT = ("The queue module implements multi-producer, multi-consumer queues. It is especially "
        "useful in threaded programming when information must be exchanged safely between "
        "multiple threads.")


def local_quantised_model(checkpoint: str, shards: str):
    """transformers' model with every routed expert at the split's widths (the search's way)."""
    from transformers import AutoModelForCausalLM

    from shard_tool.search import ExpertSlots

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    manifest = load_manifest(shards)
    slots = ExpertSlots(model, ModelShape.from_summary(manifest.model))
    widths = {(layer, q): b for q, layers in manifest.expert_bits().items()
              for layer, b in layers.items()}
    slots.prepare(sorted(set(widths.values())))
    slots.apply(widths)
    return model


@pytest.mark.parametrize("bits", ["8", "4", "auto"])
def test_quantised_split_served_by_agents(bits, tiny_checkpoint,
                                          sensitive_checkpoint,  # noqa: F811
                                          tmp_path, start_agent):  # noqa: F811
    checkpoint = sensitive_checkpoint if bits == "auto" else tiny_checkpoint
    shards = str(tmp_path / "shards")
    if bits == "auto":
        request = bits_request("auto", TOLERANCE_PCT,
                               os.path.join(checkpoint, "calibration.txt"), 512)
    else:
        request = bits_request(bits)
    manifest = split(checkpoint, shards, bits=request)
    widths = {b for layers in manifest.expert_bits().values() for b in layers.values()}
    assert widths == ({8, 4} if bits == "auto" else {int(bits)})
    half = manifest.num_experts // 2
    groups = [f"0-{half - 1}", f"{half}-{manifest.num_experts - 1}"]
    flags = []
    for ids in groups:
        agent = start_agent("--expert", ids, "--shards", shards, "--bind", "tcp://127.0.0.1:*",
                            "--dtype", "float32")
        flags.append(f"{ids}={agent.endpoint}")
    session = open_session(shards, build_roster(flags, None, None), dtype="float32", wait_s=30,
                           progress=False)
    try:
        tokenizer = session.base.tokenizer
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=8, ignore_eos=True)
        assert len(result.token_ids) == 8 and result.experts_dropped == 0
        assert all(a["failures"] == 0 and a["calls"] > 0 for a in result.agents)
        remote = quality.score_tokens(session.base.model, tokenizer, TEXT, max_tokens=48)
    finally:
        session.close()
    local = quality.score_tokens(local_quantised_model(checkpoint, shards), tokenizer, TEXT,
                                 max_tokens=48)
    # the agents may multiply through torch's int8 kernel (rounding differs in the last bits)
    assert remote.tokens == local.tokens
    assert remote.mean_nll == pytest.approx(local.mean_nll, rel=1e-4)
