"""HRRN, SJF and FCFS orderings (services/scheduler/ordering.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.batching import CandidateBatch
from services.scheduler.estimator import ServiceTimeEstimator
from services.scheduler.ordering import (
    batch_waits,
    hrrn_pick,
    pick_fcfs,
    pick_hrrn,
    pick_sjf,
    response_ratio,
)
from services.scheduler.policy import WaitingRequest


def _batch(size: int, max_predicted: int, oldest: float, mean: float | None = None,
           max_input: int = 50) -> CandidateBatch:
    members = tuple(WaitingRequest(f"r{i}", oldest, max_input, 1024, max_predicted,
                                   max_predicted) for i in range(size))
    return CandidateBatch(members=members, token_caps=(max_predicted,) * size,
                          max_input_tokens=max_input, max_predicted_tokens=max_predicted,
                          max_upper_tokens=max_predicted, kv_demand_tokens=0, waste_tokens=0,
                          useful_tokens=size * max_predicted, oldest_queued_at=oldest,
                          mean_queued_at=oldest if mean is None else mean)


@given(st.floats(0, 1e4), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_ratio_grows_with_wait_and_is_one_without_wait(wait: float, more: float,
                                                       service: float) -> None:
    assert response_ratio(0.0, service) == 1.0
    assert response_ratio(wait + more, service) > response_ratio(wait, service)


def test_ratio_guards_a_zero_service_and_a_negative_wait() -> None:
    assert response_ratio(1.0, 0.0) > 1e5
    assert response_ratio(-5.0, 2.0) == 1.0


def test_wait_definitions() -> None:
    batches = [_batch(2, 10, oldest=0.0, mean=6.0)]
    assert batch_waits(batches, now=10.0, wait="oldest").tolist() == [10.0]
    assert batch_waits(batches, now=10.0, wait="mean").tolist() == [4.0]


def test_hrrn_prefers_short_batches_at_equal_wait() -> None:
    estimator = ServiceTimeEstimator()
    batches = [_batch(4, 20, oldest=0.0), _batch(4, 400, oldest=0.0)]
    assert pick_hrrn(batches, now=5.0, estimator=estimator) is batches[0]


def test_hrrn_picks_an_old_long_batch_over_new_short_ones_after_enough_wait() -> None:
    estimator = ServiceTimeEstimator()
    long_service = estimator.estimate(1, 50, 400)
    short_service = estimator.estimate(8, 50, 20)
    now = 1000.0
    shorts = [_batch(8, 20, oldest=now - short_service) for _ in range(3)]  # ratio 2
    long_too_fresh = _batch(1, 400, oldest=now - 0.9 * long_service)  # ratio 1.9
    long_old = _batch(1, 400, oldest=now - 1.1 * long_service)  # ratio 2.1
    assert pick_hrrn([*shorts, long_too_fresh], now, estimator) is shorts[0]
    assert pick_hrrn([*shorts, long_old], now, estimator) is long_old
    pick = hrrn_pick([*shorts, long_old], now, estimator)
    assert pick.response_ratio == pytest.approx(2.1)
    assert pick.estimated_service_s == pytest.approx(long_service)


def test_sjf_and_fcfs() -> None:
    batches = [_batch(4, 300, oldest=1.0), _batch(4, 20, oldest=5.0), _batch(4, 20, oldest=3.0)]
    assert pick_sjf(batches) is batches[2]
    assert pick_fcfs(batches) is batches[0]
