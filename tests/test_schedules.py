"""Tests of prunescope.schedules: hand-computed targets, update steps, statelessness."""

from __future__ import annotations

import random

import pytest

from prunescope.errors import ConfigError, UnknownNameError
from prunescope.schedules import SCHEDULES, Gradual, Iterative, OneShot, build


def test_one_shot() -> None:
    schedule = OneShot(0.8, step=5)
    assert [schedule.sparsity_at(s) for s in (0, 4, 5, 6, 1000)] == [0.0, 0.0, 0.8, 0.8, 0.8]
    assert [s for s in range(100) if schedule.is_update(s)] == [5]
    assert OneShot(0.5).is_update(0) and OneShot(0.5).sparsity_at(0) == 0.5


def test_iterative_geometric() -> None:
    # density 0.25 reached in 2 rounds: 0.5 then 0.25 -> sparsity 0.5, 0.75
    schedule = Iterative(0.75, rounds=2, every=10, start=5)
    assert [schedule.sparsity_at(s) for s in (0, 4)] == [0.0, 0.0]
    assert [schedule.sparsity_at(s) for s in (5, 14, 15, 25, 1000)] == pytest.approx(
        [0.5, 0.5, 0.75, 0.75, 0.75])
    assert [s for s in range(100) if schedule.is_update(s)] == [5, 15]


def test_iterative_linear() -> None:
    schedule = Iterative(0.9, rounds=3, every=2, spacing="linear")
    assert [schedule.sparsity_at(s) for s in range(7)] == pytest.approx(
        [0.3, 0.3, 0.6, 0.6, 0.9, 0.9, 0.9])
    assert [s for s in range(20) if schedule.is_update(s)] == [0, 2, 4]
    assert [schedule.round_at(s) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]


def test_gradual_cubic_by_hand() -> None:
    # s = 0.9 + (0.1 - 0.9) (1 - progress)^3 at the last update on the grid start + k * every
    schedule = Gradual(final=0.9, start=10, end=50, every=10, initial=0.1)
    expected = {
        0: 0.0, 9: 0.0,                      # before start: dense
        10: 0.1, 19: 0.1,                    # progress 0
        20: 0.9 - 0.8 * 0.75 ** 3, 25: 0.9 - 0.8 * 0.75 ** 3,  # 0.5625
        30: 0.8, 40: 0.9 - 0.8 * 0.25 ** 3, 49: 0.8875,
        50: 0.9, 51: 0.9, 10_000: 0.9,       # end and after
    }
    assert {s: schedule.sparsity_at(s) for s in expected} == pytest.approx(expected)
    assert schedule.sparsity_at(20) == pytest.approx(0.5625)
    assert [s for s in range(100) if schedule.is_update(s)] == [10, 20, 30, 40, 50]


def test_gradual_reaches_final_at_end_off_the_grid() -> None:
    schedule = Gradual(final=0.5, start=0, end=25, every=10)
    assert [s for s in range(60) if schedule.is_update(s)] == [0, 10, 20, 25]
    assert schedule.sparsity_at(24) == pytest.approx(0.5 * (1 - 0.2 ** 3))  # still step 20's
    assert schedule.sparsity_at(25) == 0.5
    assert schedule.sparsity_at(0) == 0.0


SCHEDULE_CASES = [
    OneShot(0.7, step=3),
    Iterative(0.95, rounds=5, every=7, start=2),
    Iterative(0.5, rounds=4, every=3, spacing="linear"),
    Gradual(final=0.9, start=5, end=60, every=7, initial=0.2),
    Gradual(final=0.8, start=0, end=10, every=1),
]


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=repr)
def test_schedules_are_monotone_and_reach_their_target(schedule) -> None:
    values = [schedule.sparsity_at(s) for s in range(120)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(getattr(schedule, "sparsity", None)
                                       or getattr(schedule, "final", None))
    # the target only changes at update steps
    for step in range(1, 120):
        if values[step] != values[step - 1]:
            assert schedule.is_update(step)


@pytest.mark.parametrize("schedule", SCHEDULE_CASES, ids=repr)
def test_schedules_are_stateless(schedule) -> None:
    steps = list(range(120))
    forward = [(schedule.sparsity_at(s), schedule.is_update(s)) for s in steps]
    shuffled = steps[:]
    random.Random(0).shuffle(shuffled)
    answers = {s: (schedule.sparsity_at(s), schedule.is_update(s)) for s in shuffled}
    assert [answers[s] for s in steps] == forward
    twin = type(schedule)(**vars(schedule))
    assert [(twin.sparsity_at(s), twin.is_update(s)) for s in reversed(steps)] == forward[::-1]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Gradual(final=0.9, start=10, end=10),
        lambda: Gradual(final=0.9, start=10, end=5),
        lambda: Gradual(final=0.9, start=0, end=10, every=0),
        lambda: Gradual(final=1.0, start=0, end=10),
        lambda: Gradual(final=0.5, start=0, end=10, initial=0.6),
        lambda: Gradual(final=0.5, start=-1, end=10),
        lambda: Gradual(final=0.5, start=0, end=10.5),
        lambda: Iterative(0.9, rounds=0),
        lambda: Iterative(0.9, rounds=2, every=0),
        lambda: Iterative(0.9, rounds=2, spacing="cubic"),
        lambda: Iterative(1.0, rounds=2),
        lambda: OneShot(1.0),
        lambda: OneShot(-0.1),
        lambda: OneShot(0.5, step=True),
        lambda: build("gradual", final=0.5, start=0, end=10, bogus=1),
        lambda: build("iterative", sparsity=0.5),
    ],
)
def test_bad_arguments_are_config_errors(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_build_by_name() -> None:
    assert set(SCHEDULES.names()) == {"one_shot", "iterative", "gradual"}
    assert build("gradual", final=0.5, start=0, end=10) == Gradual(0.5, 0, 10)
    assert build("one_shot", sparsity=0.3) == OneShot(0.3)
    with pytest.raises(UnknownNameError, match="one_shot"):
        build("cubic")
