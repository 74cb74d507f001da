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


def hold_for(predicate: Callable[[], object], window_s: float,
             interval_s: float = DEFAULT_INTERVAL_S,
             what: str | Callable[[], str] | None = None) -> None:
    """The negative of wait_until, for "nothing bad happens within the window" (a crash that
    would come at a later heartbeat, a cut that must not follow): poll `predicate()` through
    `window_s` and fail the test naming `what` at its first falsy value, not at the end."""
    deadline = time.monotonic() + window_s
    while True:
        value = predicate()
        if not value:
            name = what() if callable(what) else what
            name = name or getattr(predicate, "__name__", repr(predicate))
            pytest.fail(f"{name} stopped holding within {window_s} s; value {value!r}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval_s)
