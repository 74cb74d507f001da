"""`--bits auto` on a small checkpoint with one expert made deliberately sensitive, the search's
in-memory quantisation against the split's for every family, and Ctrl-C during the search."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.families import FAMILIES, ModelShape
from shard_tool.manifest import load_manifest
from shard_tool.search import BASE_BITS, LOW_BITS, ExpertSlots
from shard_tool.split import bits_request, split
from testbed.models.family_models import FAMILY_CONFIGS, write_family_checkpoint
from testbed.models.make_model import ModelSpec

SENSITIVE = (1, 2)  # (layer, expert)
TOLERANCE_PCT = 0.5


@pytest.fixture(scope="module")
def sensitive_checkpoint(checkpoint_factory, tmp_path_factory) -> str:
    """A random Mixtral whose lm_head is scaled up (sharp predictions, so the loss notices what
    the experts do) and whose layer-1 expert 2 is scaled up 4x (its output, and so its
    quantisation error, dominate), with calibration text the model itself sampled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = checkpoint_factory(ModelSpec(layers=2, hidden=64, intermediate=128, experts=4,
                                        vocab=512, seed=1))
    ckpt = str(tmp_path_factory.mktemp("sensitive") / "ckpt")
    shutil.copytree(base, ckpt)
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] *= 30
    layer, expert = SENSITIVE
    for w in ("w1", "w2", "w3"):
        tensors[f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"] *= 4
    save_file(tensors, path, metadata={"format": "pt"})
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = tokenizer("The queue module", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=400, do_sample=True, temperature=1.0,
                             pad_token_id=0, eos_token_id=[], attention_mask=torch.ones_like(ids))
    with open(os.path.join(ckpt, "calibration.txt"), "w") as f:
        f.write(tokenizer.decode(out[0]))
    return ckpt


@pytest.mark.integration
def test_auto_keeps_the_sensitive_expert_wide(sensitive_checkpoint, tmp_path):
    results = []
    request = bits_request("auto", TOLERANCE_PCT,
                           os.path.join(sensitive_checkpoint, "calibration.txt"), 512)
    manifest = split(sensitive_checkpoint, str(tmp_path / "out"), bits=request,
                     on_search=results.append)
    result = results[0]
    layer, expert = SENSITIVE
    sensitivity = result.sensitivity_pct
    assert max(sensitivity, key=sensitivity.get) == SENSITIVE
    assert sensitivity[SENSITIVE] > 2 * TOLERANCE_PCT > max(
        v for u, v in sensitivity.items() if u != SENSITIVE)
    assert result.widths[expert][layer] == BASE_BITS
    others = [b for q, layers in result.widths.items() for lay, b in layers.items()
              if (lay, q) != SENSITIVE]
    assert others.count(LOW_BITS) >= 5, result.widths
    assert result.increase_pct <= TOLERANCE_PCT
    # the chosen widths are what the manifest and the shards say
    assert manifest.expert_bits() == result.widths
    assert load_manifest(str(tmp_path / "out")).expert_file(expert).bits[layer] == BASE_BITS
    # one measurement for 16 bits, one per unit alone, one at the base width, one per step
    units = len(result.sensitivity_pct)
    assert units + 2 <= result.evaluations <= 2 * units + 2


@pytest.mark.integration
def test_auto_from_the_command_line_prints_the_table(sensitive_checkpoint, tmp_path, run_cli):
    out = str(tmp_path / "out")
    result = run_cli("shard_tool", "split", sensitive_checkpoint, out, "--bits", "auto",
                     "--tolerance", str(TOLERANCE_PCT), "--calibration",
                     os.path.join(sensitive_checkpoint, "calibration.txt"),
                     "--calibration-tokens", "512")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines.index("bits per expert and MoE layer (chosen by --bits auto):")
    assert lines[header + 1].split() == ["expert", "L0", "L1"]
    assert lines[header + 2 + SENSITIVE[1]].split()[1 + SENSITIVE[0]] == str(BASE_BITS)
    assert "measured loss increase" in result.stdout and "against tolerance 0.5 %" in \
        result.stdout
    inspect = run_cli("shard_tool", "inspect", out)
    assert "bits per expert and MoE layer:" in inspect.stdout
    assert run_cli("shard_tool", "verify", out).returncode == 0


@pytest.mark.integration
def test_unreachable_tolerance_is_one_line(sensitive_checkpoint, tmp_path, run_cli):
    result = run_cli("shard_tool", "split", sensitive_checkpoint, str(tmp_path / "out"),
                     "--bits", "auto", "--tolerance", "0", "--calibration-tokens", "64")
    # at 0 % only a model that 8 bits does not change at all passes; this one changes
    if result.returncode == 0:
        pytest.skip("8 bits left this model's calibration loss unchanged")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "already raises the calibration loss" in result.stderr
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_the_search_leaves_nothing(sensitive_checkpoint, tmp_path, monkeypatch):
    from shard_tool import search

    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 1.0

    monkeypatch.setattr(search.CalibrationLoss, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split(sensitive_checkpoint, str(tmp_path / "out"),
              bits=bits_request("auto", 1.0, None, 64))
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def tokenizer():
    from testbed.models.corpus import stdlib_docstrings
    from testbed.models.make_model import train_tokenizer

    return train_tokenizer(300, stdlib_docstrings()[:200])


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("bits", [8, 4])
def test_every_family_quantises_as_the_search_measures(model_type, bits, tokenizer, tmp_path):
    """The search's in-memory weights (transformers' model, experts replaced by
    dequantize(quantize(W))) compute what the agent computes from the split's shards: bit for
    bit where both use F.linear (every swiglu family), within rounding for GPT-OSS (x @ W)."""
    from transformers import AutoModelForCausalLM

    ckpt = write_family_checkpoint(model_type, str(tmp_path / "ckpt"), tokenizer)
    out = str(tmp_path / "out")
    manifest = split(ckpt, out, bits=bits)
    loaded = load_experts(out, list(range(manifest.num_experts)), device="cpu",
                          dtype="float32", quant_kernels="off")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    shape = ModelShape.from_summary(manifest.model)
    slots = ExpertSlots(model, shape)
    slots.prepare((bits,))
    slots.apply({unit: bits for unit in slots.units})
    modules = {index: module for index, layer in enumerate(model.model.layers)
               for module in layer.modules() if type(module).__name__.endswith("Experts")}
    torch.manual_seed(0)
    x = torch.randn(5, loaded.hidden_size)
    for layer, module in modules.items():
        for q in loaded.experts:
            index = torch.full((x.shape[0], 1), q, dtype=torch.long)
            with torch.no_grad():
                want = module(x, index, torch.ones(x.shape[0], 1))
            got = expert_forward(x, loaded.weights[q][layer])
            if FAMILIES[manifest.family].name == "gpt_oss":
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(got, want), (layer, q)
