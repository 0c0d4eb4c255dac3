"""Properties of length-homogeneous adaptive batching (services/scheduler/batching.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.batching import (
    CandidateSet,
    EngineMode,
    LengthSortedPool,
    adaptive_batches,
    fixed_size_batches,
    run_token_cap,
)
from services.scheduler.policy import WaitingRequest
from tests.factories import waiting_request, waiting_requests

MAX_MODEL_LEN = 2048


def _groups(candidates: CandidateSet) -> list[tuple[int, int]]:
    return list(zip(candidates.starts.tolist(), candidates.ends.tolist(), strict=True))


def _demand(pool: LengthSortedPool, start: int, end: int, mode: EngineMode) -> int:
    inputs, caps = pool.input_tokens[start:end], pool.cap_tokens[start:end]
    if mode == "static":
        return (end - start) * (int(inputs.max()) + int(caps.max()))
    return int(inputs.sum() + caps.sum())


def _reference_partition(pool: LengthSortedPool, budget: int, mode: EngineMode,
                         fits_limit: object) -> list[tuple[int, int]]:
    """The obvious greedy: grow from the shortest one request at a time while all bounds hold."""
    assert callable(fits_limit)
    groups, start, n = [], 0, len(pool)
    while start < n:
        end = start + 1
        while end < n and fits_limit(start, end + 1) and _demand(pool, start, end + 1,
                                                                  mode) <= budget:
            end += 1
        groups.append((start, end))
        start = end
    return groups


def _check_partition(pool: LengthSortedPool, candidates: CandidateSet, budget: int) -> None:
    groups = _groups(candidates)
    covered = [i for start, end in groups for i in range(start, end)]
    assert covered == list(range(len(pool))), "groups must partition the pool, in order"
    ids = [m.request_id for batch in candidates for m in batch.members]
    assert sorted(ids) == sorted(w.request_id for w in pool), "each request in exactly one batch"
    for batch in candidates:
        assert batch.kv_demand_tokens <= budget or batch.size == 1, "over budget"
        assert batch.size >= 1


@settings(max_examples=150, deadline=None)
@given(waiting_requests(), st.integers(200, 20_000), st.sampled_from(["static", "continuous"]),
       st.sampled_from([0.0, 0.25, 0.5, 2.0]), st.sampled_from([0, 16]),
       st.integers(1, 64), st.booleans())
def test_adaptive_batches_partition_within_budget_and_match_the_obvious_greedy(
        waiting: list[WaitingRequest], budget: int, mode: EngineMode, ratio: float, slack: int,
        max_batch: int, oracle: bool) -> None:
    pool = LengthSortedPool(waiting, max_model_len=MAX_MODEL_LEN, oracle=oracle)
    candidates = adaptive_batches(pool, budget, engine_mode=mode, max_waste_ratio=ratio,
                                  waste_slack_tokens=slack, max_batch_size=max_batch)
    _check_partition(pool, candidates, budget)
    predicted = pool.predicted_tokens

    def within_waste_and_size(start: int, end: int) -> bool:
        longest_allowed = math.floor((1 + ratio) * int(predicted[start]) + slack)
        return end - start <= max_batch and int(predicted[end - 1]) <= longest_allowed

    assert _groups(candidates) == _reference_partition(pool, budget, mode, within_waste_and_size)
    for batch in candidates:
        assert batch.waste_tokens <= ratio * batch.useful_tokens + slack * batch.size + 1e-9
        assert batch.max_predicted_tokens == max(
            pool.predicted_tokens[pool.index(m)] for m in batch.members)


@settings(max_examples=150, deadline=None)
@given(waiting_requests(), st.integers(200, 20_000), st.sampled_from(["static", "continuous"]),
       st.integers(1, 16))
def test_fixed_size_batches_are_length_sorted_groups_of_at_most_b_within_budget(
        waiting: list[WaitingRequest], budget: int, mode: EngineMode, batch_size: int) -> None:
    pool = LengthSortedPool(waiting, max_model_len=MAX_MODEL_LEN)
    candidates = fixed_size_batches(pool, batch_size, budget, engine_mode=mode)
    _check_partition(pool, candidates, budget)
    assert _groups(candidates) == _reference_partition(
        pool, budget, mode, lambda start, end: end - start <= batch_size)


def test_static_demand_is_size_times_longest_input_plus_longest_cap() -> None:
    pool = LengthSortedPool([waiting_request(0, 10, 0.0, input_tokens=100),
                             waiting_request(1, 11, 0.0, input_tokens=20, upper=30)],
                            max_model_len=MAX_MODEL_LEN)
    (batch,) = adaptive_batches(pool, 10_000)
    assert batch.kv_demand_tokens == 2 * (100 + 30)
    (batch,) = adaptive_batches(pool, 10_000, engine_mode="continuous")
    assert batch.kv_demand_tokens == (100 + 10) + (20 + 30)
    assert batch.waste_tokens == 1 and batch.useful_tokens == 21


def test_budget_splits_a_homogeneous_pool() -> None:
    pool = LengthSortedPool([waiting_request(i, 100, 0.0, input_tokens=100) for i in range(10)],
                            max_model_len=MAX_MODEL_LEN)
    candidates = adaptive_batches(pool, 4 * 200)
    assert candidates.size.tolist() == [4, 4, 2]


def test_waste_bound_separates_short_from_long() -> None:
    pool = LengthSortedPool([waiting_request(0, 10, 0.0, input_tokens=10),
                             waiting_request(1, 12, 0.0, input_tokens=10),
                             waiting_request(2, 400, 0.0, input_tokens=10),
                             waiting_request(3, 410, 0.0, input_tokens=10)],
                            max_model_len=MAX_MODEL_LEN)
    candidates = adaptive_batches(pool, 100_000, max_waste_ratio=0.25, waste_slack_tokens=0)
    assert [[m.request_id for m in b.members] for b in candidates] == [["r0", "r1"], ["r2", "r3"]]


def test_a_request_alone_over_budget_is_a_batch_of_one_not_dropped() -> None:
    pool = LengthSortedPool([waiting_request(0, 100, 0.0, input_tokens=1500),
                             waiting_request(1, 100, 0.0, input_tokens=10),
                             waiting_request(2, 100, 0.0, input_tokens=10)],
                            max_model_len=MAX_MODEL_LEN)
    candidates = adaptive_batches(pool, 500)
    sizes = {b.members[0].request_id: b.size for b in candidates if b.size == 1}
    assert sizes.get("r0") == 1 and sum(b.size for b in candidates) == 3
    assert candidates.over_budget(500).sum() == 1


def test_a_prompt_longer_than_the_context_is_refused() -> None:
    with pytest.raises(AssertionError, match="does not fit"):
        LengthSortedPool([waiting_request(0, 10, 0.0, input_tokens=MAX_MODEL_LEN)],
                         max_model_len=MAX_MODEL_LEN)


def test_cap_is_upper_within_max_tokens_and_context() -> None:
    req = WaitingRequest("r", 0.0, input_tokens=2000, max_tokens=100, predicted_tokens=30,
                         upper_tokens=90, true_output_tokens=70)
    assert run_token_cap(req) == 90
    assert run_token_cap(req, oracle=True) == 70
    assert run_token_cap(req, max_model_len=2048) == 48
    assert run_token_cap(WaitingRequest("s", 0.0, 10, 50, 30, 90)) == 50


@settings(max_examples=100, deadline=None)
@given(waiting_requests(max_size=40), st.lists(st.integers(0, 39), max_size=30),
       st.integers(0, 40))
def test_pool_kept_by_add_and_remove_equals_a_fresh_pool(
        waiting: list[WaitingRequest], removals: list[int], split: int) -> None:
    pool = LengthSortedPool(waiting[:split], max_model_len=MAX_MODEL_LEN)
    for request in waiting[split:]:
        pool.add(request)
    removed_ids = {f"r{i}" for i in removals}
    pool.remove(removed_ids)
    kept = [w for w in waiting if w.request_id not in removed_ids]
    fresh = LengthSortedPool(kept, max_model_len=MAX_MODEL_LEN)
    assert list(pool) == list(fresh)
    for column in ("predicted_tokens", "input_tokens", "cap_tokens", "queued_at"):
        assert np.array_equal(getattr(pool, column), getattr(fresh, column))
    assert all(pool.has(w.request_id) for w in kept)
    assert not any(pool.has(i) for i in removed_ids)


def test_pool_refuses_a_request_twice() -> None:
    pool = LengthSortedPool([waiting_request(0, 10, 0.0, input_tokens=10)],
                            max_model_len=MAX_MODEL_LEN)
    with pytest.raises(AssertionError, match="twice"):
        pool.add(waiting_request(0, 10, 0.0, input_tokens=10))


def test_empty_pool_has_no_candidates() -> None:
    pool = LengthSortedPool([], max_model_len=MAX_MODEL_LEN)
    assert len(adaptive_batches(pool, 1000)) == 0
    assert len(fixed_size_batches(pool, 4, 1000)) == 0
