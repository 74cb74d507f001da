"""Joint bandwidth allocation for the boxes one MoE layer calls in a shared cell (issue 23): pure.

A cell of total bandwidth B (Hz) is shared by the boxes on it; box q gets the fraction x_q of
each direction's pool (0 < x_q <= 1), and its time for this layer's request is

    t_q(x) = c_q + d_q / r_q^down(x) + u_q / r_q^up(x)                (Eq. 6 at a share of B)

c_q: fixed seconds (compute + fixed delay); d_q, u_q: bits sent down and up; r(x) in bits/s,
per direction, either
    linear:   r(x) = x B eta                  eta in bit/s/Hz (measured: rate / (share B))
    Shannon:  r(x) = x B log2(1 + a / (x B))  a = P g^2 / N0 in Hz (Eqs. 2-3: the noise
                                              power grows with the band the box is given)

`allocate` solves min over x of max_q t_q(x_q) with sum_q x_q = 1 over the called boxes. Each
t_q falls as x_q grows, so at the optimum every called box with bytes finishes at the same T*
(any box done early could hand bandwidth to the last one). Linear: x_q = W_q / (B (T - c_q)),
W_q = d_q / eta_d + u_q / eta_u, and T* is the one root of sum_q W_q / (B (T - c_q)) = 1 above
max c_q, found by Newton (exact to rounding). Shannon: that linear solve with each eta frozen at
x = 1/n, then Newton on the whole system (x_q (T - c_q) = W_q(x_q) / B, sum x_q = 1), O(n) a
step, 3-4 steps. Where it does not settle (SNRs far below 0 dB over the band: t_q hardly
depends on x_q) a bracketed nested Newton answers (~0.5 ms); a nested bisection is the
reference the tests check both against.

`static_times` (x = 1/N for the N boxes of the cell: the paper's even split) and `shared_times`
(x = 1/n for the n called boxes with bytes: a work-conserving scheduler) give the same model's
times for the fixed policies. `select_and_allocate` alternates the WLR selector
(basestation/selector.py) and `allocate` until the selection stops changing. Under the
min-max allocation every called box takes T*, so after round 1 WLR weighs the called boxes by
their weights alone and a dropped box by what calling it back would cost: a box is dropped
for its own cost (fixed part or link), never fed bandwidth to catch up.

Units: seconds, bits, Hz, bits/s; shares are fractions of B. The allocator is plain Python
floats (numpy on scalars costs about a microsecond a call, more than this whole loop's step):
8 boxes take ~25 us (linear) and ~80 us (Shannon) on this machine (bench/bandwidth.py).
torch enters only in `select_and_allocate`, through the selector's tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from basestation.channel_model import shannon_rate_bits_per_s
from basestation.selector import SMALL_SELECTION, Selection, select

LN2 = math.log(2.0)
# Newton stops when a step moves T by less than this fraction of T (double precision's floor)
RELATIVE_TOLERANCE = 1e-13
NEWTON_STEPS_MAX = 60
# a Newton step this small (relative) leaves an error of about its square: the last one needed
NEWTON_LAST_STEP = 1e-7
# the frozen-eta linear solve only starts the Shannon Newton: it is already ~5 % off the root
START_TOLERANCE = 1e-4
BISECTION_STEPS = 200
# WLR selections at most (issue 23: 3-4); random decode layers settle in 2-4, batches in up to 6
ROUNDS_MAX = 4


@dataclass(frozen=True)
class LinearRate:
    """r(x) = x B eta: the rate grows in proportion to the band (fixed spectral efficiency)."""

    efficiency_bits_per_s_per_hz: float  # eta

    @classmethod
    def measured(cls, rate_bits_per_s: float, share: float, total_bandwidth_hz: float
                 ) -> LinearRate:
        """eta from a rate measured while holding `share` of B: eta = rate / (share B)."""
        return cls(rate_bits_per_s / (share * total_bandwidth_hz))


@dataclass(frozen=True)
class ShannonRate:
    """r(x) = x B log2(1 + a / (x B)), Eqs. 2-3 with N0 times the band as the noise."""

    snr_hz: float  # a = P g^2 / N0: the SNR the box would have in a band of 1 Hz, in Hz

    @classmethod
    def from_channel(cls, power_w: float, gain: float, noise_w_per_hz: float) -> ShannonRate:
        """a = P g^2 / N0 (g the amplitude gain, N0 in W/Hz)."""
        return cls(power_w * gain * gain / noise_w_per_hz)


Rate = LinearRate | ShannonRate


@dataclass(frozen=True)
class BoxDemand:
    """What one box's layer request costs: t(x) = fixed_s + down_bits / r_down(x) + up_bits /
    r_up(x)."""

    fixed_s: float  # c_q: compute + fixed delays (RTT, access), not shortened by bandwidth
    down_bits: float  # d_q: the request's bits, base station -> box
    up_bits: float  # u_q: the reply's bits, box -> base station
    down: Rate
    up: Rate

    @property
    def has_bytes(self) -> bool:
        return self.down_bits > 0 or self.up_bits > 0


@dataclass(frozen=True)
class Allocation:
    """Shares of B and the modeled times of one layer's called boxes.

    shares: box id -> fraction of B (both directions) for every box of the cell; 0 for a box
        not called (and one called with no bytes) under `allocate` and `shared_times`.
    times_s: called box id -> t_q at its share (seconds).
    finish_s: when the last called box is done (the layer's time); under `allocate` every
        called box with bytes finishes then.
    """

    shares: dict[int, float]
    times_s: dict[int, float]
    finish_s: float


def rate_bits_per_s(rate: Rate, bandwidth_hz: float) -> float:
    """One direction's rate in a band of `bandwidth_hz` (= x B)."""
    if isinstance(rate, LinearRate):
        return bandwidth_hz * rate.efficiency_bits_per_s_per_hz
    # Eqs. 2-3 with P g^2 / N0 = a: the channel model's own rule (one owner)
    return float(shannon_rate_bits_per_s(bandwidth_hz, rate.snr_hz, 1.0, 1.0))


def box_time_s(demand: BoxDemand, share: float, total_bandwidth_hz: float) -> float:
    """t_q(x) in seconds; a box with no bytes takes fixed_s whatever its share."""
    time_s = demand.fixed_s
    if demand.down_bits > 0:
        time_s += demand.down_bits / rate_bits_per_s(demand.down, share * total_bandwidth_hz)
    if demand.up_bits > 0:
        time_s += demand.up_bits / rate_bits_per_s(demand.up, share * total_bandwidth_hz)
    return time_s


def _check(demands: Mapping[int, BoxDemand], called: Iterable[int] | None,
           total_bandwidth_hz: float) -> list[int]:
    """The called ids (every box of `demands` when None); ValueError on bad input."""
    if not total_bandwidth_hz > 0 or math.isinf(total_bandwidth_hz):
        raise ValueError(f"total bandwidth {total_bandwidth_hz} Hz must be > 0 and finite")
    ids = list(demands) if called is None else list(dict.fromkeys(called))
    for box in ids:
        if box not in demands:
            raise ValueError(f"called box {box} has no demand")
        d = demands[box]
        if not (0 <= d.fixed_s < math.inf and 0 <= d.down_bits < math.inf
                and 0 <= d.up_bits < math.inf):
            raise ValueError(f"box {box}: fixed_s and bits must be finite and >= 0")
        for bits, rate in ((d.down_bits, d.down), (d.up_bits, d.up)):
            value = rate.efficiency_bits_per_s_per_hz if isinstance(rate, LinearRate) \
                else rate.snr_hz
            if bits > 0 and not 0 < value < math.inf:
                raise ValueError(f"box {box}: a rate parameter {value} must be > 0 and finite")
    return ids


def static_times(demands: Mapping[int, BoxDemand], called: Iterable[int] | None,
                 total_bandwidth_hz: float) -> Allocation:
    """The paper's split: each of the N boxes of the cell (`demands`) holds B / N, called or
    not, idle or not."""
    ids = _check(demands, called, total_bandwidth_hz)
    share = 1.0 / len(demands)
    times = {b: box_time_s(demands[b], share, total_bandwidth_hz) for b in ids}
    return Allocation({b: share for b in demands}, times, max(times.values(), default=0.0))


def shared_times(demands: Mapping[int, BoxDemand], called: Iterable[int] | None,
                 total_bandwidth_hz: float) -> Allocation:
    """A work-conserving scheduler: the n called boxes with bytes share B evenly (B / n)."""
    ids = _check(demands, called, total_bandwidth_hz)
    busy = [b for b in ids if demands[b].has_bytes]
    share = 1.0 / len(busy) if busy else 0.0
    shares = dict.fromkeys(demands, 0.0)
    shares.update(dict.fromkeys(busy, share))
    times = {b: box_time_s(demands[b], shares[b], total_bandwidth_hz) for b in ids}
    return Allocation(shares, times, max(times.values(), default=0.0))


# --- the min-max allocation --------------------------------------------------------------------
# A box's direction is (bits / B, kind, p): kind 0 linear (p = eta), 1 Shannon (p = a / B, so
# that r(x) / B = x log2(1 + p / x)); everything below works with B factored out.


def _direction(bits: float, rate: Rate, total_bandwidth_hz: float) -> tuple[float, int, float]:
    """(bits / B, kind, p): bits / (x B eta) = (bits / B) / (x eta), in seconds."""
    if isinstance(rate, LinearRate):
        return bits / total_bandwidth_hz, 0, rate.efficiency_bits_per_s_per_hz
    return bits / total_bandwidth_hz, 1, rate.snr_hz / total_bandwidth_hz


def _time_s(c: float, directions, x: float) -> float:
    """t(x) in seconds: `directions` from `_direction` (bits / B, rates / B)."""
    time_s = c
    for bits, kind, p in directions:
        if bits > 0:
            time_s += bits / (x * (math.log1p(p / x) / LN2 if kind else p))
    return time_s


def _solve_linear(c: list[float], w: list[float], tolerance: float = RELATIVE_TOLERANCE
                  ) -> tuple[float, list[float]]:
    """T and x_q = w_q / (T - c_q) with sum x_q = 1 (w_q = W_q / B in seconds, > 0).

    F(T) = sum w_q / (T - c_q) falls on T > max c; 1 / F is concave and increasing (a parallel
    sum of the lines (T - c_q) / w_q, exactly a line when the c_q are equal), so Newton on
    1 / F - 1 from T0 = max(c_q + w_q) (where F >= 1: box q alone would need all of B) climbs
    to the root without overshooting, quadratically; a step is F (F - 1) / F'."""
    t = max(cq + wq for cq, wq in zip(c, w))
    for _ in range(NEWTON_STEPS_MAX):
        f, slope = 0.0, 0.0
        for cq, wq in zip(c, w):
            g = wq / (t - cq)
            f += g
            slope += g / (t - cq)
        step = f * (f - 1.0) / slope
        t += step
        if step <= tolerance * t:
            break
    shares = [wq / (t - cq) for cq, wq in zip(c, w)]
    total = sum(shares)
    return t, [xq / total for xq in shares]


def _solve_newton(c: list[float], dirs: list, x: list[float], t: float
                  ) -> tuple[float, list[float]] | None:
    """Newton on x_q (T - c_q) = w_q(x_q) (all q), sum x_q = 1, from (x, t); None if it does
    not settle. w_q(x) = sum over directions of (bits / B) / eta(x), eta(x) = log2(1 + p / x)
    for Shannon (constant for linear): t_q(x) = T rewritten so that it is nearly bilinear in
    (x, T), which Newton solves in 3-4 steps from the linear solve's point.

    The Jacobian is an arrow: diagonal D_q = T - c_q - w_q'(x_q), the T column x_q, the sum
    row; a step is dT = -(s + sum G_q / D_q) / sum(x_q / D_q), dx_q = -(G_q + x_q dT) / D_q,
    with G_q = x_q (T - c_q) - w_q and s = 1 - sum x_q. Steps that would take a share to <= 0
    are shortened. It stops after a full step of at most NEWTON_LAST_STEP (relative):
    convergence is quadratic, so what is left is about its square (the tests check it
    against the bisection)."""
    n = len(c)
    fixed_w = [0.0] * n  # the linear directions' part of w_q: constant
    shannon = []  # (box, bits / B, p) of the Shannon directions with bits
    for q, directions in enumerate(dirs):
        for bits, kind, p in directions:
            if bits > 0:
                if kind:
                    shannon.append((q, bits, p))
                else:
                    fixed_w[q] += bits / p
    log1p = math.log1p
    for _ in range(NEWTON_STEPS_MAX):
        w, dw = fixed_w[:], [0.0] * n
        for q, bits, p in shannon:
            xq = x[q]
            eta = log1p(p / xq) / LN2
            w[q] += bits / eta
            dw[q] += bits * p / (LN2 * xq * (xq + p) * eta * eta)  # d(bits / eta) / dx
        residual, inverse = [0.0] * n, [0.0] * n
        sum_x = sum_gi = sum_xi = 0.0
        for q in range(n):
            xq, room = x[q], t - c[q]
            i = 1.0 / (room - dw[q])
            g = xq * room - w[q]
            residual[q], inverse[q] = g, i
            sum_x += xq
            sum_gi += g * i
            sum_xi += xq * i
        dt = -(1.0 - sum_x + sum_gi) / sum_xi
        dx = [-(g + xq * dt) * i for g, xq, i in zip(residual, x, inverse)]
        scale = 1.0
        for xq, dq in zip(x, dx):
            if dq < 0 and xq + dq <= 0:
                scale = min(scale, 0.5 * xq / -dq)  # at most halve a share in one step
        x = [xq + scale * dq for xq, dq in zip(x, dx)]
        t += scale * dt
        if scale == 1.0 and abs(dt) <= NEWTON_LAST_STEP * t \
                and all(abs(dq) <= NEWTON_LAST_STEP * xq for dq, xq in zip(dx, x)):
            total = sum(x)
            return t, [xq / total for xq in x]
    return None


def _settle(c: list[float], dirs: list, x: list[float], t: float
            ) -> tuple[float, list[float]] | None:
    """`_solve_newton`, None also where it met a zero slope or ended off the feasible set."""
    try:
        solved = _solve_newton(c, dirs, x, t)
    except ZeroDivisionError:
        return None
    if solved is None or not all(0 < xq <= 1 for xq in solved[1]) \
            or not all(solved[0] > cq for cq in c):
        return None
    return solved


def _time_and_slope(c: float, directions, x: float) -> tuple[float, float]:
    """(t(x), dt/dx): `directions` from `_direction`."""
    time_s, slope = c, 0.0
    for bits, kind, p in directions:
        if bits > 0:
            if kind:
                s = p / x
                eta = math.log1p(s) / LN2
                r, dr = x * eta, eta - s / ((1.0 + s) * LN2)
            else:
                r, dr = x * p, p
            time_s += bits / r
            slope -= bits * dr / (r * r)
    return time_s, slope


def _root_in(lo: float, hi: float, start: float, value_and_slope, scale: float) -> float:
    """The root of a function falling from > 0 at lo to <= 0 at hi: Newton, kept inside the
    bracket (a step that leaves it is a bisection). Stops at |f| <= RELATIVE_TOLERANCE scale or
    a step below RELATIVE_TOLERANCE of x."""
    x = start if lo < start < hi else 0.5 * (lo + hi)
    for _ in range(BISECTION_STEPS):
        f, slope = value_and_slope(x)
        if f > 0:
            lo = x
        else:
            hi = x
        if abs(f) <= RELATIVE_TOLERANCE * scale:
            return x
        step = f / slope if slope < 0 else 0.0
        nxt = x - step
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= RELATIVE_TOLERANCE * x or nxt in (lo, hi):
            return nxt
        x = nxt
    return x


def _solve_nested(c: list[float], dirs: list) -> tuple[float, list[float]]:
    """The safe way: Newton on S(T) = sum_q x_q(T) = 1 with each x_q(T) (t_q(x) = T) by Newton,
    both kept in a bracket. t_q is convex and falls in x (1 / a concave rate), so x_q(T) and
    S(T) are convex and fall too; T* lies between max_q t_q(1) and max_q t_q(1/n)."""
    n = len(c)
    lo = max(_time_s(cq, d, 1.0) for cq, d in zip(c, dirs))
    hi = max(_time_s(cq, d, 1.0 / n) for cq, d in zip(c, dirs))
    shares = [1.0 / n] * n

    def box_share(q: int, t: float) -> tuple[float, float]:
        """(x_q(t), dx_q/dt): 1 and 0 if all of B is not enough."""
        if _time_s(c[q], dirs[q], 1.0) >= t:
            return 1.0, 0.0
        def f(x):
            time_s, slope = _time_and_slope(c[q], dirs[q], x)
            return time_s - t, slope
        x = _root_in(0.0, 1.0, shares[q], f, t)
        return x, 1.0 / _time_and_slope(c[q], dirs[q], x)[1]

    def excess(t: float) -> tuple[float, float]:
        total, slope = -1.0, 0.0
        for q in range(n):
            shares[q], dx = box_share(q, t)
            total += shares[q]
            slope += dx
        return total, slope

    t = _root_in(lo, hi, lo, excess, 1.0) if hi > lo else hi
    x = [box_share(q, t)[0] for q in range(n)]
    total = sum(x)
    return t, [xq / total for xq in x]


def _share_for(c: float, directions, t: float) -> float:
    """The x in (0, 1] with t_q(x) = t (1 if even all of B is not enough), by bisection."""
    if _time_s(c, directions, 1.0) >= t:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _time_s(c, directions, mid) > t:
            lo = mid
        else:
            hi = mid
    return hi


def _solve_bisection(c: list[float], dirs: list) -> tuple[float, list[float]]:
    """The reference: bisection on T, each x_q(T) by bisection (slow, always converges).
    T* lies between max_q t_q(1) (each box alone with all of B) and max_q t_q(1/n)."""
    n = len(c)
    lo = max(_time_s(cq, d, 1.0) for cq, d in zip(c, dirs))
    hi = max(_time_s(cq, d, 1.0 / n) for cq, d in zip(c, dirs))
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if sum(_share_for(cq, d, mid) for cq, d in zip(c, dirs)) > 1.0:
            lo = mid
        else:
            hi = mid
    return hi, [_share_for(cq, d, hi) for cq, d in zip(c, dirs)]


def allocate(demands: Mapping[int, BoxDemand], called: Iterable[int] | None,
             total_bandwidth_hz: float, *, method: str = "newton") -> Allocation:
    """The min-max shares of B for the called boxes: sum x_q = 1, t_q(x_q) = T* for every
    called box with bytes; 0 for boxes not called and for called boxes with no bytes.

    demands: box id -> BoxDemand for every box of the cell (those not in `called` get 0);
    called: the box ids this layer calls (None: every box in `demands`).
    method: "newton" (fast) or "bisection" (the reference). Raises ValueError on bad input.
    finish_s is max(T*, fixed_s of called boxes with no bytes).
    """
    ids = _check(demands, called, total_bandwidth_hz)
    if method not in ("newton", "bisection"):
        raise ValueError(f"method {method!r} is neither 'newton' nor 'bisection'")
    busy = [b for b in ids if demands[b].has_bytes]
    shares = dict.fromkeys(demands, 0.0)
    times = {b: demands[b].fixed_s for b in ids}
    if busy:
        c = [demands[b].fixed_s for b in busy]
        dirs = [(_direction(demands[b].down_bits, demands[b].down, total_bandwidth_hz),
                 _direction(demands[b].up_bits, demands[b].up, total_bandwidth_hz))
                for b in busy]
        t, x = _solve(c, dirs, method)
        for b, xq in zip(busy, x):
            shares[b] = xq
            times[b] = t
    return Allocation(shares, times, max(times.values(), default=0.0))


def _solve(c: list[float], dirs: list, method: str) -> tuple[float, list[float]]:
    """(T*, shares) for boxes that all have bytes."""
    n = len(c)
    if n == 1:
        return _time_s(c[0], dirs[0], 1.0), [1.0]
    if method == "bisection":
        return _solve_bisection(c, dirs)
    # W_q / B with Shannon's eta frozen at x = 1/n: exact when every direction is linear
    x0 = 1.0 / n
    w = []
    linear = True
    for directions in dirs:
        wq = 0.0
        for bits, kind, p in directions:
            if bits > 0:
                if kind == 0:
                    wq += bits / p
                else:
                    wq += bits / (math.log1p(p / x0) / LN2)
                    linear = False
        w.append(wq)
    if linear:
        return _solve_linear(c, w)
    t, x = _solve_linear(c, w, START_TOLERANCE)
    solved = _settle(c, dirs, x, t)
    return solved if solved is not None else _solve_nested(c, dirs)


# --- joint with the WLR selection -------------------------------------------------------------


@dataclass(frozen=True)
class BoxLink:
    """One box of the cell, for `select_and_allocate`: a request of n (token, expert) pairs
    costs fixed_s + max(min_compute_s, n compute_s_per_pair) and carries n * down/up_bits_per_pair
    bits (min_compute_s: a box whose one call costs more than its per-token rate, as a roofline
    where one token reads all the weights)."""

    fixed_s: float  # per request: RTT, access delay
    compute_s_per_pair: float
    down_bits_per_pair: float
    up_bits_per_pair: float
    down: Rate
    up: Rate
    min_compute_s: float = 0.0

    def demand(self, pairs: int) -> BoxDemand:
        compute_s = max(self.min_compute_s, pairs * self.compute_s_per_pair)
        return BoxDemand(self.fixed_s + compute_s,
                         pairs * self.down_bits_per_pair, pairs * self.up_bits_per_pair,
                         self.down, self.up)


@dataclass(frozen=True)
class JointSelection:
    """selection: the selector's answer for the last round; allocation: the min-max shares
    for exactly the boxes it calls; rounds: WLR rounds run; converged: False when the last
    round still changed the selection (it is returned anyway, with its own allocation).
    latency_s: the box latencies the last round's selection was made on (a list, or a
    float64 tensor where the selector takes one): `select` on them gives `selection` again,
    so a runtime that selects by itself can take them in place of its own estimates."""

    selection: Selection
    allocation: Allocation
    rounds: int
    converged: bool
    latency_s: list[float] | torch.Tensor | None = None


def _pairs_per_box(experts, box_of_expert, keep) -> dict[int, int]:
    """(token, expert) pairs each box gets; keep None: every slot."""
    if experts.numel() <= SMALL_SELECTION and experts.device.type == "cpu":
        box_of = box_of_expert.tolist()
        flat = experts.view(-1).tolist()
        kept = keep.view(-1).tolist() if keep is not None else [True] * len(flat)
        pairs: dict[int, int] = {}
        for expert, k in zip(flat, kept):
            if k:
                pairs[box_of[expert]] = pairs.get(box_of[expert], 0) + 1
        return pairs
    slot_box = box_of_expert.to(experts.device)[experts]
    if keep is not None:
        slot_box = slot_box[keep]
    counts = torch.bincount(slot_box.reshape(-1)).tolist()
    return {b: n for b, n in enumerate(counts) if n}


def select_and_allocate(
    experts: torch.Tensor,
    weights: torch.Tensor,
    box_of_expert: torch.Tensor,
    box_latency_s: Sequence[float] | torch.Tensor,
    theta: float | torch.Tensor,
    cell: Mapping[int, BoxLink],
    total_bandwidth_hz: float,
    available: torch.Tensor | None = None,
    rounds_max: int = ROUNDS_MAX,
) -> JointSelection:
    """WLR selection and bandwidth allocation, alternated until the selection is stable.

    experts, weights [T, K], box_of_expert [E], theta, available: as `selector.select`.
    box_latency_s [B] floats (a list or a tensor): the latency of every box (the runtime's
        `box_latency_s`); the entries of boxes outside the cell (the local fallback, wired
        boxes) are used as they are, those of cell boxes are replaced by the model below.
    cell: box id -> BoxLink for the boxes sharing the cell's `total_bandwidth_hz`.

    Round 1 weighs each cell box by its time under `shared_times` for every top-k slot kept;
    then allocate for the boxes the selection calls, and weigh each called box by its time
    under that allocation (T*) and each box it left out by its time if it were added back
    (`allocate` over the called boxes and it, its full top-k pairs); select again; stop when
    a round's selection equals the one before (at most `rounds_max` selections; on an
    oscillation the last round's is returned, converged False). theta <= 0: one selection,
    which keeps every top-k slot of an available expert, and its allocation.
    """
    if rounds_max < 1:
        raise ValueError(f"rounds_max {rounds_max} must be >= 1")
    latency = box_latency_s.tolist() if isinstance(box_latency_s, torch.Tensor) \
        else [float(t) for t in box_latency_s]
    for box in cell:
        if not 0 <= box < len(latency):
            raise ValueError(f"cell box {box} is outside the {len(latency)} boxes' latencies")
    tensor_latency = experts.numel() > SMALL_SELECTION or experts.device.type != "cpu"

    used: list = [None]  # the latencies of the last selection, as select() took them

    def run_select() -> Selection:
        t = torch.tensor(latency, dtype=torch.float64) if tensor_latency else list(latency)
        used[0] = t
        return select(experts, weights, box_of_expert, t, theta, available)

    def cell_allocation(pairs: dict[int, int], extra: int | None = None) -> Allocation:
        """`allocate` for the cell boxes with pairs (and `extra` with all its top-k pairs),
        the other cell boxes at share 0 (demands only for the called: the hot path)."""
        demands = {b: cell[b].demand(n) for b, n in pairs.items() if b in cell}
        if extra is not None:
            demands[extra] = full_demands[extra]
        allocation = allocate(demands, None, total_bandwidth_hz)
        return Allocation({**dict.fromkeys(cell, 0.0), **allocation.shares},
                          allocation.times_s, allocation.finish_s)

    def allocation_for(selection: Selection) -> tuple[dict[int, int], Allocation]:
        pairs = _pairs_per_box(experts, box_of_expert, selection.keep)
        return pairs, cell_allocation(pairs)

    full_demands: dict[int, BoxDemand] = {}
    weighs = bool((theta > 0).any()) if isinstance(theta, torch.Tensor) else theta > 0
    if not weighs:  # the selection does not read latencies: one round
        selection = run_select()
        return JointSelection(selection, allocation_for(selection)[1], 1, True, used[0])

    full_pairs = _pairs_per_box(experts, box_of_expert, None)
    candidates = [b for b in cell if full_pairs.get(b, 0)]
    full_demands.update({b: cell[b].demand(full_pairs[b]) for b in candidates})
    for b, t in shared_times(full_demands, None, total_bandwidth_hz).times_s.items():
        latency[b] = t
    selection = run_select()
    pairs, allocation = allocation_for(selection)
    previous = selection.keep
    for rounds in range(2, rounds_max + 1):
        called = [b for b in candidates if pairs.get(b, 0)]
        for b in called:
            latency[b] = allocation.times_s[b]
        for b in candidates:
            if not pairs.get(b, 0):  # what it would cost to call it back
                latency[b] = cell_allocation(pairs, extra=b).times_s[b]
        selection = run_select()
        if torch.equal(selection.keep, previous):
            return JointSelection(selection, allocation, rounds, True, used[0])
        pairs, allocation = allocation_for(selection)
        previous = selection.keep
    return JointSelection(selection, allocation, rounds_max, False, used[0])


# --- the paper's cell --------------------------------------------------------------------------


def paper_demands(gains_down: Sequence[float], gains_up: Sequence[float],
                  compute_s: Sequence[float], bits_per_token: float, bs_power_w: float,
                  device_power_w: float, noise_w_per_hz: float,
                  tokens: int = 1) -> dict[int, BoxDemand]:
    """Box q of the paper's cell (Eqs. 2-6) for one layer request of `tokens` tokens: Shannon
    rates from the amplitude gains, fixed_s = the compute time, the same bits each way."""
    if not len(gains_down) == len(gains_up) == len(compute_s):
        raise ValueError("gains and compute times must have one entry per box")
    bits = bits_per_token * tokens
    return {q: BoxDemand(float(compute_s[q]) * tokens, bits, bits,
                         ShannonRate.from_channel(bs_power_w, float(gains_down[q]),
                                                  noise_w_per_hz),
                         ShannonRate.from_channel(device_power_w, float(gains_up[q]),
                                                  noise_w_per_hz))
            for q in range(len(compute_s))}


