"""The base station's side of the cell's `joint` policy (issue 23): a `MoeRuntime.before_dispatch`
hook that, after selection and before the layer's bytes leave, splits the cell's bandwidth among
the boxes this layer calls so that they finish together (basestation.bandwidth.allocate), and
tells the cell (testbed.links.cell.AllocationSender: one UDP datagram).

A box's demand is what the cell will charge it: our request and reply bytes at the cell's rate,
which is the Shannon rate of its share divided by the slowdown, so bits x slowdown at the plain
Shannon rate; its fixed part is the agent's paced compute for its tokens plus the link's delay
each way. θ = 0 still calls every selected expert: the allocation only changes time.
"""

from __future__ import annotations

import itertools

from basestation.bandwidth import BoxDemand, ShannonRate, allocate
from testbed.links.cell import AllocationSender


def box_demand(pairs: int, request_bytes: int, slowdown: float, pace_us: tuple[float, float],
               delay_ms: float, snr_down_hz: float, snr_up_hz: float) -> BoxDemand:
    """One box's demand for a layer request of PAIRS tokens (pure): the agent paces a call to
    max(per call, tokens x per token) µs (scenarios.agent_pacing_us)."""
    per_call_us, per_token_us = pace_us
    compute_s = max(per_call_us, pairs * per_token_us) / 1e6
    bits = 8.0 * request_bytes * slowdown
    return BoxDemand(compute_s + 2 * delay_ms / 1e3, bits, bits, ShannonRate(snr_down_hz),
                     ShannonRate(snr_up_hz))


class JointAllocator:
    """before_dispatch(layer, box_of_expert [E], experts [T, K], keep [T, K]); does nothing
    unless `active` (the cell runs `joint`). link_of_box[b]: the cell's link of the session's
    box b (None: the local fallback, not on the cell)."""

    def __init__(self, bed, link_of_box: list[int | None], request_bytes, pace_us: dict):
        self.bed = bed  # cell_bed.CellBed: its current settings (snr, slowdown, B)
        self.link_of_box = link_of_box
        self.request_bytes = request_bytes  # tokens -> our bytes each way (AgentTable's)
        self.pace_us = pace_us  # agent -> (per call, per token) µs
        self.active = False
        self.sender: AllocationSender | None = None  # opened on the first allocation
        self.seq = itertools.count()
        self.sent = 0
        self.share_sums: dict[int, float] = {}  # link -> sum of shares sent (for the record)
        self.share_counts: dict[int, int] = {}
        # (settings, called links' slots) -> shares: decode layers call a few of the same
        # pairs of boxes over and over, and the solve (~0.1 ms) is on every layer's path
        self._memo: dict = {}
        self._memo_settings: dict | None = None

    def reset_counts(self) -> None:
        self.share_sums, self.share_counts = {}, {}

    def shares(self, pairs: dict[int, int]) -> dict[int, float]:
        """The min-max shares of the called links (link -> kept slots), at the cell's current
        settings."""
        settings = self.bed.current
        if settings is not self._memo_settings:  # a new epoch or policy: new channels
            self._memo, self._memo_settings = {}, settings
        key = tuple(sorted(pairs.items()))
        if key not in self._memo:
            self._memo[key] = self._solve(settings, pairs)
        return self._memo[key]

    def _solve(self, settings: dict, pairs: dict[int, int]) -> dict[int, float]:
        links = settings["links"]
        demands = {link: box_demand(pairs.get(link, 1), self.request_bytes(pairs.get(link, 1)),
                                    settings["slowdown"], self.pace_us.get(link, (0.0, 0.0)),
                                    spec["delay_ms"], spec["snr_down_hz"], spec["snr_up_hz"])
                   for link, spec in enumerate(links)}
        allocation = allocate(demands, list(pairs), settings["total_bandwidth_hz"])
        return {link: allocation.shares[link] for link in pairs}

    def __call__(self, layer, box_of_expert, experts, keep) -> None:
        if not self.active:
            return
        pairs: dict[int, int] = {}
        box_of = box_of_expert.tolist()  # E ints: cheaper than indexing the tensor per slot
        links = self.link_of_box
        for expert, kept in zip(experts.reshape(-1).tolist(), keep.reshape(-1).tolist()):
            if kept:
                box = box_of[expert]
                link = links[box] if box < len(links) else None
                if link is not None:
                    pairs[link] = pairs.get(link, 0) + 1
        if not pairs:
            return
        shares = self.shares(pairs)
        if self.sender is None:
            self.sender = AllocationSender(self.bed.control)
        self.sender.send(next(self.seq), shares)
        self.sent += 1
        for link, share in shares.items():
            self.share_sums[link] = self.share_sums.get(link, 0.0) + share
            self.share_counts[link] = self.share_counts.get(link, 0) + 1

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    def mean_shares(self) -> dict[str, float]:
        return {str(link): self.share_sums[link] / self.share_counts[link]
                for link in sorted(self.share_sums)}
