"""Expert-wise bitwidths (issue #14): the quantised format (shard_tool/quant.py) by hand and by
round trip, the manifest's bits and its backward compatibility, 8/4-bit splits loaded by the
agent's code, the auto search's decision rule, and bad input."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.errors import ShardError
from edge_agent.expert_math import (
    UNLIMITED_TOKENS,
    ExpertWeights,
    QuantLinear,
    Scratch,
    choose_kernel,
    expert_forward,
)
from edge_agent.shards import load_experts
from shard_tool import quant
from shard_tool.manifest import Manifest, load_manifest
from shard_tool.search import BASE_BITS, LOW_BITS, choose_widths
from shard_tool.split import split
from shard_tool.verify import inspect_table, verify

EXPERT_W1 = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


# -- the format, by hand ------------------------------------------------------------------------

def test_eight_bits_by_hand():
    q = quant.quantize(torch.tensor([[-1.0, 0.0, 0.5, 1.0]]), 8)
    assert q.scale.tolist() == [pytest.approx(1 / 127)]
    # 0.5 * 127 = 63.5 rounds half to even: 64
    assert q.qweight.tolist() == [[-127, 0, 64, 127]] and q.qweight.dtype == torch.int8
    assert quant.dequantize(q)[0, 2].item() == pytest.approx(64 / 127)


def test_four_bits_by_hand():
    q = quant.quantize(torch.tensor([[-1.0, 0.2, 0.5, 1.0]]), 4)
    assert q.group_size == 4 and q.shape == (1, 4)
    assert q.offset.tolist() == [[-1.0]] and q.scale.tolist() == [[pytest.approx(2 / 15)]]
    # codes round((w + 1) / (2/15)): 0, 9, 11.25 -> 11, 15;
    # column k in the low nibble, column k + K/2 in the high one
    assert q.qweight.tolist() == [[0 | 11 << 4, 9 | 15 << 4]] and q.qweight.dtype == torch.uint8
    assert quant.dequantize(q)[0].tolist() == pytest.approx(
        [-1.0, 0.2, -1 + 11 * 2 / 15, 1.0])


@pytest.mark.parametrize("cols,group", [(256, 64), (64, 64), (128, 64), (48, 16), (24, 8),
                                        (32, 32), (2, 2)])
def test_group_size(cols, group):
    assert quant.group_size_for(cols) == group


def test_odd_rows_do_not_pack():
    with pytest.raises(ValueError, match="even"):
        quant.quantize(torch.ones(2, 5), 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(64, 256), (96, 48), (7, 24), (300, 128)])
def test_round_trip_within_the_stated_error(bits, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 0.1  # rows of different magnitude
    w[0] = 0.25  # a constant row: scale 0 (8 bits: step max/127; 4 bits: exact)
    q = quant.quantize(w, bits)
    error = (w - quant.dequantize(q)).abs()
    assert bool((error <= quant.max_error(q) + 1e-6 * w.abs().max()).all())
    assert error[0].max().item() <= 0.25 / 254 + 1e-7
    # relative to the matrix, 8 bits lose under half a percent, 4 bits under 7 %
    assert error.max() / w.abs().max() < (0.004 if bits == 8 else 0.07)
    if bits == 8:  # in half precision: the float32 product, rounded once
        assert torch.equal(quant.dequantize(q, torch.bfloat16), quant.dequantize(q).bfloat16())


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_are_independent_and_stack(bits):
    torch.manual_seed(1)
    w = torch.randn(40, 128)
    whole = quant.quantize(w, bits)
    top, bottom = quant.quantize(w[:16], bits), quant.quantize(w[16:], bits)
    joined = quant.cat_rows([top, bottom])
    for a, b in zip(quant.stored_tensors(whole), quant.stored_tensors(joined)):
        assert torch.equal(a, b)
    assert torch.equal(quant.dequantize(whole.rows(16, 40)), quant.dequantize(bottom))


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_layout_round_trips(bits):
    q = quant.quantize(torch.randn(12, 64), bits)
    layout = quant.layout("w", 12, 64, bits)
    tensors = quant.stored_tensors(q)
    assert [n for n, _, _ in layout] == quant.tensor_names("w", bits)
    for (_name, code, shape), tensor in zip(layout, tensors):
        assert tuple(tensor.shape) == shape
        assert code == {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32"}[tensor.dtype]
    again = quant.from_stored(bits, tensors)
    assert torch.equal(quant.dequantize(again), quant.dequantize(q))
    with pytest.raises(ValueError):
        quant.from_stored(bits, [tensors[0], tensors[1][:5], *tensors[2:]])


# -- the agent's multiply ---------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_dequantising_path_is_the_float_product_of_the_dequantised_matrix(bits):
    torch.manual_seed(2)
    q = quant.quantize(torch.randn(96, 64), bits)
    x = torch.randn(5, 64)
    linear = QuantLinear(q, torch.device("cpu"), torch.float32, Scratch(torch.device("cpu"),
                                                                        torch.float32))
    assert torch.equal(linear.linear(x), F.linear(x, quant.dequantize(q)))
    # it holds the quantised tensors only; the scratch is shared and one matrix big
    assert linear.nbytes == q.nbytes < 96 * 64 * 4 // (2 if bits == 8 else 4)
    assert linear.scratch.nbytes == 96 * 64 * 4


@pytest.mark.parametrize("bits", [8, 4])
def test_torch_kernels_agree_where_they_run(bits):
    torch.manual_seed(3)
    q = quant.quantize(torch.randn(128, 128), bits)
    cpu = torch.device("cpu")
    choice = choose_kernel(q, cpu, torch.float32, mode="on")
    assert choice.max_tokens in (0, UNLIMITED_TOKENS)
    if choice.max_tokens:  # this torch has the CPU kernel: same product within rounding
        fast = QuantLinear(q, cpu, torch.float32, Scratch(cpu, torch.float32), UNLIMITED_TOKENS)
        x = torch.randn(3, 128)
        torch.testing.assert_close(fast.linear(x), F.linear(x, quant.dequantize(q)),
                                   rtol=1e-4, atol=1e-4)
    assert choose_kernel(q, cpu, torch.float32, mode="off").max_tokens == 0
    auto = choose_kernel(q, cpu, torch.float32)
    assert auto.max_tokens in ((0, 1, 4, 16, 64, UNLIMITED_TOKENS) if bits == 8
                               else (0, UNLIMITED_TOKENS)), auto
    # groups of 16 are not a kernel's
    small = quant.quantize(torch.randn(8, 48), 4)
    assert choose_kernel(small, cpu, torch.float32, mode="on").max_tokens == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_expert_answers_into_its_input(bits):
    """The server passes out=x (the request's frame): x must be consumed before down writes."""
    torch.manual_seed(4)
    cpu = torch.device("cpu")
    scratch = Scratch(cpu, torch.float32)
    w1, w2, w3 = torch.randn(48, 32), torch.randn(32, 48), torch.randn(48, 32)
    gate_up = QuantLinear(quant.quantize(torch.cat([w1, w3]), bits), cpu, torch.float32, scratch)
    down = QuantLinear(quant.quantize(w2, bits), cpu, torch.float32, scratch)
    weights = ExpertWeights(gate_up=gate_up, down=down)
    assert weights.quantized and (weights.hidden_size, weights.ffn_size) == (32, 48)
    x = torch.randn(6, 32)
    want = expert_forward(x, ExpertWeights.from_w123(
        *(quant.dequantize(quant.quantize(w, bits)) for w in (w1, w2, w3))))
    assert torch.equal(expert_forward(x, weights), want)
    into = x.clone()
    expert_forward(into, weights, out=into)
    assert torch.equal(into, want)
    with pytest.raises(ValueError, match="both"):
        ExpertWeights(gate_up=gate_up, down=w2)


# -- the search's decision rule (pure) ---------------------------------------------------------

def additive(increments: dict, base_pct: float):
    """measure_pct of a model whose units add their own increase at LOW_BITS."""
    calls = []

    def measure(bits):
        calls.append(dict(bits))
        return base_pct + sum(increments[u] for u, b in bits.items() if b == LOW_BITS)

    return measure, calls


def test_choose_widths_lowers_the_least_sensitive_first_and_stops_at_the_tolerance():
    units = [(0, 0), (0, 1), (1, 0), (1, 1)]
    sensitivity = {(0, 0): 0.30, (0, 1): 0.05, (1, 0): 0.10, (1, 1): 0.01}
    measure, calls = additive(sensitivity, base_pct=0.02)
    choice = choose_widths(units, sensitivity, measure, tolerance_pct=0.2)
    # base 0.02; + (1,1) -> 0.03; + (0,1) -> 0.08; + (1,0) -> 0.18; + (0,0) -> 0.48 > 0.2: stop
    assert choice.feasible and choice.steps == 4
    assert choice.bits == {(0, 0): BASE_BITS, (0, 1): LOW_BITS, (1, 0): LOW_BITS,
                           (1, 1): LOW_BITS}
    assert choice.increase_pct == pytest.approx(0.18)
    assert choice.base_increase_pct == pytest.approx(0.02)
    assert len(calls) == 5 and all(b == BASE_BITS for b in calls[0].values())


def test_choose_widths_stops_at_the_first_step_over_the_tolerance():
    """EdgeMoE lowers in sensitivity order and stops; it does not skip ahead."""
    units = [(0, 0), (0, 1), (0, 2)]
    sensitivity = {(0, 0): 0.01, (0, 1): 0.02, (0, 2): 0.03}
    increments = {(0, 0): 0.01, (0, 1): 0.5, (0, 2): 0.0}  # (0, 1) hurts more than measured alone
    measure, _ = additive(increments, base_pct=0.0)
    choice = choose_widths(units, sensitivity, measure, tolerance_pct=0.1)
    assert choice.bits == {(0, 0): LOW_BITS, (0, 1): BASE_BITS, (0, 2): BASE_BITS}
    assert choice.steps == 2


def test_choose_widths_reports_an_unreachable_tolerance():
    measure, calls = additive({(0, 0): 0.0}, base_pct=0.3)
    choice = choose_widths([(0, 0)], {(0, 0): 0.0}, measure, tolerance_pct=0.1)
    assert not choice.feasible and choice.base_increase_pct == pytest.approx(0.3)
    assert len(calls) == 1


# -- manifest ----------------------------------------------------------------------------------

def old_fingerprint(data: dict) -> str:
    """The fingerprint as shard_tool computed it before bits existed."""
    digest = hashlib.sha256()
    digest.update(json.dumps([data["family"], data["model"]], sort_keys=True).encode())
    for entry in sorted(data["files"], key=lambda e: e["path"]):
        digest.update(f"{entry['path']}:{entry['sha256']}\n".encode())
    return digest.hexdigest()


def test_sixteen_bit_manifests_are_unchanged(tiny_split):
    """--bits 16 (the default) writes no bits, and a manifest without bits loads as 16 bits
    everywhere; one written before quantisation existed (format 1, the old fingerprint) still
    loads (format 3's fingerprint covers every field: issue 20)."""
    with open(os.path.join(tiny_split, "manifest.json")) as f:
        data = json.load(f)
    assert data["format_version"] == 3 and all("bits" not in f for f in data["files"])
    data.update(format_version=1, fingerprint=old_fingerprint(data))
    manifest = Manifest.from_json(data)
    assert {b for layers in manifest.expert_bits().values() for b in layers.values()} == {16}


@pytest.fixture(scope="module")
def quantised_splits(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    made = {}
    for bits in (8, 4):
        made[bits] = str(root / f"s{bits}")
        split(tiny_checkpoint, made[bits], bits=bits)
    return made


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_manifest_records_bits_per_file_and_layer(quantised_splits, tiny_split, bits):
    out = quantised_splits[bits]
    with open(os.path.join(out, "manifest.json")) as f:
        data = json.load(f)
    assert data["format_version"] == 3
    manifest = load_manifest(out)
    for entry in manifest.files:
        if entry.role == "expert":
            assert entry.bits == {0: bits, 1: bits}
            # smaller than the float shard: 8 bits ~ 1/4 of float32, 4 bits ~ 1/6
            assert entry.bytes < load_manifest(tiny_split).expert_file(entry.expert).bytes / (
                3.5 if bits == 8 else 5.5)
    verify(out)
    assert f"  {bits}" in inspect_table(manifest)
    # an edited width is caught by the fingerprint
    data["files"][1]["bits"] = {"0": 4 if bits == 8 else 8, "1": bits}
    with pytest.raises(ShardError, match="fingerprint"):
        Manifest.from_json(data)
    data["files"][1]["bits"] = {"0": 3}
    with pytest.raises(ShardError, match="malformed"):
        Manifest.from_json(data)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_shards_hold_the_quantised_weights(quantised_splits, tiny_checkpoint, bits):
    source = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    shard = load_file(os.path.join(quantised_splits[bits], "experts", "expert-003.safetensors"))
    assert EXPERT_W1 not in shard
    stored = [shard[n] for n in quant.tensor_names(EXPERT_W1, bits)]
    want = quant.quantize(source[EXPERT_W1], bits)
    for a, b in zip(stored, quant.stored_tensors(want)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_agent_loads_quantised_experts_and_computes_with_them(quantised_splits, tiny_checkpoint,
                                                              bits):
    loaded = load_experts(quantised_splits[bits], [0, 3], device="cpu", dtype="float32",
                          quant_kernels="off")
    source = load_file(os.path.join(tiny_checkpoint, "model.safetensors"))
    x = torch.randn(4, loaded.hidden_size)
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.3."
        w1, w2, w3 = (quant.dequantize(quant.quantize(source[prefix + f"w{i}.weight"], bits))
                      for i in (1, 2, 3))
        want = expert_forward(x, ExpertWeights.from_w123(w1, w2, w3))
        assert torch.equal(expert_forward(x, loaded.weights[3][layer]), want)
    assert all(w.quantized for layers in loaded.weights.values() for w in layers.values())
    # no float copy of the weights: what it holds is the shard's bytes plus one scratch matrix
    held = loaded.weight_bytes - loaded.scratch.nbytes
    assert held <= loaded.shard_bytes
    assert loaded.scratch.nbytes == 2 * loaded.ffn_size * loaded.hidden_size * 4


# -- bad input: one line, exit 2, nothing written ------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("args,message", [
    (["--bits", "3"], "--bits 3: choose from 16, 8, 4, auto"),
    (["--bits", "auto"], "--bits auto needs --tolerance"),
    (["--bits", "auto", "--tolerance", "-1"], "--tolerance -1: must be a percentage >= 0"),
    (["--bits", "auto", "--tolerance", "nan"], "--tolerance nan"),
    (["--bits", "8", "--tolerance", "1"], "--tolerance applies to --bits auto only"),
    (["--bits", "auto", "--tolerance", "1", "--calibration", "/no/such/file.txt"],
     "--calibration /no/such/file.txt: no such file"),
    (["--bits", "auto", "--tolerance", "1", "--calibration-tokens", "x"],
     "--calibration-tokens x"),
])
def test_bad_bits_options_are_one_line(args, message, tiny_checkpoint, tmp_path, run_cli):
    result = run_cli("shard_tool", "split", tiny_checkpoint, str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert result.stderr.strip() == f"shard_tool: error: {message}" or (
        message in result.stderr and len(result.stderr.strip().splitlines()) == 1), result.stderr
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


@pytest.mark.integration
def test_mxfp4_checkpoints_refuse_bits(tmp_path, run_cli):
    from testbed.models.corpus import stdlib_docstrings
    from testbed.models.family_models import write_family_checkpoint
    from testbed.models.make_model import train_tokenizer

    ckpt = write_family_checkpoint("gpt_oss", str(tmp_path / "ckpt"),
                                   train_tokenizer(300, stdlib_docstrings()[:100]))
    config_path = os.path.join(ckpt, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4"}
    with open(config_path, "w") as f:
        json.dump(config, f)
    result = run_cli("shard_tool", "split", ckpt, str(tmp_path / "out"), "--bits", "8")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "mxfp4 already; split it with --bits 16" in result.stderr
    assert not os.path.exists(tmp_path / "out")
