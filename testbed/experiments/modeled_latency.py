"""The paper's latency model (Eqs. 6-8) run beside the measured system, token by token.

An `on_selection` observer of the MoE layers: for every layer call it takes what each token
kept (after the WLR rule) and adds the paper's latency of that layer for those tokens: each
token waits for the slowest device it kept (Eq. 7), tokens and layers add up (Eq. 8), and a
device's time is Eq. 6 at the emulated model's sizes on this epoch's fading draw, the same draw
the links are shaped with. `reset()` before a generation, then `step_totals_s()` gives one
modeled latency per forward pass, to set beside the measured one.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from basestation.channel_model import EmulatedModel, modeled_latency_s, modeled_token_latency_s
from testbed.scenarios import PaperChannel, paper_rates_bits_per_s

POLICY_MEMO_MAX = 4096  # called sets remembered (all epochs) before starting afresh


class ModeledLatency:
    def __init__(self, paper: PaperChannel, emulated: EmulatedModel, num_agents: int,
                 moe_layers: int, start_s: float | None = None):
        self.paper = paper
        self.emulated = emulated
        self.num_agents = num_agents
        self.moe_layers = moe_layers  # layer calls per forward pass
        self.start_s = time.monotonic() if start_s is None else start_s
        self.layer_s: list[float] = []
        self._epoch = -1
        self._device_s: np.ndarray | None = None
        # a shared cell's policy (static, shared, joint; issue 23): each layer's called boxes
        # get their share of the cell under it; None: the paper's even split, as always
        self.bandwidth: str | None = None
        self._demands_epoch = -1
        self._demands: dict | None = None
        self._policy_memo: dict = {}  # (epoch, policy, called) -> policy_device_s's answer

    def device_latency_s(self, epoch: int) -> np.ndarray:
        """[agents] Eq. 6 for one token at this epoch (agent i is the paper's device i mod Q)."""
        if epoch != self._epoch:
            down, up = paper_rates_bits_per_s(self.paper, epoch)
            flops = np.asarray(self.paper.channel.device_flops, dtype=float)
            per_device = modeled_latency_s(self.emulated.wire_bytes_per_token,
                                           self.emulated.flops_per_token, down, up, flops)
            q = np.arange(self.num_agents) % len(per_device)
            self._device_s, self._epoch = per_device[q], epoch
        return self._device_s

    def __call__(self, layer: int, box_of_expert: torch.Tensor, experts: torch.Tensor,
                 keep: torch.Tensor) -> None:
        epoch = int((time.monotonic() - self.start_s) // self.paper.epoch_s)
        device_s = self.device_latency_s(epoch)
        boxes = box_of_expert[experts].tolist()
        kept = keep.tolist()
        per_token = [{b for b, k in zip(row_boxes, row_keep) if k and b < self.num_agents}
                     for row_boxes, row_keep in zip(boxes, kept)]
        if self.bandwidth is not None:
            device_s = self.policy_device_s(epoch, set().union(*per_token))
        self.layer_s.append(modeled_token_latency_s(device_s, per_token))

    def cell_demands(self, epoch: int) -> dict:
        """Every agent's one-token BoxDemand in the paper's cell at this epoch (Eqs. 2-6 at a
        share of B: Shannon rates from the epoch's draw, the emulated model's bits and
        compute)."""
        if epoch != self._demands_epoch:
            from basestation.bandwidth import BoxDemand, ShannonRate
            from testbed.experiments.cell_bed import paper_snr_hz

            down, up = paper_snr_hz(self.paper, epoch)
            flops = self.paper.channel.device_flops
            bits = 8.0 * self.emulated.wire_bytes_per_token
            q = len(down)
            self._demands = {
                a: BoxDemand(self.emulated.flops_per_token / flops[a % len(flops)], bits, bits,
                             ShannonRate(float(down[a % q])), ShannonRate(float(up[a % q])))
                for a in range(self.num_agents)}
            self._demands_epoch = epoch
        return self._demands

    def policy_device_s(self, epoch: int, called: set[int]) -> np.ndarray:
        """[agents] each called box's time for this layer under self.bandwidth (others 0)."""
        from basestation.bandwidth import allocate, shared_times, static_times

        # the same called set recurs within an epoch: solve it once (this observer's time is
        # counted in the measured step, and joint's solve costs more than the others')
        key = (epoch, self.bandwidth, frozenset(called))
        if key in self._policy_memo:
            return self._policy_memo[key]
        if len(self._policy_memo) > POLICY_MEMO_MAX:
            self._policy_memo.clear()
        rule = {"static": static_times, "shared": shared_times, "joint": allocate}[self.bandwidth]
        out = np.zeros(self.num_agents)
        if called:
            times = rule(self.cell_demands(epoch), sorted(called),
                         self.paper.channel.total_bandwidth_hz).times_s
            for box, time_s in times.items():
                out[box] = time_s
        self._policy_memo[key] = out
        return out

    def step_totals_s(self) -> list[float]:
        """Modeled seconds of each forward pass so far (its MoE layer calls summed)."""
        n = self.moe_layers
        return [sum(self.layer_s[i:i + n]) for i in range(0, len(self.layer_s) - n + 1, n)]

    def reset(self) -> None:
        self.layer_s = []
