"""The one way tests wait: poll a condition until a deadline, never sleep a guessed time."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")

# Generous on purpose: a deadline only bounds a hang, so it is sized for a loaded 2-core machine
# running two test suites at once, not for an idle one.
DEFAULT_TIMEOUT_S = 120.0  # for one request through a base station
DEFAULT_INTERVAL_S = 0.01


def wait_until(predicate: Callable[[], T], timeout_s: float = DEFAULT_TIMEOUT_S,
               interval_s: float = DEFAULT_INTERVAL_S,
               what: str | Callable[[], str] | None = None) -> T:
    """Poll `predicate()` until it returns something truthy and return that value; fail the test
    naming `what` (or the predicate) if it is still falsy after `timeout_s`. `what` may be a
    function, called only then (to show a log as it is at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            name = what() if callable(what) else what
            name = name or getattr(predicate, "__name__", repr(predicate))
            pytest.fail(f"waited {timeout_s} s for {name}; last value {value!r}")
        time.sleep(interval_s)
