"""What every links module and its callers share: one link's shape and the one error type."""

from __future__ import annotations

from dataclasses import dataclass


class TestbedError(Exception):
    """Something the user can fix; the message is one line."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class LinkShape:
    delay_ms: float = 0  # one-way, each direction
    jitter_ms: float = 0  # uniform ± around delay_ms
    loss_pct: float = 0  # each direction
    rate_mbit: float | None = None  # each direction; None = unlimited
    down: bool = False  # no packet passes (the agent stays alive)
    # One direction's own rate, in place of rate_mbit that way (None: rate_mbit): down is base
    # station -> agent, up is agent -> base station (the paper's downlink and uplink).
    wire_down_mbit: float | None = None
    wire_up_mbit: float | None = None

    @property
    def down_rate_mbit(self) -> float | None:
        """The rate base station -> agent (None: unlimited)."""
        return self.wire_down_mbit if self.wire_down_mbit is not None else self.rate_mbit

    @property
    def up_rate_mbit(self) -> float | None:
        """The rate agent -> base station (None: unlimited)."""
        return self.wire_up_mbit if self.wire_up_mbit is not None else self.rate_mbit

    def check(self) -> LinkShape:
        """Raises TestbedError for values no backend can apply."""
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise TestbedError("delay and jitter must be >= 0 ms")
        if not 0 <= self.loss_pct <= 100:
            raise TestbedError("loss must be within 0-100 %")
        for rate in (self.rate_mbit, self.wire_down_mbit, self.wire_up_mbit):
            if rate is not None and not rate > 0:
                raise TestbedError("rate must be > 0 mbit (or unlimited)")
        return self

    def describe(self) -> str:
        if self.down:
            return "DOWN"
        jitter = f" ±{self.jitter_ms:g}" if self.jitter_ms else ""
        down, up = self.down_rate_mbit, self.up_rate_mbit
        if down == up:
            rate = f"rate {down:g} mbit" if down else "rate unlimited"
        else:
            rate = " / ".join(f"{way} {f'{r:g} mbit' if r else 'unlimited'}"
                              for way, r in (("rate down", down), ("up", up)))
        return ", ".join([f"delay {self.delay_ms:g} ms{jitter}", f"loss {self.loss_pct:g} %",
                          rate])
