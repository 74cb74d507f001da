"""The paper's modeled wireless channel and expert latency (WDMoE §II-C..E, §IV-A): pure.

t_q = L_comm / R_q^down + L_comp / C_q + L_comm / R_q^up                      (Eq. 6)

Units throughout: rates in bits/s, payloads in bytes (converted with BITS_PER_BYTE where they
meet a rate), compute in FLOPs and FLOP/s, powers in W, noise in W/Hz. Randomness comes only
from a numpy Generator passed in. Used by `--latency model` to compare with the measured links.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BITS_PER_BYTE = 8
# SiLU(x) = x * sigmoid(x) counted as exp, add, divide, multiply: eta in Eq. 4.
SILU_FLOPS_PER_ELEMENT = 4.0


@dataclass(frozen=True)
class ChannelScenario:
    """The paper's simulation setting (§IV-A); distances and device compute are our choice.

    The paper gives neither distances, N0 nor device FLOPS. We spread 8 devices evenly from 50 m
    to 400 m (device q hosts expert q) and give each 10 TFLOP/s (a Jetson-Orin-class GPU at an
    achievable FP16 rate); N0 = -174 dBm/Hz is thermal noise at 290 K.
    """

    carrier_ghz: float = 3.5
    distances_m: tuple[float, ...] = (50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0)
    bs_power_w: float = 10.0  # downlink transmit power, P^d in Eq. 2
    device_power_w: float = 0.2  # uplink transmit power, P^u in Eq. 3
    total_bandwidth_hz: float = 100e6  # shared evenly among the devices
    noise_dbm_per_hz: float = -174.0  # N0
    device_flops: tuple[float, ...] = (10e12,) * 8  # C_q in Eq. 6, FLOP/s

    def __post_init__(self) -> None:
        if len(self.device_flops) != len(self.distances_m):
            raise ValueError(
                f"{len(self.distances_m)} distances but {len(self.device_flops)} device_flops"
            )

    @classmethod
    def from_dict(cls, table: dict) -> "ChannelScenario":
        """From a scenario file's [paper] table (defaults for missing keys; other keys are
        the caller's). Raises KeyError, TypeError or ValueError on bad values."""
        distances_m = tuple(float(d) for d in table.get("distances_m", cls.distances_m))
        flops = table.get("device_flops", cls.device_flops[0])
        device_flops = tuple(float(f) for f in flops) if isinstance(flops, (list, tuple)) \
            else (float(flops),) * len(distances_m)
        return cls(carrier_ghz=float(table.get("carrier_ghz", cls.carrier_ghz)),
                   distances_m=distances_m,
                   bs_power_w=float(table.get("bs_power_w", cls.bs_power_w)),
                   device_power_w=float(table.get("device_power_w", cls.device_power_w)),
                   total_bandwidth_hz=float(table.get("total_bandwidth_hz",
                                                      cls.total_bandwidth_hz)),
                   noise_dbm_per_hz=float(table.get("noise_dbm_per_hz", cls.noise_dbm_per_hz)),
                   device_flops=device_flops)

    @property
    def num_devices(self) -> int:
        return len(self.distances_m)

    @property
    def bandwidth_per_device_hz(self) -> float:
        """B_q: the total bandwidth split evenly (§IV-A)."""
        return self.total_bandwidth_hz / self.num_devices


def path_loss_db(distance_m, carrier_ghz: float):
    """PL(d) dB = 32.4 + 20 log10(f_GHz) + 20 log10(d_m) (§IV-A; free space with d in metres)."""
    return 32.4 + 20.0 * math.log10(carrier_ghz) + 20.0 * np.log10(distance_m)


def mean_amplitude_gain(path_loss_db_value):
    """The mean of the fading amplitude g: 10^(-PL/20) (§IV-A)."""
    return 10.0 ** (-np.asarray(path_loss_db_value, dtype=float) / 20.0)


def draw_rayleigh_gain(rng: np.random.Generator, path_loss_db_value, size=None):
    """One draw of the amplitude gain g, Rayleigh distributed with E[g] = 10^(-PL/20).

    A Rayleigh variable with scale s has mean s * sqrt(pi/2), so s = E[g] / sqrt(pi/2); the
    power gain g^2 then has mean 2 s^2 = (4/pi) * 10^(-PL/10). Shape: broadcast of PL and size.
    """
    scale = mean_amplitude_gain(path_loss_db_value) / math.sqrt(math.pi / 2.0)
    return rng.rayleigh(scale, size=size)


def dbm_to_w(dbm):
    """dBm to watts (also dBm/Hz to W/Hz)."""
    return 10.0 ** ((np.asarray(dbm, dtype=float) - 30.0) / 10.0)


def shannon_rate_bits_per_s(bandwidth_hz, power_w, gain, noise_w_per_hz):
    """R = B log2(1 + P g^2 / (N0 B)), Eq. 2 (downlink) and Eq. 3 (uplink); g is the amplitude."""
    snr = power_w * np.square(gain) / (noise_w_per_hz * bandwidth_hz)
    return bandwidth_hz * np.log2(1.0 + snr)


def expert_flops_per_token(
    hidden_size: int, ffn_hidden_size: int, activation_flops: float = SILU_FLOPS_PER_ELEMENT
) -> float:
    """L_comp of one token through one expert FFN, Eq. 4: 4 m m_h + 2 m_h m + eta m_h + m_h.

    m = hidden_size, m_h = ffn_hidden_size, eta = FLOPs of the activation function per element.
    6 m m_h are the three matmuls of SwiGLU at 2 FLOPs a multiply-add; the last m_h is the gate
    product.
    """
    m, m_h = hidden_size, ffn_hidden_size
    return 4.0 * m * m_h + 2.0 * m_h * m + activation_flops * m_h + m_h


def comm_bytes(hidden_size: int, tokens: int, bytes_per_element: float) -> float:
    """L_comm = eps * m per token (Eq. 5), eps = bytes per element of the wire dtype (2 for bf16).

    The paper's L_comm is one token's hidden vector; a layer's request carries `tokens` of them,
    and the reply (the expert output) is the same size.
    """
    return bytes_per_element * hidden_size * tokens


def modeled_latency_s(
    payload_bytes, compute_flops, rate_down_bits_per_s, rate_up_bits_per_s, device_flops
):
    """Eq. 6: send the activations down, compute, send the result up. Bytes become bits here."""
    payload_bits = BITS_PER_BYTE * np.asarray(payload_bytes, dtype=float)
    return (
        payload_bits / rate_down_bits_per_s
        + np.asarray(compute_flops, dtype=float) / device_flops
        + payload_bits / rate_up_bits_per_s
    )


def scenario_rates_bits_per_s(scenario: ChannelScenario, rng: np.random.Generator | None = None):
    """(downlink, uplink) rates [num_devices] for one channel realisation.

    With rng, the downlink and uplink amplitudes are independent Rayleigh draws (the paper's
    g_BS,q and g_q,BS are separate symbols); without, both are the mean amplitude (no fading).
    """
    pl_db = path_loss_db(np.asarray(scenario.distances_m, dtype=float), scenario.carrier_ghz)
    if rng is None:
        gain_down = gain_up = mean_amplitude_gain(pl_db)
    else:
        gain_down = draw_rayleigh_gain(rng, pl_db)
        gain_up = draw_rayleigh_gain(rng, pl_db)
    bandwidth_hz = scenario.bandwidth_per_device_hz
    noise = dbm_to_w(scenario.noise_dbm_per_hz)  # W/Hz
    rate_down = shannon_rate_bits_per_s(bandwidth_hz, scenario.bs_power_w, gain_down, noise)
    rate_up = shannon_rate_bits_per_s(bandwidth_hz, scenario.device_power_w, gain_up, noise)
    return rate_down, rate_up


def scenario_latency_s(
    scenario: ChannelScenario,
    hidden_size: int,
    ffn_hidden_size: int,
    tokens: int = 1,
    bytes_per_element: float = 2.0,
    rng: np.random.Generator | None = None,
    activation_flops: float = SILU_FLOPS_PER_ELEMENT,
):
    """t_q for every device (Eq. 6) for `tokens` tokens of one layer: the selector's latency [E].

    One expert per device, device q hosting expert q, as in the paper.
    """
    rate_down, rate_up = scenario_rates_bits_per_s(scenario, rng)
    payload_bytes = comm_bytes(hidden_size, tokens, bytes_per_element)
    flops = expert_flops_per_token(hidden_size, ffn_hidden_size, activation_flops)  # per token
    return modeled_latency_s(
        payload_bytes,
        flops * tokens,
        rate_down,
        rate_up,
        np.asarray(scenario.device_flops, dtype=float),
    )


# --- emulating a bigger model's deployment on our small one ------------------------------------

@dataclass(frozen=True)
class EmulatedModel:
    """The model whose deployment a testbed run emulates: its sizes set how long each expert
    call would take on the wire (Eq. 5) and on a device (Eq. 4), while routing and quality stay
    the real (small) model's."""

    name: str
    hidden_size: int  # m
    ffn_size: int  # m_h
    bytes_per_element: float = 2.0  # eps: bf16 activations on the wire

    @property
    def wire_bytes_per_token(self) -> float:
        return comm_bytes(self.hidden_size, 1, self.bytes_per_element)

    @property
    def flops_per_token(self) -> float:
        return expert_flops_per_token(self.hidden_size, self.ffn_size)


EMULATED_MODELS = {
    "mixtral-8x7b": EmulatedModel("Mixtral-8x7B", hidden_size=4096, ffn_size=14336),
    "mixtral-8x22b": EmulatedModel("Mixtral-8x22B", hidden_size=6144, ffn_size=16384),
    "olmoe-1b-7b": EmulatedModel("OLMoE-1B-7B", hidden_size=2048, ffn_size=1024),
    "qwen1.5-moe-a2.7b": EmulatedModel("Qwen1.5-MoE-A2.7B", hidden_size=2048, ffn_size=1408),
    "deepseek-v2-lite": EmulatedModel("DeepSeek-V2-Lite", hidden_size=2048, ffn_size=1408),
}


def emulated_compute_s_per_token(model: EmulatedModel, device_flops: float) -> float:
    """Eq. 4 / C_q: one token through one of the emulated model's experts on device q."""
    return model.flops_per_token / device_flops


def wire_slowdown(model: EmulatedModel, our_wire_bytes_per_token: float) -> float:
    """How many times more bytes the emulated model sends per token than ours: a link carrying
    our messages at R / slowdown takes as long as the emulated model's would at R."""
    return model.wire_bytes_per_token / our_wire_bytes_per_token


def modeled_token_latency_s(device_latency_s, kept_boxes_per_token) -> float:
    """Eqs. 7-8 for one layer call: each token waits for the slowest device it kept, and the
    tokens' latencies add up. device_latency_s [Q] (Eq. 6 for one token); kept_boxes_per_token:
    for each token, the devices it kept (may be empty: the residual alone)."""
    return float(sum(max((device_latency_s[q] for q in kept), default=0.0)
                     for kept in kept_boxes_per_token))
