"""One MoE layer at the base station, plugged in through transformers' experts hook.

The family's own router (the library's code) gives every token's top-k slots;
`remote_experts_forward` replaces only the routed experts' computation with
`MoeRuntime.forward`, which reads top to bottom:

    box latency -> select (WLR per box) -> group -> run on agents -> drop/retry -> combine

What the base station knows about its agents is the agent table's (agents.py); what belongs to
the requests of one forward pass (θ, their ledgers, which token is whose) arrives with the pass
as a `BatchPlan`, set by `with runtime.batch(...)` around the model call (transformers calls
our hook itself: its forward takes no arguments of ours).
With memory-budgeted agents, a layer's routing first becomes prefetch hints for the next layer
(basestation/prefetch.py), carried by this layer's requests (a PREFETCH after them to agents
not called) so the agents' loads overlap their compute and the base station's.

Shape legend: T = tokens, K = top-k slots, E = experts, B = boxes (agents + the local fallback),
H = hidden.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from basestation import link_estimator as links
from basestation.agents import AgentTable, Boxes, MoeStats
from basestation.channel_model import ChannelScenario, scenario_latency_s
from basestation.combine import after_failures, combine
from basestation.dispatch import Dispatcher
from basestation.ledger import LayerFaults, RequestLedger, charge
from basestation.liveness import AgentLink, Prober
from basestation.prefetch import HintPlans, PrefetchConfig, RoutePredictor
from basestation.replicas import cut
from basestation.routing import group_by_expert
from basestation.selector import SMALL_SELECTION, Selection, select

LOCAL_S_PER_PAIR = 1e-3  # latency the selector assumes for the local fallback, per (token, expert)


@dataclass(frozen=True)
class BatchPlan:
    """What the tokens of one forward pass carry into every MoE layer.

    theta: the requests' θ, one number, or [T] when requests with their own θ share a batch.
    ledgers: the requests' ledgers, charged with each token's calls, drops and faults; None:
        nothing is charged.
    owners: [T] long, token -> index into `ledgers`; None: every token is ledgers[0]'s.
    """

    theta: float | torch.Tensor = 0.0
    ledgers: tuple[RequestLedger, ...] | None = None
    owners: torch.Tensor | None = None
    dropping: bool = field(init=False)  # some token's θ > 0: the selector weighs latency

    def __post_init__(self):
        theta = self.theta
        dropping = bool((theta > 0).any()) if isinstance(theta, torch.Tensor) else theta > 0
        object.__setattr__(self, "dropping", dropping)


NO_PLAN = BatchPlan()  # outside any batch: θ = 0, nothing charged


class MoeRuntime:
    """What every MoE layer of one base station shares: the agent table, the dispatcher, the
    prober, the latency source and the forward pass's BatchPlan."""

    def __init__(self, table: AgentTable, dispatcher: Dispatcher, prober: Prober,
                 ffn_size: int, latency: str = "measured",
                 scenario: ChannelScenario | None = None, seed: int = 0):
        self.table = table
        self.dispatcher = dispatcher
        self.prober = prober
        self.ffn_size = ffn_size
        self.latency_mode = latency
        self.scenario = scenario or ChannelScenario()
        self.rng = np.random.default_rng(seed)
        self._plan = NO_PLAN
        # on_selection(layer, box_of_expert [E], experts [T, K], keep [T, K]): what each token
        # kept, for a model of the latency beside the measured one (testbed's emulation)
        self.on_selection = None
        # before_dispatch(layer, box_of_expert, experts, keep): called after selection, before
        # the layer's requests leave (the testbed's shared cell takes its allocation here)
        self.before_dispatch = None
        # on_computed(layer, experts [T, K], final experts [T, K], computed [T, K]): after the
        # replies and any retry, which slots were computed in the end (the live dashboard)
        self.on_computed = None
        # box_latency_override(layer, boxes, experts, weights, theta) -> [B] latencies for the
        # selector in place of box_latency_s (the testbed's joint cell: WLR on its allocation)
        self.box_latency_override = None
        # popularity: a basestation.popularity.Popularity counting every layer's router slots
        # (serve/generate --popularity-out, the planner's --text), else None
        self.popularity = None
        # memory-budgeted agents (info has memory_budget) get prefetch hints (set_prefetch; on
        # when there are any); the table keeps their replies' cache figures (AgentLink.cache)
        self.predictor = RoutePredictor(table.num_experts)
        self.prefetch_config = PrefetchConfig()
        self.prefetching = False
        self.hints_sent = 0
        self._plans = HintPlans(self.predictor, {}, self.prefetch_config)
        if self.budgeted_agents():
            self.set_prefetch(True)

    @property
    def agents(self) -> list[AgentLink]:
        return self.table.agents

    @property
    def stats(self) -> MoeStats:
        return self.table.stats

    @contextlib.contextmanager
    def batch(self, theta: float | torch.Tensor = 0.0,
              ledgers: list[RequestLedger] | None = None, owners: torch.Tensor | None = None):
        """The forward passes inside run at `theta` and charge token t to ledgers[owners[t]]
        (owners None: every token to ledgers[0]; ledgers None: no one). The one way to give
        the MoE layers θ and ledgers; the plan before it is back on exit."""
        previous = self._plan
        self._plan = BatchPlan(theta, tuple(ledgers) if ledgers is not None else None, owners)
        try:
            yield self._plan
        finally:
            self._plan = previous

    def new_ledger(self) -> RequestLedger:
        return self.table.new_ledger()

    def budgeted_agents(self) -> list[AgentLink]:
        return self.table.budgeted_agents()

    def set_prefetch(self, on: bool, predictor: RoutePredictor | None = None,
                     config: PrefetchConfig | None = None) -> bool:
        """Prefetch hints to the memory-budgeted agents on or off (agents without a budget never
        get one). `predictor`: a table seeded from a calibration run (default: the one learned
        so far); `config`: how sure a hint must be. Returns whether hints are on."""
        budgeted = {id(a) for a in self.budgeted_agents()}
        self.predictor = predictor or self.predictor
        self.prefetch_config = config or self.prefetch_config
        holder = self.table.holder
        hint_owner = {expert: i for i, a in enumerate(self.agents) if id(a) in budgeted
                      for expert in a.experts if holder.get(expert) is a}
        self._plans = HintPlans(self.predictor, hint_owner, self.prefetch_config)
        self.prefetching = bool(on and hint_owner)
        return self.prefetching

    def agent_figures(self) -> list[dict]:
        """Every agent's AgentLink.figures() (with cache_* figures for budgeted agents)."""
        return self.table.figures()

    def forward(self, layer: int, x: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; the router's experts [T, K] and weights [T, K] -> the experts' weighted
        sum [T, H]."""
        plan, boxes = self._plan, self.table.boxes()
        # decode-sized routing on the CPU is read as Python lists once, for the selector, the
        # grouping and the drop count (each would otherwise convert the tensor again)
        rows = experts.tolist() if experts.numel() <= SMALL_SELECTION and experts.is_cpu \
            else None
        hints = self._hints(layer, experts) if self.prefetching else None
        if self.popularity is not None:
            self.popularity.add(layer, experts, rows)
        route = None
        if self.table.replicated:  # replicas: which one takes each expert's tokens, now
            route = self.table.route(_demand(experts, rows))
            if route is not None:
                boxes = boxes._replace(box_of_expert=route.box_of_expert,
                                       box_list=route.box_list)
        t = None
        if plan.dropping:  # an override (the testbed's joint cell) selects on its own model
            t = self.box_latency_s(boxes, experts, rows) if self.box_latency_override is None \
                else self.box_latency_override(layer, boxes, experts, weights, plan.theta)
        selection = select(experts, weights, boxes.box_of_expert, t,
                           plan.theta if plan.dropping else 0.0, boxes.available, rows)
        if plan.dropping or boxes.available is not None:  # else nothing was dropped
            self._count_drops(selection, boxes, rows)
        if self.on_selection is not None:
            self.on_selection(layer, boxes.box_of_expert, experts, selection.keep)
        if self.before_dispatch is not None:
            self.before_dispatch(layer, boxes.box_of_expert, experts, selection.keep)
        groups = group_by_expert(experts, selection.keep, rows)
        outputs, failed, probe_replies = self.dispatcher.run(layer, x, groups, hints) \
            if route is None else self.dispatcher.run(layer, x, groups, hints, route.parts)
        faults, boxes_now = None, boxes  # no fault: no accounting beyond the calls
        if failed:
            selection, outputs, faults, boxes_now = self._after_failures(
                layer, x, selection, weights, failed, outputs, boxes, probe_replies)
        if self.on_computed is not None:
            self.on_computed(layer, experts, selection.experts, selection.keep)
        out = combine(x.shape[0], x.shape[1], x.dtype, selection.weights, outputs)
        self.prober.after_layer(probe_replies, time.perf_counter())
        if plan.ledgers is not None:
            split = None  # a replicated expert's tokens over several boxes: each slot's own
            if route is not None and any(len(p) > 1 for p in route.parts.values()):
                split = self._split_boxes(route, groups,
                                          boxes.box_of_expert.to(experts.device)[experts])
            self._charge(plan, experts, boxes, boxes_now, selection, faults, split)
        return out

    def _hints(self, layer: int, experts: torch.Tensor) -> dict[int, tuple[AgentLink, dict]]:
        """This layer's routing -> hints for the next layer's likely experts (prefetch.py), for
        the dispatcher to send with this layer's requests: id(agent) -> (agent, fields)."""
        hints = {}
        for index, fields in self._plans.plan(layer, experts.numpy(force=True)).items():
            agent = self.agents[index]
            if agent.alive:
                hints[id(agent)] = (agent, fields)
        self.hints_sent += len(hints)
        return hints

    def box_latency_s(self, boxes: Boxes, experts: torch.Tensor,
                      rows_experts: list[list[int]] | None = None
                      ) -> torch.Tensor | list[float]:
        """[B] expected seconds for each box to return this layer's request, if every top-k
        slot were kept (what the selector weighs a box by); a list of floats for selections
        of at most SMALL_SELECTION slots on the CPU (decode). rows_experts: experts.tolist(),
        when the caller has it."""
        table = self.table
        num_boxes = len(table.agents) + 1
        few = experts.numel() <= SMALL_SELECTION and experts.device.type == "cpu"
        if few:  # decode: count on Python ints, and hand the selector a list (no tensor ops)
            pairs, box_of = [0] * num_boxes, boxes.box_list
            for row in rows_experts if rows_experts is not None else experts.tolist():
                for expert in row:
                    pairs[box_of[expert]] += 1
        else:
            pairs = torch.bincount(boxes.box_of_expert.to(experts.device)[experts.reshape(-1)],
                                   minlength=num_boxes).tolist()
        if self.latency_mode == "model":
            modeled = scenario_latency_s(
                self.scenario, table.hidden_size, self.ffn_size, tokens=experts.shape[0],
                bytes_per_element=table.element_bytes, rng=self.rng)
            # the paper's device q hosts expert q; a box hosting several is its first one's
            t = [float(modeled[agent.experts[0] % len(modeled)]) for agent in table.agents]
        else:
            t, one_bytes = [], table.request_bytes(1)  # decode: every box's n is 0 or 1
            expected_time_s = links.expected_time_s  # one lookup, not one per agent
            for agent, n in zip(table.agents, pairs):
                if n <= 1:
                    t.append(expected_time_s(agent.state, one_bytes, one_bytes, 1, 1))
                else:
                    nbytes = table.request_bytes(n)
                    t.append(expected_time_s(agent.state, nbytes, nbytes, n, 1))
        t.append(max(pairs[-1], 1) * LOCAL_S_PER_PAIR)
        if few:
            return t  # select() takes a list for selections this small
        return torch.tensor(t, dtype=torch.float64)

    def _count_drops(self, selection: Selection, boxes: Boxes,
                     rows_experts: list[list[int]] | None = None) -> None:
        """rows_experts: selection.experts.tolist(), when the caller has it."""
        if rows_experts is not None:  # decode: lists, no indexing
            dropped = [e for row_e, row_d in zip(rows_experts, selection.dropped.tolist())
                       for e, d in zip(row_e, row_d) if d]
        elif selection.experts.numel() <= SMALL_SELECTION:
            dropped = [e for e, d in zip(selection.experts.view(-1).tolist(),
                                         selection.dropped.view(-1).tolist()) if d]
        else:
            dropped = selection.experts[selection.dropped].tolist()
        self.table.count_drops(dropped, boxes.held, boxes.box_list)

    def _split_boxes(self, route, groups, slot_box: torch.Tensor) -> torch.Tensor:
        """[T, K] the box each slot was sent to, where a route cut an expert's group over its
        replicas (as Dispatcher._send_routed cuts it); slot_box: each slot's expert's box."""
        slot_box = slot_box.clone()
        box_of_agent = self.table.box_of_agent
        for expert, shares in route.parts.items():
            if expert in groups:
                token_idx, slot = groups[expert]
                for agent, begin, end in cut(int(token_idx.shape[0]), shares):
                    slot_box[token_idx[begin:end], slot[begin:end]] = box_of_agent[id(agent)]
        return slot_box

    def _charge(self, plan: BatchPlan, experts: torch.Tensor, boxes: Boxes, boxes_now: Boxes,
                final: Selection, faults: LayerFaults | None,
                split: torch.Tensor | None = None) -> None:
        """Charge this call to the plan's ledgers; boxes_now: the boxes after any failure;
        split: [T, K] each slot's box where a route cut groups over replicas."""
        down_boxes = ()
        if boxes.available is not None:
            faults = with_unheld(faults, experts, boxes.available)
            down_boxes = tuple(b for b, agent in enumerate(self.table.agents) if not agent.alive)
        owners = plan.owners if plan.owners is not None else \
            torch.zeros(experts.shape[0], dtype=torch.long)
        # no-ops on the CPU; on a GPU the slots' tensors live there
        box_of_expert = boxes.box_of_expert.to(experts.device)
        box_now = boxes_now.box_of_expert.to(experts.device)
        slot_box, final_box = box_of_expert[experts], box_now[final.experts]
        if split is not None:
            slot_box = split.to(experts.device)
            if boxes_now is boxes:
                final_box = slot_box
        charge(plan.ledgers, owners, slot_box, final_box, final.keep, faults, down_boxes)

    def _after_failures(self, layer: int, x: torch.Tensor, selection: Selection,
                        router_weights: torch.Tensor, failed: set[int], outputs: list,
                        boxes: Boxes, probe_replies: list
                        ) -> tuple[Selection, list, LayerFaults, Boxes]:
        """Drop the failed slots, retry orphaned tokens once (combine.after_failures), and say
        what was lost: a slot sent (first, or as a retry) whose request failed. Also returns
        the boxes table with the failed agents dead (built once, here); the retry's probe
        replies join `probe_replies`."""
        device = selection.experts.device
        failed_ids = torch.tensor(sorted(failed), device=device)
        failed_slots = selection.keep & torch.isin(selection.experts, failed_ids)
        # the box whose request carried each failed slot
        failed_box = torch.where(failed_slots, boxes.box_of_expert.to(device)[selection.experts],
                                 -1)
        n_failed = int(failed_slots.sum())
        boxes_now = self.table.boxes()  # the failed agents are dead now
        usable = ~torch.isin(selection.experts, failed_ids)
        if boxes_now.available is not None:
            usable &= boxes_now.available.to(device)[selection.experts]
        selection, retry = after_failures(selection, router_weights, failed_slots, usable)
        lost, n_retried, n_lost_again = failed_slots, int(retry.sum()), 0
        if n_retried:
            retried, failed_again, more_probe_replies = self.dispatcher.run(
                layer, x, group_by_expert(selection.experts, retry))
            outputs += retried
            probe_replies += more_probe_replies
            if failed_again:
                lost_again = retry & torch.isin(selection.experts, torch.tensor(
                    sorted(failed_again), device=device))
                selection, _ = after_failures(selection, router_weights, lost_again,
                                              torch.zeros_like(lost_again))
                failed_box = torch.where(
                    lost_again, boxes_now.box_of_expert.to(device)[selection.experts],
                    failed_box)
                lost, n_lost_again = lost | lost_again, int(lost_again.sum())
                boxes_now = self.table.boxes()  # the retry's agents died too
        stats = self.stats
        stats.retries += n_retried
        stats.fault_drops += n_failed + n_lost_again
        # a retried slot was counted dropped by the selector; one that now computed is not
        stats.experts_dropped += n_failed - (n_retried - n_lost_again)
        stats.residual_only += int((~selection.keep.any(dim=-1)).sum())
        return selection, outputs, LayerFaults(lost, retry, failed_box), boxes_now


def _demand(experts: torch.Tensor, rows: list[list[int]] | None) -> dict[int, int]:
    """Expert -> its slots in this layer call (the router's, before any drop)."""
    if rows is not None:
        demand: dict[int, int] = {}
        for row in rows:
            for expert in row:
                demand[expert] = demand.get(expert, 0) + 1
        return demand
    ids, counts = torch.unique(experts.reshape(-1), return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


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
