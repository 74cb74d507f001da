"""Small checkpoints of every MoE family we support, written by transformers' own config and
model classes with `save_pretrained` (so the on-disk names and layouts are the real ones).

Each config keeps what is special about its family (shared experts, dense layers, group-limited
routing, router and expert biases, unnormalised top-k) at a size that builds in a second.
"""

from __future__ import annotations

from testbed.models.make_model import save_checkpoint

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

# model_type -> config fields beyond COMMON (6-8 experts, so three agents hold ranges of ids)
FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=40, decoder_sparse_step=1,
                      mlp_only_layers=[1], norm_topk_prob=False),  # Qwen1.5-MoE: no renorm
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=24,
                      head_dim=8, mlp_only_layers=[0], norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=4),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                        routed_scaling_factor=2.0, num_key_value_heads=4),  # MLA: kv heads = heads
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
                        qk_nope_head_dim=8, routed_scaling_factor=2.5, num_key_value_heads=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "gpt_oss": dict(num_local_experts=6, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phimoe": dict(num_local_experts=6, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=6, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=6, num_experts_per_tok=2,
                             shared_intermediate_size=40),
}


def family_config(model_type: str, vocab_size: int, bos_token_id: int, eos_token_id: int,
                  **overrides):
    from transformers import AutoConfig

    fields = dict(COMMON, **FAMILY_CONFIGS[model_type], vocab_size=vocab_size,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def write_family_checkpoint(model_type: str, out: str, tokenizer, seed: int = 0,
                            max_shard_size: str | None = "60KB", **overrides) -> str:
    """A random-weight checkpoint of `model_type` (sharded with an index by default) and the
    tokenizer, into OUT (all-or-nothing). Returns OUT."""
    import torch
    from transformers import AutoModelForCausalLM

    config = family_config(model_type, len(tokenizer), tokenizer.bos_token_id,
                           tokenizer.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # random init leaves some biases and norms at 0/1; perturb every tensor a little so the
    # family's peculiarities (router/expert biases, score-correction bias) really count
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.numel() > 0:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    save_checkpoint(model, tokenizer, out, max_shard_size)
    return out
