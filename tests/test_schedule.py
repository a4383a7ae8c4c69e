"""PolynomialSchedule: values against the Zhu & Gupta formula worked by hand, and bad schedules."""

from __future__ import annotations

import pytest

from polaris_opt.errors import BadInput
from polaris_opt.schedule import PolynomialSchedule, ScheduleError

# s_i = 0, s_f = 0.9, t0 = 0, n·Δt = 100, Δt = 10: s_t = 0.9 - 0.9 · (1 - t/100)^3.
TEN_STEPS = PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=100, frequency=10)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (-5, 0.0),  # before t0: s_i
        (0, 0.0),  # t0 itself prunes to s_i
        (10, 0.9 - 0.9 * 0.729),  # (1 - 0.1)^3 = 0.729 -> 0.2439
        (19, 0.9 - 0.9 * 0.729),  # held until the next pruning step
        (50, 0.9 - 0.9 * 0.125),  # (1 - 0.5)^3 = 0.125 -> 0.7875
        (90, 0.9 - 0.9 * 0.001),  # 0.8991
        (100, 0.9),  # t0 + n·Δt: exactly s_f
        (10_000, 0.9),  # after the end: s_f
    ],
)
def test_sparsity_follows_the_cubic_formula(step, expected):
    assert TEN_STEPS.sparsity(step) == pytest.approx(expected, abs=1e-12)


def test_nonzero_start_and_offset_begin():
    # s_i = 0.5, s_f = 0.75, t0 = 20, n = 2, Δt = 20: halfway 0.75 - 0.25 · 0.5^3 = 0.71875.
    schedule = PolynomialSchedule(0.5, 0.75, begin_step=20, end_step=60, frequency=20)
    assert [schedule.sparsity(t) for t in (0, 20, 39, 40, 59, 60)] == pytest.approx(
        [0.5, 0.5, 0.5, 0.71875, 0.71875, 0.75]
    )


def test_power_one_is_linear():
    schedule = PolynomialSchedule(0.2, 0.6, begin_step=0, end_step=4, frequency=1, power=1)
    assert [schedule.sparsity(t) for t in range(5)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])


def test_pruning_steps():
    assert TEN_STEPS.steps() == list(range(0, 101, 10))
    assert TEN_STEPS.intervals == 10
    assert [t for t in range(-20, 130) if TEN_STEPS.is_pruning_step(t)] == TEN_STEPS.steps()


def test_sparsity_never_decreases():
    values = [TEN_STEPS.sparsity(t) for t in range(-1, 120)]
    assert values == sorted(values)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.0, 0.9, 0, 100, 10), "initial sparsity 1.0 is outside [0, 1)"),
        ((-0.1, 0.9, 0, 100, 10), "initial sparsity -0.1 is outside [0, 1)"),
        ((0.0, 1.0, 0, 100, 10), "final sparsity 1.0 is outside [0, 1)"),
        ((0.5, 0.3, 0, 100, 10), "final sparsity 0.3 is below the initial 0.5"),
        ((0.0, 0.9, -10, 100, 10), "begin step -10 is negative"),
        ((0.0, 0.9, 100, 100, 10), "end step 100 must come after begin step 100"),
        ((0.0, 0.9, 50, 10, 10), "end step 10 must come after begin step 50"),
        ((0.0, 0.9, 0, 100, 0), "frequency 0 must be a positive number of steps"),
        ((0.0, 0.9, 0, 100, 30), "= 100 is not a multiple of the frequency 30"),
    ],
)
def test_bad_schedules_say_what_is_wrong(args, message):
    with pytest.raises(ScheduleError) as caught:
        PolynomialSchedule(*args)
    assert message in str(caught.value)
    # Both kinds of caller catch it: the CLI (BadInput, exit code 2) and a training script (ValueError).
    assert isinstance(caught.value, BadInput) and isinstance(caught.value, ValueError)


def test_not_a_multiple_suggests_an_end_step():
    with pytest.raises(ScheduleError, match=r"try end step 120"):
        PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=100, frequency=30)


def test_bad_power():
    with pytest.raises(ScheduleError, match="power 0 must be positive"):
        PolynomialSchedule(0.0, 0.9, begin_step=0, end_step=100, frequency=10, power=0)
