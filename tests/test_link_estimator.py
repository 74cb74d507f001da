"""The link estimator's update rule against numbers worked out by hand (default constants:
alpha 1/8, beta 1/4, K 4; priors RTT 10 ms, 12.5e6 B/s, 1 ms per token-expert)."""

from __future__ import annotations

import pytest

from basestation.link_estimator import (
    LinkEstimatorConfig,
    LinkSample,
    age_s,
    deadline_cap_s,
    deadline_s,
    expected_time_s,
    initial_state,
    update,
)

approx = pytest.approx


def probe(round_trip_s: float, time_s: float = 0.0) -> LinkSample:
    return LinkSample(round_trip_s, 0.0, 0, 0, tokens=0, experts=0, time_s=time_s)


def test_priors():
    s = initial_state()
    assert (s.srtt_s, s.rttvar_s, s.samples, s.last_update_s) == (0.010, 0.005, 0, None)
    # 10 ms + 2000 B / 12.5e6 B/s (0.16 ms) + 1 token * 2 experts * 1 ms = 12.16 ms
    assert expected_time_s(s, 1000, 1000, tokens=1, experts=2) == approx(0.01216)
    assert age_s(s, 5.0) == float("inf")


def test_rfc6298_smoothing_on_probes():
    # First R = 10 ms: SRTT = 10, RTTVAR = 5. Second R = 20 ms:
    # RTTVAR = 3/4 * 5 + 1/4 * |10 - 20| = 6.25 ms; SRTT = 7/8 * 10 + 1/8 * 20 = 11.25 ms.
    s = update(initial_state(), probe(0.010, time_s=1.0))
    assert (s.srtt_s, s.rttvar_s) == (approx(0.010), approx(0.005))
    s = update(s, probe(0.020, time_s=2.0))
    assert (s.srtt_s, s.rttvar_s) == (approx(0.01125), approx(0.00625))
    # Probes carry no bytes and no tokens: throughput and compute keep their priors.
    assert (s.throughput_samples, s.compute_samples, s.samples) == (0, 0, 2)
    assert s.throughput_bytes_per_s == 12.5e6 and s.compute_s_per_token_expert == 1e-3
    assert s.last_update_s == 2.0 and age_s(s, 2.5) == approx(0.5)


def first_decode_sample() -> LinkSample:
    return LinkSample(0.025, 0.003, 8192, 8192, tokens=1, experts=2, time_s=100.0)


def test_first_sample_splits_with_the_prior_throughput():
    # network = 25 - 3 = 22 ms; bytes 16384 at the prior 12.5e6 B/s = 1.31072 ms (< 22 ms, so
    # no lower-bound sample; no transfer sample on a first sample, the base RTT is still a prior).
    # RTT sample = 22 - 1.31072 = 20.68928 ms: SRTT = that, RTTVAR = half = 10.34464 ms.
    # compute: 3 ms / (1 token * 2 experts) = 1.5 ms per token-expert (first: replaces prior).
    s = update(initial_state(), first_decode_sample())
    assert s.srtt_s == approx(0.02068928)
    assert s.rttvar_s == approx(0.01034464)
    assert s.throughput_bytes_per_s == 12.5e6 and s.throughput_samples == 0
    assert s.compute_s_per_token_expert == approx(1.5e-3)
    # Same request again: 20.68928 + 1.31072 + 3 = 25 ms, the measured round trip.
    assert expected_time_s(s, 8192, 8192, tokens=1, experts=2) == approx(0.025)


def test_large_transfer_gives_a_throughput_sample():
    # After the first sample (SRTT 20.68928 ms, RTTVAR 10.34464 ms), a prefill of 100 tokens:
    # round trip 300 ms, compute 50 ms -> network 250 ms; transfer = 250 - 20.68928 = 229.31072 ms
    # > K * RTTVAR = 41.37856 ms, so a sample: 2e6 B / 0.22931072 s = 8,721,790 B/s (first:
    # replaces the prior). RTT sample = 250 - 2e6 / 8,721,790 = 20.68928 ms = SRTT, so SRTT stays
    # and RTTVAR = 3/4 * 10.34464 = 7.75848 ms. compute: 50 ms / 100 = 0.5 ms, faster than the
    # estimate, so the recovery gain 1/2: 1/2 * 1.5 + 1/2 * 0.5 = 1.0 ms.
    s = update(initial_state(), first_decode_sample())
    s = update(s, LinkSample(0.300, 0.050, 1_000_000, 1_000_000, 100, 1, time_s=101.0))
    assert s.throughput_bytes_per_s == approx(8_721_790, rel=1e-6)
    assert s.throughput_samples == 1
    assert s.srtt_s == approx(0.02068928)
    assert s.rttvar_s == approx(0.00775848)
    assert s.compute_s_per_token_expert == approx(1.0e-3)

    # A slower prefill (network 300 ms) shares the blame between throughput and base RTT:
    # transfer 279.31072 ms -> 7,160,481 B/s; throughput 7/8 * 8,721,790 + 1/8 * 7,160,481
    # = 8,526,627 B/s; RTT sample 300 - 2e6 / 8,526,627 = 300 - 234.5592 = 65.4408 ms;
    # RTTVAR = 3/4 * 7.75848 + 1/4 * |20.68928 - 65.4408| = 17.00670 ms;
    # SRTT = 7/8 * 20.68928 + 1/8 * 65.4408 = 26.28322 ms.
    s = update(s, LinkSample(0.350, 0.050, 1_000_000, 1_000_000, 100, 1, time_s=102.0))
    assert s.throughput_bytes_per_s == approx(8_526_627, rel=1e-6)
    assert s.rttvar_s == approx(0.0170067, rel=1e-5)
    assert s.srtt_s == approx(0.0262832, rel=1e-5)


def test_faster_than_the_estimate_is_a_lower_bound_sample():
    # Loopback: 16384 B back in 80 us. At the prior 12.5e6 B/s the bytes alone would take
    # 1.31 ms > 80 us, so throughput is at least 16384 / 80e-6 = 204.8e6 B/s (taken). The RTT
    # sample is then 80 us - 16384 / 204.8e6 = 0, so SRTT = RTTVAR = 0.
    s = update(initial_state(), LinkSample(80e-6, 0.0, 8192, 8192, 0, 0, time_s=1.0))
    assert s.throughput_bytes_per_s == approx(204.8e6)
    assert s.srtt_s == approx(0.0, abs=1e-12) and s.rttvar_s == approx(0.0, abs=1e-12)
    assert expected_time_s(s, 8192, 8192, 0, 0) == approx(80e-6)


def test_small_jitter_is_not_a_throughput_sample():
    # SRTT 10 ms, RTTVAR 5 ms after one probe; 10.5 ms for 256 bytes: transfer 0.5 ms is under
    # K * RTTVAR = 20 ms, so no throughput sample (256 B / 0.5 ms would claim 512 kB/s).
    s = update(initial_state(), probe(0.010))
    s = update(s, LinkSample(0.0105, 0.0, 128, 128, 0, 0, time_s=1.0))
    assert s.throughput_samples == 0 and s.throughput_bytes_per_s == 12.5e6


def test_steady_traffic_converges_to_the_measured_time():
    s = initial_state()
    for i in range(100):
        s = update(s, LinkSample(0.040, 0.004, 65536, 65536, 8, 1, time_s=float(i)))
    assert expected_time_s(s, 65536, 65536, 8, 1) == approx(0.040, rel=1e-3)


def test_compute_longer_than_round_trip_is_clamped():
    # An agent that reports more compute than the round trip (its clock or ours): network 0.
    s = update(initial_state(), LinkSample(0.001, 0.002, 0, 0, 1, 1, time_s=0.0))
    assert s.srtt_s == 0.0 and s.compute_s_per_token_expert == approx(0.002)


def test_deadline():
    # Priors: expected 12.16 ms (test_priors): RTT 10 + compute 2 ms, given 1.5x, and the
    # transfer 0.16 ms, given 4x; + 4 * 5 ms RTTVAR = 18 + 0.64 + 20 = 38.64 ms; the default
    # floor 250 ms wins. With floor 10 ms: 38.64 ms.
    s = initial_state()
    assert deadline_s(s, 1000, 1000, 1, 2) == 0.25
    config = LinkEstimatorConfig(deadline_floor_s=0.010)
    assert deadline_s(s, 1000, 1000, 1, 2, config) == approx(0.03864)


def test_a_large_transfer_may_take_four_times_its_estimate():
    """Regression: on the paper scenario a fading epoch cut a link's rate ~3x while an lm-eval
    batch of 500 tokens crossed it, and the 1.5x deadline declared the agent dead (2-3 batches
    per θ, ~2.5 % of the calls dropped). 2 x 250 kB at 20 Mbit/s = 0.2 s expected transfer:
    3 ms RTT and 1 ms compute x 1.5 + 0.2 s x 4 + 4 x 1 ms = 0.81 s."""
    s = initial_state()._replace(srtt_s=0.003, rttvar_s=0.001, throughput_bytes_per_s=2.5e6,
                                 compute_s_per_token_expert=2e-6)
    assert deadline_s(s, 250_000, 250_000, 500, 1) == approx(0.81)


def test_deadline_is_capped_whatever_the_estimate_says():
    """Regression: an agent that answered ever later (compute_s just under its round trip)
    grew its own deadline without bound. The cap is the request's: 6 s + bytes at 1 Mbit/s +
    20 ms per token-expert. 100 tokens of 256 bytes each way: 6 + 51200 / 125e3 + 2 = 8.4096 s."""
    inflated = initial_state()._replace(srtt_s=30.0, compute_s_per_token_expert=5.0)
    assert deadline_s(inflated, 25600, 25600, 100, 1) == approx(8.4096)
    assert deadline_cap_s(25600, 25600, 100, 1) == approx(8.4096)
    assert deadline_s(inflated, 0, 0, 1, 1) == approx(6.02)  # a ping-sized request
    assert deadline_s(initial_state(), 1000, 1000, 1, 2) == 0.25  # honest links: unchanged


def test_one_outlier_moves_the_rtt_a_bounded_amount():
    """Regression: one slow sample kept an agent avoided for good on an equal loopback (46 of
    59 slots dropped for one of eight identical agents at θ = 0.2)."""
    # SRTT 1 ms, RTTVAR 0.5 ms after one probe; then a 1 s stall. The sample counts as at most
    # 4 * (1 + 0.5) ms + 50 us = 6.05 ms: SRTT = 7/8 * 1 + 1/8 * 6.05 = 1.63125 ms (unbounded:
    # 125.9 ms, and WLR would avoid the agent while no sample corrects it).
    s = update(initial_state(), probe(0.001, 1.0))
    s = update(s, probe(1.0, 2.0))
    assert s.srtt_s == approx(0.00163125)


def test_a_recovered_link_is_believed_within_a_few_samples():
    # SRTT 50 ms; the link recovers to 1 ms. Faster samples take the recovery gain 1/2:
    # 50 -> 25.5 -> 13.25 -> 7.125 -> 4.0625 -> 2.53 ms after five probes (RFC 1/8: 44 ms).
    s = update(initial_state(), probe(0.050, 1.0))
    for i in range(5):
        s = update(s, probe(0.001, 2.0 + i))
    assert s.srtt_s == approx(0.00253125)


def test_a_real_slowdown_is_learned_over_a_few_samples():
    # 1 ms -> 40 ms for good: bounded steps, but it gets there (within 5 % in 40 samples)
    s = update(initial_state(), probe(0.001, 1.0))
    for i in range(40):
        s = update(s, probe(0.040, 2.0 + i))
    assert s.srtt_s == approx(0.040, rel=0.05)


def test_compute_outlier_is_bounded_and_recovery_is_fast():
    # compute 0.1 ms per pair, then one 100 ms stall on 1 pair: counts as 4 * 0.1 = 0.4 ms,
    # 7/8 * 0.1 + 1/8 * 0.4 = 0.1375 ms; then 0.1 ms again: 1/2 * 0.1375 + 1/2 * 0.1 = 0.11875
    s = update(initial_state(), LinkSample(0.001, 0.0001, 0, 0, 1, 1, time_s=1.0))
    s = update(s, LinkSample(0.101, 0.100, 0, 0, 1, 1, time_s=2.0))
    assert s.compute_s_per_token_expert == approx(0.0001375)
    s = update(s, LinkSample(0.001, 0.0001, 0, 0, 1, 1, time_s=3.0))
    assert s.compute_s_per_token_expert == approx(0.00011875)
