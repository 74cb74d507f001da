"""Every supported MoE family: split routes each routed expert (and nothing else) to its expert's
shard, and the agent's math on the loaded shard equals transformers' own experts module, bit for
bit in float32 on the CPU. Checkpoints are tiny ones written by transformers' own classes."""

from __future__ import annotations

import json
import os

import pytest
import torch
import zmq
from safetensors.torch import load_file, save_file

from common.errors import ShardError
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.families import (
    FAMILIES,
    MXFP4,
    ModelShape,
    family_for_config,
    supported_model_types,
)
from shard_tool.manifest import load_manifest
from shard_tool.safetensors_io import TensorInfo, read_tensor
from shard_tool.split import plan_split, read_source_tensors, split
from testbed.models.family_models import FAMILY_CONFIGS, family_config, write_family_checkpoint
from wire import protocol as P

MODEL_TYPES = sorted(FAMILY_CONFIGS)
# base-station tensors each family must keep: shared experts, dense MLPs, routers, V3's bias
KEPT_AT_BASE = {
    "qwen2_moe": ("model.layers.0.mlp.shared_expert.gate_proj.weight",
                  "model.layers.0.mlp.shared_expert_gate.weight",
                  "model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.gate.weight"),
    "qwen3_moe": ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.gate.weight"),
    "deepseek_v2": ("model.layers.0.mlp.up_proj.weight",
                    "model.layers.1.mlp.shared_experts.down_proj.weight"),
    "deepseek_v3": ("model.layers.0.mlp.up_proj.weight",
                    "model.layers.2.mlp.shared_experts.gate_proj.weight",
                    "model.layers.1.mlp.gate.e_score_correction_bias"),
    "granitemoeshared": ("model.layers.0.shared_mlp.input_linear.weight",
                         "model.layers.2.block_sparse_moe.router.layer.weight"),
    "gpt_oss": ("model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.bias"),
    "mixtral": ("model.layers.0.block_sparse_moe.gate.weight",),
}


@pytest.fixture(scope="module")
def tokenizer():
    from testbed.models.corpus import stdlib_docstrings
    from testbed.models.make_model import train_tokenizer

    return train_tokenizer(300, stdlib_docstrings()[:200])


@pytest.fixture(scope="module")
def family_split(tokenizer, tmp_path_factory):
    """model_type -> (checkpoint folder, split folder); each built once per module."""
    made: dict[str, tuple[str, str]] = {}

    def make(model_type: str) -> tuple[str, str]:
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            ckpt = write_family_checkpoint(model_type, str(root / "ckpt"), tokenizer)
            out = str(root / "split")
            split(ckpt, out)
            made[model_type] = (ckpt, out)
        return made[model_type]

    return make


def hf_experts(ckpt: str) -> tuple[object, dict[int, torch.nn.Module]]:
    """transformers' model from the checkpoint, and its routed-experts module per layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    experts = {index: module for index, layer in enumerate(model.model.layers)
               for module in layer.modules() if type(module).__name__.endswith("Experts")}
    return model, experts


def hf_expert(module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The module's own eager forward with every token routed to `expert` at weight 1."""
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long)
    with torch.no_grad():
        return module(x, index, torch.ones(x.shape[0], 1))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_split_routes_each_routed_expert_to_its_shard(model_type, family_split):
    ckpt, out = family_split(model_type)
    manifest = load_manifest(out)
    family = FAMILIES[manifest.family]
    assert manifest.family == family_for_config({"model_type": model_type}).name
    source = read_source_tensors(ckpt)
    base = next(e for e in manifest.files if e.role == "basestation" and e.tensors)
    # the base station holds every tensor that is not a routed expert, under its own name
    assert not [n for n in base.tensors if family.parse(n) or family.looks_like_expert(n)]
    assert set(base.tensors) == {n for n in source if family.parse(n) is None}
    for name in KEPT_AT_BASE.get(model_type, ()):
        assert name in base.tensors, name
    base_on_disk = load_file(os.path.join(out, base.path))
    for name in KEPT_AT_BASE.get(model_type, ()):
        assert torch.equal(base_on_disk[name], read_tensor(source[name]))
    # every expert shard holds exactly its expert of every MoE layer, bit-identical
    rows = family.tensors(ModelShape.from_summary(manifest.model))
    for q in range(manifest.num_experts):
        entry = manifest.expert_file(q)
        want = {row.shard_name(layer, q): (row, layer)
                for layer in manifest.moe_layers for row in rows}
        assert set(entry.tensors) == set(want)
        shard = load_file(os.path.join(out, entry.path))
        for name, (row, layer) in want.items():
            whole = read_tensor(source[row.disk_name(layer, q)])
            assert torch.equal(shard[name], whole[q] if row.fused else whole), name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_manifest_describes_the_experts(model_type, family_split):
    ckpt, out = family_split(model_type)
    model = load_manifest(out).model
    _, experts = hf_experts(ckpt)
    config = json.load(open(os.path.join(ckpt, "config.json")))
    any_experts = next(iter(experts.values()))
    assert model["moe_layers"] == sorted(experts)
    assert model["num_experts"] == any_experts.num_experts
    assert model["top_k"] == config["num_experts_per_tok"]
    assert model["hidden_size"] == config["hidden_size"]
    # the routed expert's own size (gpt_oss names it intermediate_size, the others _dim)
    assert model["ffn_size"] == getattr(any_experts, "intermediate_dim",
                                        getattr(any_experts, "intermediate_size", None))
    assert model["activation"] == config["hidden_act"] and model["dtype"] == "float32"
    if model_type == "gpt_oss":
        assert model["expert_kind"] == "gpt_oss"
        assert (model["swiglu_alpha"], model["swiglu_limit"]) == (any_experts.alpha,
                                                                  any_experts.limit)
    else:
        assert model["expert_kind"] == "swiglu" and "swiglu_alpha" not in model


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_agent_math_equals_transformers_bit_for_bit(model_type, family_split):
    ckpt, out = family_split(model_type)
    manifest = load_manifest(out)
    loaded = load_experts(out, list(range(manifest.num_experts)), device="cpu", dtype="float32")
    _, experts = hf_experts(ckpt)
    assert loaded.moe_layers == tuple(sorted(experts))
    torch.manual_seed(0)
    x = torch.randn(5, loaded.hidden_size)
    for layer, module in experts.items():
        for q in loaded.experts:
            want = hf_expert(module, q, x)
            assert torch.equal(expert_forward(x, loaded.weights[q][layer]), want), (layer, q)
            into = x.clone()  # out aliasing x, as the server answers in the request's frame
            expert_forward(into, loaded.weights[q][layer], out=into)
            assert torch.equal(into, want), (layer, q)


def test_agent_serves_only_moe_layers(family_split):
    from edge_agent.server import Agent, AgentConfig, self_benchmark

    _, out = family_split("qwen3_moe")  # layer 0 is a dense MLP (mlp_only_layers)
    agent = Agent(AgentConfig(experts=(0, 5), shards_dir=out, self_benchmark=False))
    agent.load(out)
    assert agent.loaded.moe_layers == (1, 2) and sorted(agent.loaded.weights[5]) == [1, 2]
    assert self_benchmark(agent.loaded)["tokens_per_s"] > 0  # picks a MoE layer to time
    x = torch.randn(3, agent.loaded.hidden_size)
    frames, fields = P.encode_tensor(x, "float32")

    def ask(layer: int) -> dict:
        payload = zmq.Frame(bytes(memoryview(frames[0]).cast("B")))
        header = zmq.Frame(P.pack(P.EXPERT, 1, layer=layer, experts=[[5, 3]], **fields))
        with torch.inference_mode():
            return P.unpack(agent.handle([header, payload])[0])

    dense = ask(0)
    assert dense["kind"] == P.ERROR and dense["code"] == P.ERR_UNKNOWN_LAYER
    assert "no routed experts" in dense["message"]
    assert ask(2)["kind"] == P.EXPERT_REPLY


@pytest.mark.integration
def test_unsupported_model_type_is_one_line(tmp_path, run_cli):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_cli("shard_tool", "split", str(ckpt), str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'llama' is not a supported MoE" in lines[0], result.stderr
    for model_type in MODEL_TYPES:
        assert model_type in lines[0]
    assert supported_model_types() == MODEL_TYPES
    assert not os.path.exists(tmp_path / "out")


def fake_tensors(names: dict[str, tuple[int, ...]], dtype: str = "F32") -> dict[str, TensorInfo]:
    """Headers only: plan_split never reads bytes."""
    return {n: TensorInfo(n, dtype, s, "/nonexistent", 0, 4 * max(1, int(torch.tensor(s).prod())))
            for n, s in names.items()}


def planned(model_type: str, extra: dict[str, tuple[int, ...]]):
    """plan_split over the family's expected expert tensors, one base tensor and `extra`."""
    config = family_config(model_type, 300, 1, 2).to_dict()
    family = family_for_config(config)
    shape = family.shape_from_config(config)
    names = {n: s for n, (s, _) in family.expected(shape).items()}
    names["model.embed_tokens.weight"] = (300, 32)
    names.update(extra)
    return plan_split(family, shape, fake_tensors(names))


@pytest.mark.parametrize("model_type,name,shape,message", [
    ("qwen2_moe", "model.layers.0.mlp.experts.0.gate_proj.bias", (24,),
     "looks like a routed expert, but the qwen2_moe table does not know it"),
    ("mixtral", "model.layers.0.mlp.experts.gate_up_proj", (6, 96, 32),
     "looks like a routed expert"),
    ("granitemoe", "model.layers.1.block_sparse_moe.input_linear.bias", (6, 96),
     "looks like a routed expert"),
    ("qwen2_moe", "model.layers.1.mlp.experts.0.gate_proj.weight", (24, 32),
     "does not fit config.json (6 experts in MoE layers 0,2, unquantised)"),
    ("deepseek_v3", "model.layers.1.mlp.experts.8.up_proj.weight", (24, 32),
     "does not fit config.json"),
    ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj_blocks", (6, 96, 1, 16),
     "does not fit config.json"),
])
def test_unknown_expert_tensors_stop_the_split(model_type, name, shape, message):
    with pytest.raises(ShardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        planned(model_type, {name: shape})


@pytest.mark.parametrize("model_type,name", [
    ("granitemoe", "model.layers.0.block_sparse_moe.input_linear.weight"),
    ("gpt_oss", "model.layers.2.mlp.experts.gate_up_proj"),
    ("olmoe", "model.layers.1.mlp.experts.7.down_proj.weight"),
])
def test_expert_shapes_are_checked_against_the_config(model_type, name):
    config = family_config(model_type, 300, 1, 2).to_dict()
    family = family_for_config(config)
    shape = family.shape_from_config(config)
    names = {n: s for n, (s, _) in family.expected(shape).items()}
    names[name] = (*names[name][:-1], names[name][-1] + 1)  # one column too many
    with pytest.raises(ShardError, match=rf"tensor {name} has shape .*, config.json implies"):
        plan_split(family, shape, fake_tensors(names))


def test_fused_experts_are_sliced_by_byte_range():
    infos = planned("granitemoe", {})[1]
    # expert 2's input_linear of layer 0: the third [96, 32] float32 block of the fused tensor
    sliced = next(i for i in infos[2]
                  if i.name == "model.layers.0.block_sparse_moe.experts.2.input_linear.weight")
    assert sliced.shape == (96, 32) and sliced.nbytes == 96 * 32 * 4
    assert sliced.offset == 2 * 96 * 32 * 4


# -- MXFP4 (published GPT-OSS) --------------------------------------------------------------------

FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> blocks [..., R, C/32, 16], scales [..., R, C/32] (uint8): each group of
    32 gets the power of two that brings its largest magnitude within 6, then the nearest E2M1
    code (sign in bit 3); two codes a byte, the even-indexed one in the low nibble."""
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    exponent = torch.ceil(torch.log2(amax / 6.0))
    scaled = groups / torch.exp2(exponent)
    codes = (scaled.abs()[..., None] - FP4_MAGNITUDES).abs().argmin(-1) + 8 * (scaled < 0)
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent[..., 0] + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tokenizer, tmp_path_factory) -> str:
    """The tiny GPT-OSS with its expert weights in MXFP4, laid out as the published ones."""
    ckpt = write_family_checkpoint("gpt_oss", str(tmp_path_factory.mktemp("mxfp4") / "ckpt"),
                                   tokenizer, max_shard_size=None, intermediate_size=64)
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        # stored untransposed: gate_up [E, 2F, H], down [E, H, F]
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(ckpt, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {
        "quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
            "lm_head"]}
    json.dump(config, open(config_path, "w"))
    return ckpt


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_mxfp4_experts_split_and_dequantise_as_transformers_does(mxfp4_checkpoint, tmp_path,
                                                                 dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = str(tmp_path / "out")
    manifest = split(mxfp4_checkpoint, out, dtype=dtype)
    assert manifest.model["expert_quant"] == MXFP4 and manifest.model["expert_kind"] == "gpt_oss"
    assert manifest.model["dtype"] == {"keep": "float32", "bfloat16": "bfloat16"}[dtype]
    with open(os.path.join(out, "basestation", "config.json")) as f:
        assert "quantization_config" not in json.load(f)  # the base station builds a plain model
    source = load_file(os.path.join(mxfp4_checkpoint, "model.safetensors"))
    base = load_file(os.path.join(out, "basestation", "model.safetensors"))
    assert not [n for n in base if ".experts." in n]
    prefix = "model.layers.{layer}.mlp.experts."
    for q in range(manifest.num_experts):
        shard = load_file(os.path.join(out, manifest.expert_file(q).path))
        for layer in manifest.moe_layers:
            for part in ("gate_up_proj", "down_proj"):
                for kind in ("blocks", "scales"):  # the codes are copied, never converted
                    name = f"{prefix.format(layer=layer)}{q}.{part}_{kind}"
                    whole = source[f"{prefix.format(layer=layer)}{part}_{kind}"]
                    assert shard[name].dtype == torch.uint8 and torch.equal(shard[name], whole[q])
    loaded = load_experts(out, list(range(manifest.num_experts)), device="cpu", dtype="float32")
    for layer in manifest.moe_layers:
        p = prefix.format(layer=layer)
        gate_up = convert_moe_packed_tensors(source[p + "gate_up_proj_blocks"],
                                             source[p + "gate_up_proj_scales"],
                                             dtype=torch.float32)  # [E, H, 2F]
        down = convert_moe_packed_tensors(source[p + "down_proj_blocks"],
                                          source[p + "down_proj_scales"],
                                          dtype=torch.float32)  # [E, F, H]
        for q in loaded.experts:
            weights = loaded.weights[q][layer]
            assert torch.equal(weights.gate_up, gate_up[q]) and torch.equal(weights.down, down[q])
            want_bias = source[p + "gate_up_proj_bias"][q]
            if dtype == "bfloat16":
                want_bias = want_bias.to(torch.bfloat16).float()
            assert torch.equal(weights.gate_up_bias, want_bias)


def test_mxfp4_quantiser_in_this_test_is_sane():
    """Guards the test's own quantiser: the dequantised matrix is close to what was quantised."""
    from edge_agent.mxfp4 import dequantize

    torch.manual_seed(0)
    w = torch.randn(8, 64)  # [R, C]
    blocks, scales = quantize_mxfp4(w)
    back = dequantize(blocks, scales).t()  # [R, C]
    assert torch.nn.functional.cosine_similarity(back.flatten(), w.flatten(), dim=0) > 0.98
    assert blocks.shape == (8, 2, 16) and scales.shape == (8, 2)


