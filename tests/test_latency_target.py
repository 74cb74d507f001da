"""θ per token from a latency target (basestation/latency_target.py): hand numbers and a
simulated link where two θs straddle the target."""

import pytest

from basestation.latency_target import THETA_LADDER, choose, expected_ms, observe, start


def test_first_token_is_exact_then_the_floor_is_learned():
    state = start(20.0)
    assert choose(state) == (0.0, None, True)
    state = observe(state, 0.0, 30.0)
    # budget 20 x 2 - 30 = 10: nothing measured fits, so the top of the ladder is tried
    assert choose(state).theta == 0.5
    state = observe(state, 0.5, 12.0)
    # budget 60 - 42 = 18; the line 30 -> 12 over the ladder's 13 steps: 30 - 18 i / 13 <= 18
    # from i = 9 (θ = 0.15, 17.54 ms)
    assert THETA_LADDER[9] == 0.15 and len(THETA_LADDER) == 14
    choice = choose(state)
    assert choice.theta == pytest.approx(0.15) and choice.expected_ms == pytest.approx(
        30 - 18 * 9 / 13)
    assert choice.feasible


def test_expected_interpolates_and_assumes_no_gain_above_what_was_measured():
    state = observe(observe(start(10.0), 0.0, 30.0), 0.1, 20.0)  # levels 0 and 8
    expected = expected_ms(state)
    assert expected[0] == 30.0 and expected[8] == 20.0
    assert expected[4] == pytest.approx(25.0)
    assert expected[13] == 20.0


def test_ewma_of_a_level():
    state = observe(observe(start(10.0), 0.0, 10.0), 0.0, 20.0)
    assert state.measured_ms[0] == pytest.approx(13.0)  # 10 + 0.3 x 10
    assert state.tokens == 2 and state.spent_ms == 30.0


def test_infeasible_target_gets_the_floor_and_says_so():
    state = observe(observe(start(5.0), 0.0, 30.0), 0.5, 12.0)
    choice = choose(state)
    assert choice.theta == 0.5 and not choice.feasible


def test_a_loose_target_never_drops():
    state = start(100.0)
    for _ in range(20):
        choice = choose(state)
        assert choice.theta == 0.0
        state = observe(state, choice.theta, 30.0)


def test_mean_lands_on_a_target_between_two_levels():
    # a link where θ below 0.2 costs 30 ms a token and from 0.2 on 14 ms: a target of 20 ms
    # is met by mixing the two, with fewer fast (dropping) tokens than slow ones would allow
    def latency(theta):
        return 30.0 if theta < 0.2 else 14.0

    state, thetas = start(20.0), []
    for _ in range(200):
        theta = choose(state).theta
        thetas.append(theta)
        state = observe(state, theta, latency(theta))
    assert state.mean_ms == pytest.approx(20.0, rel=0.03)
    dropping = sum(t >= 0.2 for t in thetas) / len(thetas)
    assert dropping == pytest.approx(10 / 16, abs=0.05)  # 30 (1 - f) + 14 f = 20
    assert set(thetas) <= set(THETA_LADDER)


def test_bad_target():
    with pytest.raises(ValueError):
        start(0)
