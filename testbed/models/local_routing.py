"""WLR routing on a local Mixtral, for evaluation: the rule, forced top-1, random experts.

Every MoE layer of a local transformers Mixtral routes like the base station (router top-k, or
K random experts -> `basestation.selector.select` -> `basestation.routing` group -> `basestation.combine`), with
the expert FFNs computed in-process from the layer's own fused weights. No agents, no sockets:
this is how the tiny model's card and tests score quality under a latency vector.
"""

from __future__ import annotations


class LocalMoeBlock:
    """Stand-in for a MixtralSparseMoeBlock's forward that routes like the base station.

    Router top-k (or K random experts) -> basestation.selector.select (theta, latency vector t,
    one expert per box) -> basestation.routing.group_by_expert / combine.combine, expert FFNs computed
    here from the block's own fused weights. theta = 0 reproduces the stock block.
    Shape legend: T = tokens, H = hidden, E = experts, K = top-k.
    """

    def __init__(self, block, top_k: int, theta: float, latency_s, random_experts: bool,
                 seed: int):
        import torch

        self.gate, self.experts, self.top_k = block.gate, block.experts, top_k
        self.theta, self.latency_s, self.random_experts = theta, latency_s, random_experts
        self.generator = torch.Generator().manual_seed(seed)
        num_experts = self.experts.gate_up_proj.shape[0]
        self.load = torch.zeros(num_experts, dtype=torch.long)  # kept (token, slot) pairs
        self.dropped = 0
        self.considered = 0

    def expert_ffn(self, expert: int, x):
        """The agent's own expert math on this block's fused weights (Mixtral's act is SiLU)."""
        from edge_agent.expert_math import ExpertWeights, expert_forward

        return expert_forward(x, ExpertWeights(gate_up=self.experts.gate_up_proj[expert],
                                               down=self.experts.down_proj[expert]))

    def __call__(self, hidden_states):
        import torch
        import torch.nn.functional as F

        from basestation.combine import combine
        from basestation.routing import group_by_expert
        from basestation.selector import select

        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        w = F.softmax(self.gate(x)[0].float(), dim=-1)  # [T, E]
        num_experts = w.shape[1]
        if self.random_experts:
            experts = torch.rand(w.shape, generator=self.generator).topk(self.top_k).indices
        else:
            experts = torch.topk(w, self.top_k, dim=-1).indices  # [T, K], as Mixtral's router
        top_w = w.gather(1, experts)  # [T, K]: the router's weights of the picks
        weights = top_w / top_w.sum(dim=-1, keepdim=True)  # Mixtral's renormalised top-k
        t = self.latency_s if self.latency_s is not None else torch.ones(num_experts)
        # one expert per box: the paper's Algorithm 1
        theta = 0.0 if self.random_experts else self.theta
        selection = select(experts, weights, torch.arange(num_experts), t, theta)
        outputs = [(e, token_idx, slot, self.expert_ffn(e, x[token_idx]))
                   for e, (token_idx, slot) in group_by_expert(experts, selection.keep).items()]
        self.load += torch.bincount(selection.experts[selection.keep], minlength=len(self.load))
        self.dropped += int(selection.dropped.sum())
        self.considered += selection.keep.numel()
        out = combine(x.shape[0], hidden, x.dtype, selection.weights, outputs)  # [T, H]
        return out.reshape(batch, seq, hidden)


class LocalRouting:
    """Context manager: every MoE layer of a local Mixtral routes by LocalMoeBlock.

    theta/latency_s: the WLR rule (latency_s [E] seconds; default all equal, so theta >= 0.5
    is exactly forced top-1); random_experts: K random experts per token instead of the
    router's top-K. `.blocks` holds the per-layer blocks (load, drops) while inside.
    """

    def __init__(self, model, theta: float = 0.0, latency_s=None, random_experts: bool = False,
                 seed: int = 0):
        self.model, self.theta, self.latency_s = model, theta, latency_s
        self.random_experts, self.seed = random_experts, seed
        self.blocks: list[LocalMoeBlock] = []

    def __enter__(self):
        top_k = self.model.config.num_experts_per_tok
        for index, layer in enumerate(self.model.model.layers):
            block = LocalMoeBlock(layer.mlp, top_k, self.theta, self.latency_s,
                                  self.random_experts, self.seed + index)
            layer.mlp.forward = block  # instance attribute shadows the class's forward
            self.blocks.append(block)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.model.model.layers:
            del layer.mlp.forward

    def load_shares(self) -> list[list[float]]:
        """Per layer, each expert's share of the kept (token, slot) assignments."""
        return [(b.load.float() / max(1, int(b.load.sum()))).tolist() for b in self.blocks]

    def drop_share(self) -> float:
        considered = sum(b.considered for b in self.blocks)
        return sum(b.dropped for b in self.blocks) / considered if considered else 0.0

