"""The paper's modeled channel (Eqs. 2-6, §IV-A) against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from basestation.channel_model import (
    ChannelScenario,
    comm_bytes,
    dbm_to_w,
    draw_rayleigh_gain,
    expert_flops_per_token,
    mean_amplitude_gain,
    modeled_latency_s,
    path_loss_db,
    scenario_latency_s,
    scenario_rates_bits_per_s,
    shannon_rate_bits_per_s,
)


def test_path_loss_at_100_m_and_3_5_ghz():
    # 32.4 + 20 log10(3.5) + 20 log10(100) = 32.4 + 10.8814 + 40 = 83.2814 dB
    assert path_loss_db(100.0, 3.5) == pytest.approx(83.2814, abs=1e-4)
    # Doubling the distance adds 20 log10(2) = 6.0206 dB.
    assert path_loss_db(200.0, 3.5) - path_loss_db(100.0, 3.5) == pytest.approx(6.0206, abs=1e-4)


def test_units():
    assert dbm_to_w(30.0) == pytest.approx(1.0)  # 30 dBm = 1 W
    assert dbm_to_w(-174.0) == pytest.approx(3.981e-21, rel=1e-3)  # N0 in W/Hz
    assert mean_amplitude_gain(20.0) == pytest.approx(0.1)  # 20 dB loss = amplitude / 10


def test_shannon_rate_simple_snrs():
    # P g^2 / (N0 B) = 1 * 1 / (1e-6 * 1e6) = 1: R = B log2(2) = B.
    assert shannon_rate_bits_per_s(1e6, 1.0, 1.0, 1e-6) == pytest.approx(1e6)
    # SNR 3: R = B log2(4) = 2 B.
    assert shannon_rate_bits_per_s(1e6, 3.0, 1.0, 1e-6) == pytest.approx(2e6)


def test_uplink_rate_at_100_m_without_fading():
    # In dB: P = 0.2 W = 23.0103 dBm; PL = 83.2814 dB; noise N0 B = -174 + 10 log10(12.5e6)
    # = -174 + 70.9691 = -103.0309 dBm. SNR = 23.0103 - 83.2814 + 103.0309 = 42.7598 dB = 18877.
    # R = 12.5e6 * log2(1 + 18877) = 12.5e6 * 14.2044 = 177.56 Mbit/s.
    gain = mean_amplitude_gain(path_loss_db(100.0, 3.5))
    rate = shannon_rate_bits_per_s(12.5e6, 0.2, gain, dbm_to_w(-174.0))
    assert rate == pytest.approx(177.56e6, rel=1e-3)


def test_rayleigh_draws_have_the_paper_mean():
    # E[g] = 10^(-PL/20); E[g^2] = (4/pi) 10^(-PL/10) for a Rayleigh amplitude.
    pl_db = 83.2814
    g = draw_rayleigh_gain(np.random.default_rng(1234), pl_db, size=200_000)
    assert g.mean() == pytest.approx(10 ** (-pl_db / 20), rel=0.01)
    assert np.mean(g**2) == pytest.approx(4 / math.pi * 10 ** (-pl_db / 10), rel=0.02)
    assert (g > 0).all()


def test_eq4_flops_mixtral_8x7b_expert():
    # m = 4096, m_h = 14336, eta = 4: 6 * 4096 * 14336 + 4 * 14336 + 14336
    # = 352,321,536 + 71,680 = 352,393,216 FLOPs per token.
    assert expert_flops_per_token(4096, 14336, activation_flops=4.0) == 352_393_216


def test_eq6_latency_by_hand():
    # One bf16 token of m = 4096: L_comm = 2 * 4096 = 8192 bytes = 65,536 bits.
    # Down and up at 65.536 Mbit/s: 1 ms each. L_comp = 352,393,216 FLOPs at 352.393216 GFLOP/s:
    # 1 ms. Total 3 ms.
    payload = comm_bytes(4096, tokens=1, bytes_per_element=2)
    assert payload == 8192
    flops = expert_flops_per_token(4096, 14336, activation_flops=4.0)
    t = modeled_latency_s(payload, flops, 65.536e6, 65.536e6, 352.393216e9)
    assert t == pytest.approx(3e-3)


def test_default_scenario_is_the_paper_setting():
    s = ChannelScenario()
    assert s.num_devices == 8 and s.bandwidth_per_device_hz == 12.5e6
    assert (s.carrier_ghz, s.bs_power_w, s.device_power_w) == (3.5, 10.0, 0.2)
    with pytest.raises(ValueError):
        ChannelScenario(distances_m=(50.0, 100.0), device_flops=(1e12,))


def test_scenario_rates_and_latency_without_fading():
    s = ChannelScenario()
    down, up = scenario_rates_bits_per_s(s)
    assert up[1] == pytest.approx(177.56e6, rel=1e-3)  # device 1 is at 100 m (hand value above)
    assert (down > up).all()  # 10 W down against 0.2 W up
    assert (np.diff(down) < 0).all() and (np.diff(up) < 0).all()  # farther is slower
    t = scenario_latency_s(s, hidden_size=4096, ffn_hidden_size=14336)
    assert t.shape == (8,) and (np.diff(t) > 0).all()
    # Device 1 by hand: 65,536 bits / 177.56e6 up + 65,536 / R_down + 352.39e6 / 10e12.
    expected = 65_536 / up[1] + 65_536 / down[1] + 352_393_216 / 10e12
    assert t[1] == pytest.approx(expected)


def test_scenario_fading_is_reproducible_with_a_seed():
    s = ChannelScenario()
    a = scenario_latency_s(s, 64, 128, tokens=3, rng=np.random.default_rng(7))
    b = scenario_latency_s(s, 64, 128, tokens=3, rng=np.random.default_rng(7))
    c = scenario_latency_s(s, 64, 128, tokens=3, rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
