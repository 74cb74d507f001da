"""What one generation may ask for: the model's context bounds the prompt and its new tokens,
and --ignore-eos really runs past an end-of-sequence token the model emits."""

from __future__ import annotations

import pytest
from agent_fixtures import start_module_agent, two_agents  # noqa: F401

from basestation.generate import budget_error, context_length, generate

PROMPT = "Return the list of items in the queue."


def test_budget_within_the_context():
    assert budget_error(10, 54, 64) is None
    assert budget_error(10, 55, 64) == ("the prompt (10 tokens) plus --max-new-tokens 55 pass "
                                        "the model's context of 64 tokens")
    assert budget_error(65, 1, 64).startswith("the prompt (65 tokens)")
    assert budget_error(0, 8, 64) == "the prompt is empty (it gives no tokens)"
    assert budget_error(3, 0, 64) == "--max-new-tokens 0: must be at least 1"


def test_context_length_from_the_config_else_the_tokenizer():
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(model_max_length=2048)
    assert context_length(SimpleNamespace(max_position_embeddings=4096), tokenizer) == 4096
    assert context_length(SimpleNamespace(), tokenizer) == 2048


@pytest.mark.integration
def test_ignore_eos_runs_past_an_eos_the_model_emits(two_agents, tiny_split):
    """Regression: with --ignore-eos generation still stopped at the end-of-sequence token
    (seen: 537 of 1,500 tokens), because transformers fills an eos_token_id of None back in
    from the model's generation config. Here the model's EOS is set to a token greedy decoding
    emits at step 5: without --ignore-eos generation stops there, with it it runs on."""
    from basestation.session import build_roster, open_session

    session = open_session(tiny_split, build_roster(two_agents, None, None), wait_s=20,
                           dtype="float32", progress=False)
    config = session.base.model.generation_config
    saved = config.eos_token_id
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        free = generate(session, ids, max_new_tokens=16, ignore_eos=True)
        eos = free.token_ids[4]
        first = free.token_ids.index(eos)
        config.eos_token_id = eos
        stopped = generate(session, ids, max_new_tokens=16)
        ignored = generate(session, ids, max_new_tokens=16, ignore_eos=True)
    finally:
        config.eos_token_id = saved
        session.close()
    assert stopped.token_ids == free.token_ids[:first + 1]  # the model does emit it
    assert ignored.token_ids == free.token_ids and len(ignored.token_ids) == 16
