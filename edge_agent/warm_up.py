"""Before serving: run every expert once (warm-up), and measure this box's expert throughput
(the self-benchmark its info reports)."""

from __future__ import annotations

import time

import torch

from edge_agent.expert_math import expert_forward, flops_per_token
from edge_agent.shards import LoadedExperts

BENCH_TOKENS = 64
BENCH_BUDGET_S = 0.3  # the self-benchmark at start stays short
BENCH_MAX_RUNS = 200
WARM_UP_TOKENS = (1, 16)  # a decode step's shape and a prefill's: different kernels


def self_benchmark(loaded: LoadedExperts) -> dict:
    """Measured expert throughput of this box (tokens/s and FLOP/s of one expert FFN)."""
    weights = loaded.sample_weights()
    x = torch.randn(BENCH_TOKENS, loaded.hidden_size, device=loaded.device, dtype=loaded.dtype)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    expert_forward(x, weights)  # warm-up
    sync()
    runs, start = 0, time.perf_counter()
    while True:
        expert_forward(x, weights)
        runs += 1
        sync()
        elapsed_s = time.perf_counter() - start
        if elapsed_s >= BENCH_BUDGET_S or runs >= BENCH_MAX_RUNS:
            break
    tokens_per_s = runs * BENCH_TOKENS / elapsed_s
    return {"tokens_per_s": tokens_per_s, "batch_tokens": BENCH_TOKENS,
            "flop_per_s": tokens_per_s * flops_per_token(loaded.hidden_size, loaded.ffn_size)}


def warm_up(loaded: LoadedExperts) -> float:
    """Run every expert this box serves once, at every layer, at both shapes, before serving:
    the first call of a cold process (allocator, thread pool, CUDA kernels and their
    autotuning) is many times slower than the next, and it would be some user's token. A
    memory-budgeted box warms only what is resident (warming the rest would load it all).
    Returns the seconds it took."""
    start = time.perf_counter()
    if loaded.store is not None:
        units = [loaded.sample_weights()] if loaded.store.resident else []
    else:
        units = [w for layers in loaded.weights.values() for w in layers.values()]
    with torch.inference_mode():
        for tokens in WARM_UP_TOKENS:
            x = torch.zeros(tokens, loaded.hidden_size, device=loaded.device, dtype=loaded.dtype)
            for weights in units:
                expert_forward(x, weights)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    return time.perf_counter() - start
