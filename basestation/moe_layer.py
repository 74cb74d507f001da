"""One MoE layer at the base station, plugged in through transformers' experts hook.

The family's own router (the library's code) gives every token's top-k slots; `RemoteExperts`
replaces only the routed experts' computation and reads top to bottom:

    box latency -> select (WLR per box) -> group -> run on agents -> drop/retry -> combine

θ belongs to the request being generated (`MoeRuntime.theta`, set per call by generate).
With memory-budgeted agents, a layer's routing first becomes prefetch hints for the next layer
(basestation/prefetch.py), carried by this layer's requests (a PREFETCH after them to agents
not called) so the agents' loads overlap their compute and the base station's.

Shape legend: T = tokens, K = top-k slots, E = experts, B = boxes (agents + the local fallback),
H = hidden.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from basestation import link_estimator as links
from basestation.channel_model import ChannelScenario, scenario_latency_s
from basestation.dispatch import Dispatcher
from basestation.ledger import LayerFaults, RequestLedger, charge
from basestation.prefetch import HintPlans, PrefetchConfig, RoutePredictor
from basestation.routing import after_failures, combine, group_by_expert
from basestation.selector import SMALL_SELECTION, Selection, select

LOCAL_S_PER_PAIR = 1e-3  # latency the selector assumes for the local fallback, per (token, expert)


class MoeRuntime:
    """What every RemoteExperts of one base station shares: the agents as boxes, the dispatcher,
    the latency source and the request's θ."""

    def __init__(self, dispatcher: Dispatcher, num_experts: int, hidden_size: int,
                 ffn_size: int, latency: str = "measured",
                 scenario: ChannelScenario | None = None, seed: int = 0):
        self.dispatcher = dispatcher
        self.agents = dispatcher.agents
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_size = ffn_size
        self.latency_mode = latency
        self.scenario = scenario or ChannelScenario()
        self.rng = np.random.default_rng(seed)
        self.theta: float | torch.Tensor = 0.0  # the request's θ (see forward)
        # when requests share a batch: token -> request ([T] into ledgers), see charge_to
        self.owners: torch.Tensor | None = None
        self.ledgers: list[RequestLedger] | None = None
        # on_selection(layer, box_of_expert [E], experts [T, K], keep [T, K]): what each token
        # kept, for a model of the latency beside the measured one (testbed's emulation)
        self.on_selection = None
        self.stats = dispatcher.stats  # one set of counters for the layer and the dispatcher
        self._boxes: tuple[torch.Tensor, torch.Tensor | None] | None = None
        dispatcher.on_liveness_change = self.liveness_changed
        dispatcher.prober.on_liveness_change = self.liveness_changed
        # memory-budgeted agents (info has memory_budget) get prefetch hints (set_prefetch; on
        # when there are any); the dispatcher keeps their replies' cache figures (AgentLink.cache)
        self.predictor = RoutePredictor(num_experts)
        self.prefetch_config = PrefetchConfig()
        self.prefetching = False
        self.hints_sent = 0
        self._hint_owner: dict[int, int] = {}  # expert -> index of its budgeted agent
        self._plans = HintPlans(self.predictor, self._hint_owner, self.prefetch_config)
        if self.budgeted_agents():
            self.set_prefetch(True)

    def charge_to(self, ledgers: list[RequestLedger] | None,
                  owners: torch.Tensor | None = None) -> None:
        """Charge the next forward passes' calls, drops and failures to these requests' ledgers:
        token t to ledgers[owners[t]] (owners None: every token to ledgers[0]); None stops."""
        self.ledgers, self.owners = ledgers, owners

    def new_ledger(self) -> RequestLedger:
        return RequestLedger(boxes=len(self.agents) + 1)

    def liveness_changed(self) -> None:
        self._boxes = None

    def budgeted_agents(self) -> list:
        """The memory-budgeted agents that take prefetch hints: their info's memory_budget
        "prefetch" is false while their loads cost no waiting on storage (edge_agent/shards.py
        HINT_LOAD_RATIO; absent, from agents before it: true)."""
        return [a for a in self.agents if isinstance(a.info.get("memory_budget"), dict)
                and a.info["memory_budget"].get("prefetch", True) is not False]

    def set_prefetch(self, on: bool, predictor: RoutePredictor | None = None,
                     config: PrefetchConfig | None = None) -> bool:
        """Prefetch hints to the memory-budgeted agents on or off (agents without a budget never
        get one). `predictor`: a table seeded from a calibration run (default: the one learned
        so far); `config`: how sure a hint must be. Returns whether hints are on."""
        budgeted = {id(a) for a in self.budgeted_agents()}
        self.predictor = predictor or self.predictor
        self.prefetch_config = config or self.prefetch_config
        self._hint_owner = {expert: i for i, a in enumerate(self.agents) if id(a) in budgeted
                            for expert in a.experts if self.dispatcher.owner.get(expert) is a}
        self._plans = HintPlans(self.predictor, self._hint_owner, self.prefetch_config)
        self.prefetching = bool(on and self._hint_owner)
        if not self.prefetching:
            self.dispatcher.hints = {}
        return self.prefetching

    def agent_figures(self) -> list[dict]:
        """Every agent's AgentLink.figures() (with cache_* figures for budgeted agents)."""
        return [agent.figures() for agent in self.agents]

    def _send_hints(self, layer: int, experts: torch.Tensor) -> None:
        """This layer's routing -> hints for the next layer's likely experts (prefetch.py), for
        the dispatcher to send with this layer's requests."""
        hints = {}
        for index, fields in self._plans.plan(layer, experts.numpy(force=True)).items():
            agent = self.agents[index]
            if agent.alive:
                hints[id(agent)] = (agent, fields)
        # the dispatcher's run of this layer carries them: in the EXPERT request of an agent it
        # calls (no message of their own), else as a PREFETCH after the requests
        self.dispatcher.hints = hints
        self.hints_sent += len(hints)

    def boxes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """box_of_expert [E] (agent index, or len(agents) for the local fallback) and the
        available mask [E] (None when every expert is served). Rebuilt only when an agent dies
        or comes back."""
        if self._boxes is None:
            local = len(self.agents)
            index = {id(agent): b for b, agent in enumerate(self.agents)}
            box, ok = [], []
            for expert in range(self.num_experts):
                agent = self.dispatcher.owner.get(expert)
                if agent is not None and agent.alive:
                    box.append(index[id(agent)])
                    ok.append(True)
                else:
                    box.append(local)
                    ok.append(self.dispatcher.has_fallback(expert))
            mask = torch.tensor(ok)
            self._boxes = (torch.tensor(box), None if bool(mask.all()) else mask)
        return self._boxes

    def box_latency_s(self, box_of_expert: torch.Tensor, experts: torch.Tensor
                      ) -> torch.Tensor | list[float]:
        """[B] expected seconds for each box to return this layer's request, if every top-k
        slot were kept (what the selector weighs a box by); a list of floats for selections
        of at most SMALL_SELECTION slots on the CPU (decode)."""
        num_boxes = len(self.agents) + 1
        few = experts.numel() <= SMALL_SELECTION and experts.device.type == "cpu"
        if few:  # decode: count on Python ints, and hand the selector a list (no tensor ops)
            pairs, box_of = [0] * num_boxes, box_of_expert.tolist()
            for expert in experts.view(-1).tolist():
                pairs[box_of[expert]] += 1
        else:
            pairs = torch.bincount(box_of_expert[experts.reshape(-1)],
                                   minlength=num_boxes).tolist()
        if self.latency_mode == "model":
            modeled = scenario_latency_s(
                self.scenario, self.hidden_size, self.ffn_size, tokens=experts.shape[0],
                bytes_per_element=self.dispatcher.element_bytes, rng=self.rng)
            # the paper's device q hosts expert q; a box hosting several is its first one's
            t = [float(modeled[agent.experts[0] % len(modeled)]) for agent in self.agents]
        else:
            t = []
            for agent, n in zip(self.agents, pairs):
                nbytes = self.dispatcher.request_bytes(max(n, 1))
                t.append(links.expected_time_s(agent.state, nbytes, nbytes, max(n, 1), 1))
        t.append(max(pairs[-1], 1) * LOCAL_S_PER_PAIR)
        if few:
            return t  # select() takes a list for selections this small
        return torch.tensor(t, dtype=torch.float64)

    def forward(self, layer: int, x: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; the router's experts [T, K] and weights [T, K] -> the experts' weighted
        sum [T, H]."""
        if self.prefetching:  # first: the agents load while they compute this layer
            self._send_hints(layer, experts)
        box_of_expert, available = self.boxes()
        theta = self.theta  # a number, or [T] when requests with their own θ share a batch
        dropping = bool((theta > 0).any()) if isinstance(theta, torch.Tensor) else theta > 0
        t = self.box_latency_s(box_of_expert, experts) if dropping else None
        selection = select(experts, weights, box_of_expert, t, theta if dropping else 0.0,
                           available)
        if dropping or available is not None:  # else nothing is dropped: skip the torch ops
            self._count_drops(selection, available)
        if self.on_selection is not None:
            self.on_selection(layer, box_of_expert, experts, selection.keep)
        outputs, failed = self.dispatcher.run(layer, x, group_by_expert(experts, selection.keep))
        faults = None  # stays None on the path with no fault: no accounting beyond the calls
        if failed:
            selection, outputs, faults = self._after_failures(layer, x, selection, weights,
                                                              failed, outputs, box_of_expert)
        if self.ledgers is not None:
            if available is not None:
                faults = with_unheld(faults, experts, available)
            self._charge(experts, box_of_expert, selection, faults, failed)
        # probes go out after the layer's gather, while the base station computes: sent before
        # its requests, a probe would make an agent this layer needs compute it first
        self.dispatcher.prober.tick(time.perf_counter())
        return combine(x.shape[0], x.shape[1], x.dtype, selection.weights, outputs)

    def _charge(self, experts: torch.Tensor, box_of_expert: torch.Tensor, final: Selection,
                faults: LayerFaults | None, failed: set[int]) -> None:
        owners = self.owners if self.owners is not None else \
            torch.zeros(experts.shape[0], dtype=torch.long)
        box_now = self.boxes()[0] if failed else box_of_expert
        # no-ops on the CPU; on a GPU the slots' tensors live there
        box_of_expert, box_now = box_of_expert.to(experts.device), box_now.to(experts.device)
        done_box = box_now[final.experts]
        charge(self.ledgers, owners, box_of_expert[experts], done_box, final.keep, faults)

    def _count_drops(self, selection: Selection, available: torch.Tensor | None) -> None:
        if selection.experts.numel() <= SMALL_SELECTION:  # decode: two lists, no indexing
            dropped = [e for e, d in zip(selection.experts.view(-1).tolist(),
                                         selection.dropped.view(-1).tolist()) if d]
        else:
            dropped = selection.experts[selection.dropped].tolist()
        self.stats.experts_dropped += len(dropped)
        if available is not None:  # no live holder: lost to a fault (earlier), not θ's choice
            held = available.tolist()
            self.stats.fault_drops += sum(1 for expert in dropped if not held[expert])
        for expert in dropped:
            agent = self.dispatcher.owner.get(expert)
            if agent is not None:
                agent.drops += 1

    def _after_failures(self, layer: int, x: torch.Tensor, selection: Selection,
                        router_weights: torch.Tensor, failed: set[int], outputs: list,
                        box_of_expert: torch.Tensor) -> tuple[Selection, list, LayerFaults]:
        """Drop the failed slots, retry orphaned tokens once (routing.after_failures), and say
        what was lost: a slot sent (first, or as a retry) whose request failed."""
        device = selection.experts.device
        failed_ids = torch.tensor(sorted(failed), device=device)
        failed_slots = selection.keep & torch.isin(selection.experts, failed_ids)
        # the box whose request carried each failed slot (boxes() is rebuilt below)
        failed_box = torch.where(failed_slots, box_of_expert.to(device)[selection.experts], -1)
        n_failed = int(failed_slots.sum())
        box_now, available = self.boxes()  # rebuilt: the failed agents are dead now
        usable = ~torch.isin(selection.experts, failed_ids)
        if available is not None:
            usable &= available.to(device)[selection.experts]
        selection, retry = after_failures(selection, router_weights, failed_slots, usable)
        lost, n_retried, n_lost_again = failed_slots, int(retry.sum()), 0
        if n_retried:
            retried, failed_again = self.dispatcher.run(
                layer, x, group_by_expert(selection.experts, retry))
            outputs += retried
            if failed_again:
                lost_again = retry & torch.isin(selection.experts, torch.tensor(
                    sorted(failed_again), device=device))
                selection, _ = after_failures(selection, router_weights, lost_again,
                                              torch.zeros_like(lost_again))
                failed_box = torch.where(lost_again, box_now.to(device)[selection.experts],
                                         failed_box)
                lost, n_lost_again = lost | lost_again, int(lost_again.sum())
        self.stats.retries += n_retried
        self.stats.fault_drops += n_failed + n_lost_again
        # a retried slot was counted dropped by the selector; one that now computed is not
        self.stats.experts_dropped += n_failed - (n_retried - n_lost_again)
        self.stats.residual_only += int((~selection.keep.any(dim=-1)).sum())
        return selection, outputs, LayerFaults(lost, retry, failed_box)


def with_unheld(faults: LayerFaults | None, experts: torch.Tensor, available: torch.Tensor
                ) -> LayerFaults:
    """`faults` plus the slots whose expert had no live holder this call (its agent down with
    no local fallback): an earlier fault loses them, even though nothing was sent.
    experts [T, K]; available [E]."""
    unheld = ~available.to(experts.device)[experts]
    if faults is None:
        return LayerFaults(unheld, torch.zeros_like(unheld), torch.full_like(experts, -1))
    return faults._replace(lost=faults.lost | unheld)


def remote_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts implementation registered with transformers (`ExpertsInterface`): the
    library calls it in place of `…Experts.forward` with the family's own routing."""
    return self.wdmoe_runtime.forward(self.wdmoe_layer, hidden_states, top_k_index,
                                      top_k_weights)

