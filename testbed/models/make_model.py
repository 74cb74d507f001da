"""`testbed make-model`: a small Mixtral checkpoint in exactly the on-disk format of real ones.

transformers' own MixtralConfig + save_pretrained (single file or sharded with an index),
random weights, and a byte-level BPE tokenizer trained on text that is on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.dtypes import DTYPE_ALIASES
from common.staging import give_files_folder_mode, staged_dir
from testbed.models.corpus import stdlib_docstrings

DTYPES = DTYPE_ALIASES  # --dtype bf16|fp16|fp32
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Mixtral-Instruct style, so chat front ends work on test models too.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class ModelSpec:
    layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    experts: int = 8
    top_k: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    dtype: str = "fp32"  # bf16 | fp16 | fp32
    max_shard_size: str | None = None  # e.g. "200KB": sharded with model.safetensors.index.json
    seed: int = 0


# make-model builds the whole model in float32 in memory before it writes it: 2**31 parameters
# is 8 GiB there; above it a typo (`--experts 100000`) ran out of memory after minutes.
MAX_PARAMETERS = 2**31


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of the Mixtral that `spec` describes (embeddings and head untied)."""
    head_dim = spec.hidden // spec.heads
    attention = 2 * spec.hidden * spec.hidden + 2 * spec.hidden * spec.kv_heads * head_dim
    experts = spec.experts * 3 * spec.hidden * spec.intermediate
    per_layer = attention + spec.experts * spec.hidden + experts + 2 * spec.hidden
    return 2 * spec.vocab * spec.hidden + spec.layers * per_layer + spec.hidden


def train_tokenizer(vocab_size: int, texts: list[str]):
    """A byte-level BPE (the family of Mixtral's own) wrapped as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=CHAT_TEMPLATE)


def mixtral_config(spec, tokenizer, max_positions: int, **extra):
    """transformers' MixtralConfig for a spec with the fields of ModelSpec (train-tiny's
    TrainSpec has them too) and the tokenizer's special ids."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, num_local_experts=spec.experts,
        num_experts_per_tok=spec.top_k, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False, **extra)


def make_model(out: str, spec: ModelSpec) -> None:
    """Write the checkpoint into OUT (all-or-nothing: built beside it, renamed at the end)."""
    import torch
    from transformers import MixtralForCausalLM

    # 256 byte symbols + specials must fit, or the tokenizer cannot encode every input
    if spec.vocab < 259 + 16:
        raise ValueError(f"--vocab {spec.vocab} is too small (byte-level BPE needs >= 275)")
    tokenizer = train_tokenizer(spec.vocab, stdlib_docstrings())
    config = mixtral_config(spec, tokenizer, max_positions=4096)
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config).to(getattr(torch, DTYPES[spec.dtype])).eval()

    save_checkpoint(model, tokenizer, out, spec.max_shard_size)


def save_checkpoint(model, tokenizer, out: str, max_shard_size: str | None = None) -> None:
    """`save_pretrained` of model and tokenizer into OUT, all-or-nothing (built beside it,
    renamed at the end)."""
    with staged_dir(out) as staging:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(staging, **kwargs)
        tokenizer.save_pretrained(staging)
        give_files_folder_mode(staging)
