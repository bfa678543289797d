"""Reconnect and restart delays: doubling, capped, jittered, reset after a good run."""

from __future__ import annotations

import random

from broadcaster.backoff import Backoff


class _Top(random.Random):
    """Jitter pinned to the top of its range, so the underlying steps show."""

    def uniform(self, a: float, b: float) -> float:
        return b


class _Bottom(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return a


def test_delays_double_from_the_minimum():
    backoff = Backoff(1.0, 100.0, rng=_Top())

    assert [backoff.next_delay() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 16.0]


def test_delays_are_capped_at_the_maximum():
    backoff = Backoff(1.0, 30.0, rng=_Top())

    assert [backoff.next_delay() for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_can_halve_a_step_but_no_more():
    backoff = Backoff(2.0, 100.0, rng=_Bottom())

    assert [backoff.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_every_delay_lies_within_half_and_all_of_its_step():
    backoff = Backoff(0.5, 20.0, rng=random.Random(1234))
    steps = [min(20.0, 0.5 * 2**n) for n in range(40)]

    for step in steps:
        delay = backoff.next_delay()
        assert 0.5 * step <= delay <= step


def test_jitter_spreads_delays_across_the_range():
    backoff = Backoff(10.0, 10.0, rng=random.Random(99))

    delays = [backoff.next_delay() for _ in range(500)]

    assert all(5.0 <= d <= 10.0 for d in delays)
    assert min(delays) < 5.5 and max(delays) > 9.5
    assert len(set(delays)) > 450


def test_two_outputs_failing_together_do_not_retry_in_lockstep():
    first, second = Backoff(1.0, 30.0), Backoff(1.0, 30.0)

    assert [first.next_delay() for _ in range(6)] != [second.next_delay() for _ in range(6)]


def test_reset_starts_again_from_the_minimum():
    backoff = Backoff(1.0, 30.0, rng=_Top())
    for _ in range(6):
        backoff.next_delay()

    backoff.reset()

    assert backoff.attempt == 0
    assert backoff.next_delay() == 1.0


def test_attempts_are_counted_per_delay():
    backoff = Backoff(1.0, 30.0)
    for _ in range(3):
        backoff.next_delay()

    assert backoff.attempt == 3


def test_many_failures_never_overflow_and_stay_at_the_cap():
    backoff = Backoff(1.0, 60.0, rng=_Top())
    for _ in range(5000):
        delay = backoff.next_delay()

    assert delay == 60.0


def test_maximum_below_minimum_means_a_constant_minimum():
    backoff = Backoff(5.0, 1.0, rng=_Top())

    assert [backoff.next_delay() for _ in range(3)] == [5.0, 5.0, 5.0]
