"""µs per EXPERT_REPLY on the base station's side: the header dict reads the dispatcher makes
(compute_s, cache, reply.tensor()) against the typed message (wire/messages.py ExpertReply,
`reply.message`, decoded once). Both start from an unpacked header, as `AgentClient.recv`
hands it over, and build a fresh Reply each time, so the typed one pays its decode.

    .venv/bin/python bench/reply_decode.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import zmq

from wire import messages as M
from wire import protocol as P
from wire.client import Reply

CASES = (("float32", 1, 2048), ("bfloat16", 1, 2048), ("bfloat16", 16, 4096),
         ("int8", 1, 2048))


def reply_frames(dtype: str, tokens: int, hidden: int, cache: bool) -> tuple[dict, list]:
    frames, fields = P.encode_tensor(torch.randn(tokens, hidden), dtype)
    if cache:
        fields["cache"] = [3, 1, 2500, 9, 5, 4096, 2]
    header = P.unpack(P.pack(P.EXPERT_REPLY, 1 << 60, layer=3, experts=[[5, tokens]],
                             compute_s=0.00123, **fields))
    return header, [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]


def dict_reads(header: dict, frames: list):
    reply = Reply(b"agent", header, frames)
    compute_s = reply.header.get("compute_s")
    cache = P.cache_figures(reply.header["cache"]) if "cache" in reply.header else None
    return reply.tensor(), compute_s, cache


def typed(header: dict, frames: list):
    message = Reply(b"agent", header, frames).message
    return message.tensor, message.compute_s, message.cache


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="alternations of the two paths")
    p.add_argument("--calls", type=int, default=500, help="calls per path per round")
    args = p.parse_args(argv)
    # the two paths alternate, and the 10th percentile of the rounds is kept: on a shared
    # machine the load drifts, and it must drift over both alike
    print(f"{'dtype':>9} {'tokens':>6} {'hidden':>6} {'cache':>5} {'dict_us':>8} {'typed_us':>8}")
    with torch.inference_mode():  # as the base station decodes
        for dtype, tokens, hidden in CASES:
            for cache in (False, True):
                header, frames = reply_frames(dtype, tokens, hidden, cache)
                assert isinstance(M.decode(header, frames), M.ExpertReply)
                rounds: dict[str, list[float]] = {"dict": [], "typed": []}
                for _ in range(args.rounds):
                    for name, fn in (("dict", dict_reads), ("typed", typed)):
                        start_ns = time.perf_counter_ns()
                        for _ in range(args.calls):
                            fn(header, frames)
                        rounds[name].append((time.perf_counter_ns() - start_ns) / args.calls / 1e3)
                us = {name: statistics.quantiles(r, n=10)[0] for name, r in rounds.items()}
                print(f"{dtype:>9} {tokens:>6} {hidden:>6} {str(cache):>5} {us['dict']:>8.2f} "
                      f"{us['typed']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
