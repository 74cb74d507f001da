"""Per-agent link estimates from real traffic: the update rule, pure (time is passed in).

A reply's measured round trip is modeled as

    round_trip = base RTT + (request + reply bytes) / throughput + compute on the agent

The agent reports its compute time, so network = round_trip - compute. The base RTT is smoothed
as TCP does (SRTT/RTTVAR, RFC 6298 constants); throughput from the transfer time left after the
base RTT; compute speed as seconds per token per expert. Together they give the expected time for
*this* request's bytes and tokens (the selector's latency t, Eq. 9) and a per-layer deadline.

With a single message size the split between base RTT and throughput cannot be identified, but
the estimate for that size still converges to the measured time (the RTT absorbs the rest);
light probes (tiny) and prefill requests (large) separate the two.

Estimates must never go stale on one bad sample: WLR avoids a slow agent, so a single outlier that
made it look slow would otherwise stay for good (seen: 46 of 59 slots dropped for one of eight
identical loopback agents). So a sample may move an estimate up at most `max_step_ratio` times
(bounded influence of one outlier), and a sample that says "faster" is believed with a larger gain
(a link cannot look faster than it is, but timer noise and one-off stalls make it look slower).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class LinkEstimatorConfig:
    """Constants of the estimator; the defaults are for real links, from loopback to cellular."""

    rtt_alpha: float = 1 / 8  # RFC 6298 alpha (SRTT gain)
    rttvar_beta: float = 1 / 4  # RFC 6298 beta (RTTVAR gain)
    rttvar_k: float = 4.0  # RFC 6298 K; also the noise bar a transfer time must clear
    throughput_alpha: float = 1 / 8
    compute_alpha: float = 1 / 8
    # Priors, used until the first sample replaces each one: a modest LAN-ish link.
    prior_rtt_s: float = 0.010
    prior_throughput_bytes_per_s: float = 12.5e6  # 100 Mbit/s
    prior_compute_s_per_token_expert: float = 1e-3
    # Transfer times shorter than this are timer noise, never a throughput sample.
    min_transfer_s: float = 50e-6
    # deadline = expected * (1 + slack) + K * rttvar, at least the floor: when the base station
    # starts asking whether a late agent is still there (it errs long: throughput and compute
    # vary more than the base RTT does).
    deadline_slack_ratio: float = 0.5
    deadline_floor_s: float = 0.25
    # The transfer part gets more room: a wireless link's rate can fall several-fold from one
    # sample to the next (a fading epoch), and a large request (a prefill, an lm-eval batch)
    # must not be taken for a dead agent. With the transfer under the 0.5 slack, `testbed eval`
    # on the paper scenario lost 2-3 lm-eval batches per θ that way (~2.5 % of its calls).
    deadline_transfer_ratio: float = 4.0
    # Past that deadline a request is late, not lost (dispatch.py): it is given up only when
    # its agent's connection is gone, or at the cap below, whatever the estimate says. The cap
    # sits above the heartbeat timeout (wire/protocol.py, 5 s), so a live box that
    # stalls for a few seconds (a process stopped 3 s, measured) is waited for. An agent that
    # answers ever later (reporting a compute time just under its round trip, which the checks
    # believe) inflates its estimate, then one silence cost a wait the agent chose (measured:
    # 30 s for one layer of a 301-token prompt after 12 slow decode steps; capped, a few
    # seconds, tests/test_rogue_agent.py). The cap depends only on the request itself:
    #   cap = base + (request + reply bytes) / slowest link + tokens x experts x slowest compute
    deadline_cap_base_s: float = 6.0
    deadline_cap_bytes_per_s: float = 125e3  # 1 Mbit/s: a bad cellular uplink
    deadline_cap_s_per_token_expert: float = 0.02  # a Mixtral expert on a CPU: ~7 ms a token
    # One sample counts as at most this many times the current estimate (RTT, compute time,
    # 1/throughput): a real slowdown is learned over a few samples, one outlier moves little.
    max_step_ratio: float = 4.0
    # Gain for samples that say faster than the estimate: a recovered link gets its share back
    # within a few samples (probes keep coming while WLR avoids it).
    recovery_alpha: float = 1 / 2


DEFAULT_CONFIG = LinkEstimatorConfig()


class LinkSample(NamedTuple):  # a tuple: built on every reply, frozen dataclasses cost 3x
    """One completed request (or probe) to an agent, as observed by the base station."""

    round_trip_s: float  # from the first byte sent to the reply received, base-station clock
    compute_s: float  # agent-reported time spent computing (0 for a probe)
    request_bytes: int
    reply_bytes: int
    tokens: int  # tokens in the request (0 for a probe)
    experts: int  # experts the agent ran on those tokens (0 for a probe)
    time_s: float  # base-station monotonic time when the reply arrived


class LinkState(NamedTuple):  # immutable, built on every reply
    """Estimates for one agent. Counts say which estimates are still the prior (count 0)."""

    srtt_s: float  # smoothed base RTT (size-independent part of the network time)
    rttvar_s: float  # its mean deviation
    throughput_bytes_per_s: float  # request + reply bytes per second of transfer
    compute_s_per_token_expert: float
    samples: int = 0  # RTT samples (every update is one)
    throughput_samples: int = 0
    compute_samples: int = 0
    last_update_s: float | None = None


def initial_state(config: LinkEstimatorConfig = DEFAULT_CONFIG) -> LinkState:
    """Priors before any sample; RTTVAR starts at half the RTT, as RFC 6298 does on its first."""
    return LinkState(
        srtt_s=config.prior_rtt_s,
        rttvar_s=config.prior_rtt_s / 2,
        throughput_bytes_per_s=config.prior_throughput_bytes_per_s,
        compute_s_per_token_expert=config.prior_compute_s_per_token_expert,
    )


def _ewma(old: float, sample: float, gain: float, first: bool) -> float:
    return sample if first else (1 - gain) * old + gain * sample


def update(
    state: LinkState, sample: LinkSample, config: LinkEstimatorConfig = DEFAULT_CONFIG
) -> LinkState:
    """The state after one sample. Throughput first (from the old base RTT), then the base RTT.
    (Runs for every reply: both tuples are unpacked once, and `b if b > a else a` is max(a, b)
    without the call, NaN included.)"""
    (srtt_s, rttvar_s, throughput, compute, samples, throughput_samples, compute_samples,
     _) = state
    round_trip_s, compute_s, request_bytes, reply_bytes, tokens, experts, time_s = sample
    network_s = round_trip_s - compute_s
    network_s = 0.0 if 0.0 > network_s else network_s
    payload_bytes = request_bytes + reply_bytes

    # Throughput: transfer = network - base RTT, trusted only once the base RTT is a measurement
    # and the transfer clears the RTT's own noise. Independently, if the bytes moved faster than
    # the current estimate allows, bytes / network is a sure lower bound: take it.
    if payload_bytes > 0:
        transfer_s = network_s - srtt_s
        noise_s = max(config.rttvar_k * rttvar_s, config.min_transfer_s)
        rate_sample = None
        if samples > 0 and transfer_s > noise_s:
            rate_sample = payload_bytes / transfer_s
        elif network_s > 0 and payload_bytes / throughput > network_s:
            rate_sample = payload_bytes / network_s
        if rate_sample is not None:
            first = throughput_samples == 0
            if not first:
                rate_sample = max(rate_sample, throughput / config.max_step_ratio)
            gain = config.recovery_alpha if rate_sample > throughput else config.throughput_alpha
            throughput = _ewma(throughput, rate_sample, gain, first)
            throughput_samples += 1

    # Base RTT: what is left of the network time after the transfer (RFC 6298 Section 2).
    rtt_sample = network_s - payload_bytes / throughput
    rtt_sample = 0.0 if 0.0 > rtt_sample else rtt_sample
    if samples == 0:
        srtt, rttvar = rtt_sample, rtt_sample / 2
    else:
        rtt_cap_s = config.max_step_ratio * (srtt_s + rttvar_s) + config.min_transfer_s
        rtt_sample = rtt_cap_s if rtt_cap_s < rtt_sample else rtt_sample  # min(sample, cap)
        beta = config.rttvar_beta
        alpha = config.recovery_alpha if rtt_sample < srtt_s else config.rtt_alpha
        rttvar = (1 - beta) * rttvar_s + beta * abs(srtt_s - rtt_sample)
        srtt = (1 - alpha) * srtt_s + alpha * rtt_sample

    # Compute speed: seconds per (token, expert) pair, from the agent's own timing.
    pairs = tokens * experts
    if pairs > 0:
        first = compute_samples == 0
        per_pair_s = compute_s / pairs
        if not first:
            per_pair_s = min(per_pair_s, config.max_step_ratio * compute)
        gain = config.recovery_alpha if per_pair_s < compute else config.compute_alpha
        compute = _ewma(compute, per_pair_s, gain, first)
        compute_samples += 1

    # every field anew, in LinkState's field order (positional: keywords cost a third more)
    return LinkState(srtt, rttvar, throughput, compute, samples + 1, throughput_samples,
                     compute_samples, time_s)


def expected_time_s(
    state: LinkState, request_bytes: int, reply_bytes: int, tokens: int, experts: int
) -> float:
    """Expected seconds for this request to come back: base RTT + transfer + compute."""
    transfer_s = (request_bytes + reply_bytes) / state.throughput_bytes_per_s
    compute_s = state.compute_s_per_token_expert * tokens * experts
    return state.srtt_s + transfer_s + compute_s


def deadline_s(
    state: LinkState,
    request_bytes: int,
    reply_bytes: int,
    tokens: int,
    experts: int,
    config: LinkEstimatorConfig = DEFAULT_CONFIG,
    cap_s: float | None = None,
) -> float:
    """How long to wait for this request before treating it as lost (per layer): from the
    estimate, at least the floor, at most `deadline_cap_s` of this request (`cap_s`, when the
    caller has it already: it depends on the request alone)."""
    transfer_s = (request_bytes + reply_bytes) / state.throughput_bytes_per_s
    # expected_time_s(...) - transfer_s, its sum spelt out in its order (the same float): this
    # runs for every request sent
    rest_s = (state.srtt_s + transfer_s
              + state.compute_s_per_token_expert * tokens * experts) - transfer_s
    bound = (rest_s * (1 + config.deadline_slack_ratio)
             + transfer_s * config.deadline_transfer_ratio + config.rttvar_k * state.rttvar_s)
    if cap_s is None:
        cap_s = deadline_cap_s(request_bytes, reply_bytes, tokens, experts, config)
    return min(max(bound, config.deadline_floor_s), cap_s)


def deadline_cap_s(request_bytes: int, reply_bytes: int, tokens: int, experts: int,
                   config: LinkEstimatorConfig = DEFAULT_CONFIG) -> float:
    """The longest any agent's request of this size is waited for: a function of the request
    alone, never of what an agent's replies taught the estimate."""
    return (config.deadline_cap_base_s
            + (request_bytes + reply_bytes) / config.deadline_cap_bytes_per_s
            + config.deadline_cap_s_per_token_expert * tokens * experts)


def age_s(state: LinkState, now_s: float) -> float:
    """Seconds since the last sample (inf if none): the link monitor probes stale agents."""
    return float("inf") if state.last_update_s is None else now_s - state.last_update_s
