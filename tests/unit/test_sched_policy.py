"""The policy entry points (services/scheduler/policy.py), driven by a fake clock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.estimator import ServiceTimeEstimator
from services.scheduler.ordering import WaitDefinition
from services.scheduler.policy import (
    Decision,
    GpuSnapshot,
    PolicyConfig,
    WaitingRequest,
    admission_tokens,
    admit_continuous,
    continuation_cap,
    decide_batch,
    fcfs_fixed,
    pool_for,
    token_cap,
)
from services.scheduler.registry import POLICIES
from tests.factories import waiting_request, waiting_requests

ALL_POLICIES: tuple[str, ...] = tuple(POLICIES)


def _drain(config: PolicyConfig, waiting: list[WaitingRequest], budget: int,
           keep_pool: bool) -> list[Decision]:
    """Decide, dispatch (remove) and advance a fake clock by the estimate, until nobody waits."""
    estimator = ServiceTimeEstimator()
    gpu = GpuSnapshot(gpu=0, kv_budget_tokens=budget)
    pool = pool_for(config, waiting)
    remaining: list[WaitingRequest] = list(waiting)
    now, decisions = 100.0, []
    for _ in range(len(waiting)):
        view: Sequence[WaitingRequest] = pool if keep_pool else remaining
        decision = decide_batch(config, view, gpu, now, estimator)
        assert decision is not None
        ids = [m.request_id for m in decision.members]
        assert len(set(ids)) == len(ids), "a request twice in one batch"
        assert set(ids) <= {w.request_id for w in view}, "dispatched someone not waiting"
        if config.spec.batching not in ("arrival-fixed", "everyone"):
            assert decision.batch.kv_demand_tokens <= budget or decision.batch.size == 1
        assert decision.estimated_service_s > 0 and decision.response_ratio >= 1.0
        assert len(decision.token_caps) == len(ids)
        decisions.append(decision)
        pool.remove(ids)
        remaining = [w for w in remaining if w.request_id not in set(ids)]
        now += decision.estimated_service_s
        if not remaining:
            break
    assert decide_batch(config, pool if keep_pool else remaining, gpu, now, estimator) is None
    return decisions


@settings(max_examples=60, deadline=None)
@given(waiting_requests(max_size=40), st.sampled_from(ALL_POLICIES), st.integers(1500, 20_000),
       st.booleans(), st.sampled_from(get_args(WaitDefinition)))
def test_every_request_is_dispatched_exactly_once(
        waiting: list[WaitingRequest], name: str, budget: int, keep_pool: bool,
        wait: WaitDefinition) -> None:
    config = PolicyConfig(name=name, batch_size=4, hrrn_wait=wait)
    decisions = _drain(config, waiting, budget, keep_pool)
    dispatched = [m.request_id for d in decisions for m in d.members]
    assert sorted(dispatched) == sorted(w.request_id for w in waiting)


def test_no_decision_when_nobody_waits() -> None:
    assert decide_batch(PolicyConfig(), [], GpuSnapshot(0, 1000), 0.0,
                        ServiceTimeEstimator()) is None


def test_fcfs_fixed_decision_is_fcfs_fixed() -> None:
    waiting = [waiting_request(i, 10 * (5 - i), queued_at=float(i)) for i in range(5)]
    decision = decide_batch(PolicyConfig(name="fcfs-fixed", batch_size=3), waiting,
                            GpuSnapshot(0, 10_000), 10.0, ServiceTimeEstimator())
    assert decision is not None
    assert list(decision.members) == fcfs_fixed(waiting, 3)
    assert decision.token_caps == (1024, 1024, 1024), "baselines run to max_tokens"


def test_magnus_groups_by_length_and_sjf_takes_the_shortest() -> None:
    waiting = [waiting_request(0, 400, 0.0), waiting_request(1, 10, 5.0),
               waiting_request(2, 405, 1.0), waiting_request(3, 12, 6.0)]
    gpu, estimator = GpuSnapshot(0, 100_000), ServiceTimeEstimator()
    magnus = decide_batch(PolicyConfig(waste_slack_tokens=0), waiting, gpu, 6.0, estimator)
    assert magnus is not None and magnus.candidates == 2
    assert {m.request_id for m in magnus.members} == {"r1", "r3"}, "short batch, equal-ish waits"
    sjf = decide_batch(PolicyConfig(name="sjf-predicted", batch_size=2), waiting, gpu, 6.0,
                       estimator)
    assert sjf is not None and {m.request_id for m in sjf.members} == {"r1", "r3"}
    no_hrrn = decide_batch(PolicyConfig(name="magnus-no-hrrn", waste_slack_tokens=0), waiting,
                           gpu, 6.0, estimator)
    assert no_hrrn is not None and {m.request_id for m in no_hrrn.members} == {"r0", "r2"}


def test_oracle_plans_with_true_lengths() -> None:
    # Predicted alike, truly apart: the oracle splits them, magnus does not.
    waiting = [waiting_request(0, 100, 0.0, true=10), waiting_request(1, 100, 0.0, true=400)]
    gpu, estimator = GpuSnapshot(0, 100_000), ServiceTimeEstimator()
    magnus = decide_batch(PolicyConfig(), waiting, gpu, 1.0, estimator)
    oracle = decide_batch(PolicyConfig(name="magnus-oracle"), waiting, gpu, 1.0, estimator)
    assert magnus is not None and magnus.batch.size == 2
    assert oracle is not None and oracle.candidates == 2
    assert oracle.members[0].request_id == "r0" and oracle.token_caps == (10,)


def test_continuation_cap_and_token_cap() -> None:
    request = WaitingRequest("r", 0.0, input_tokens=100, max_tokens=200, predicted_tokens=80,
                             upper_tokens=120, true_output_tokens=90)
    assert continuation_cap(request) == 120
    assert continuation_cap(WaitingRequest("s", 0.0, 100, 50, 40, 120)) == 50
    assert token_cap(PolicyConfig(name="magnus"), request) == 120
    assert token_cap(PolicyConfig(name="magnus-oracle"), request) == 90
    assert token_cap(PolicyConfig(name="fcfs-fixed"), request) == 200
    assert token_cap(PolicyConfig(name="magnus", max_model_len=150), request) == 50


def test_continuous_runs_are_not_capped_but_admission_reserves_the_planned_length() -> None:
    request = WaitingRequest("r", 0.0, input_tokens=100, max_tokens=200, predicted_tokens=80,
                             upper_tokens=120, true_output_tokens=90)
    magnus = PolicyConfig(name="magnus", engine_mode="continuous")
    oracle = PolicyConfig(name="magnus-oracle", engine_mode="continuous")
    cfcfs = PolicyConfig(name="continuous-fcfs", engine_mode="continuous")
    assert token_cap(magnus, request) == token_cap(oracle, request) == 200
    assert admission_tokens(magnus, request) == 100 + 120
    assert admission_tokens(oracle, request) == 100 + 90
    assert admission_tokens(cfcfs, request) == 100 + 200
    assert token_cap(PolicyConfig(name="magnus", engine_mode="continuous", max_model_len=150),
                     request) == 50


# --- continuous engine --------------------------------------------------------------------------
def test_continuous_fcfs_sends_everyone_in_arrival_order() -> None:
    waiting = [waiting_request(i, 100, queued_at=float(-i)) for i in range(5)]
    admitted = admit_continuous(PolicyConfig(name="continuous-fcfs", engine_mode="continuous"),
                                waiting, GpuSnapshot(0, 10), 10**6, 0.0, ServiceTimeEstimator())
    assert [w.request_id for w in admitted] == ["r4", "r3", "r2", "r1", "r0"]


@settings(max_examples=80, deadline=None)
@given(waiting_requests(max_size=40), st.sampled_from(ALL_POLICIES), st.integers(500, 20_000),
       st.integers(0, 5000))
def test_admission_stays_within_budget_and_drains(waiting: list[WaitingRequest],
                                                  name: str, budget: int,
                                                  inflight: int) -> None:
    config = PolicyConfig(name=name, engine_mode="continuous")
    gpu, estimator = GpuSnapshot(0, budget), ServiceTimeEstimator()
    admitted = admit_continuous(config, waiting, gpu, inflight, 0.0, estimator)
    ids = [w.request_id for w in admitted]
    assert len(set(ids)) == len(ids)
    demand = sum(admission_tokens(config, w) for w in admitted)
    if config.spec.admission == "everyone":
        assert len(admitted) == len(waiting)
    elif admitted and not (inflight == 0 and len(admitted) == 1):
        assert inflight + demand <= budget
    # With nothing in flight every call admits someone, so repeated calls drain the pool.
    remaining, now = list(waiting), 0.0
    for _ in range(len(waiting)):
        if not remaining:
            break
        chosen = {w.request_id for w in admit_continuous(config, remaining, gpu, 0, now,
                                                         estimator)}
        assert chosen
        remaining = [w for w in remaining if w.request_id not in chosen]
        now += 1.0
    assert not remaining


def test_continuous_magnus_ranks_by_response_ratio() -> None:
    waiting = [waiting_request(0, 400, queued_at=0.0), waiting_request(1, 10, queued_at=9.0)]
    config = PolicyConfig(name="magnus", engine_mode="continuous")
    estimator = ServiceTimeEstimator()
    fresh = admit_continuous(config, waiting, GpuSnapshot(0, 10_000), 0, 10.0, estimator)
    assert [w.request_id for w in fresh] == ["r1", "r0"]
    # Once the long one has waited twice its own service time, it goes before a fresh short one.
    later = 2 * estimator.estimate(1, 50, 400)
    waiting = [waiting_request(0, 400, queued_at=0.0),
               waiting_request(1, 10, queued_at=later - 0.1)]
    old = admit_continuous(config, waiting, GpuSnapshot(0, 10_000), 0, later, estimator)
    assert [w.request_id for w in old] == ["r0", "r1"]
    # Head-of-line: a request that does not fit stops admission (no overtaking).
    tight = admit_continuous(config, waiting, GpuSnapshot(0, 470), 0, later, estimator)
    assert [w.request_id for w in tight] == ["r0"]
    blocked = admit_continuous(config, waiting, GpuSnapshot(0, 470), 100, later, estimator)
    assert blocked == []


# --- starvation ---------------------------------------------------------------------------------
SHORT_EVERY_S = 0.2
STREAM_S = 120.0


def _stream_until_long_dispatched(config: PolicyConfig) -> tuple[float | None, float, int]:
    """One long request among a steady stream of short ones on one static GPU.

    Returns (when the long one was dispatched or None, the longest short batch's service time,
    the most shorts in one batch). Batches take exactly their estimate.
    """
    estimator = ServiceTimeEstimator()
    gpu = GpuSnapshot(0, 46_000)
    pool = pool_for(config, [waiting_request(0, 400, 0.0)])
    # Shorts already wait beside it at t = 0, then keep arriving every SHORT_EVERY_S.
    arrivals = [waiting_request(i, 20, queued_at=max(0.0, (i - 5) * SHORT_EVERY_S))
                for i in range(1, int(STREAM_S / SHORT_EVERY_S))]
    now, next_arrival, longest_short_s, most_shorts = 0.0, 0, 0.0, 0
    while now < STREAM_S:
        while next_arrival < len(arrivals) and arrivals[next_arrival].queued_at <= now:
            pool.add(arrivals[next_arrival])
            next_arrival += 1
        decision = decide_batch(config, pool, gpu, now, estimator)
        if decision is None:
            now = arrivals[next_arrival].queued_at
            continue
        ids = [m.request_id for m in decision.members]
        if "r0" in ids:
            return now, longest_short_s, most_shorts
        longest_short_s = max(longest_short_s, decision.estimated_service_s)
        most_shorts = max(most_shorts, len(ids))
        pool.remove(ids)
        now += decision.estimated_service_s
    return None, longest_short_s, most_shorts


@pytest.mark.parametrize("wait", ["oldest", "mean"])
def test_hrrn_dispatches_a_long_request_under_a_stream_of_short_ones_within_its_bound(
        wait: WaitDefinition) -> None:
    """Bound, from HRRN: the long request (service S_L) is picked at the first decision where its
    ratio 1 + w/S_L is the highest. While the stream keeps up, a short batch's oldest member has
    waited at most one short batch plus one arrival gap, so its ratio is at most
    rho = 1 + (T_max + gap) / T_min (T: short batch service times). Hence the long request waits
    at most (rho - 1) x S_L, plus the short batch running when it crosses that: T_max."""
    dispatched_at, longest_short_s, most_shorts = _stream_until_long_dispatched(
        PolicyConfig(name="magnus", hrrn_wait=wait))
    estimator = ServiceTimeEstimator()
    service_long = estimator.estimate(1, 50, 400)
    assert most_shorts <= 10, "the stream keeps up: short batches stay small"
    t_min, t_max = estimator.estimate(1, 50, 20), estimator.estimate(10, 50, 20)
    assert longest_short_s <= t_max
    rho = 1 + (t_max + SHORT_EVERY_S) / t_min
    bound = (rho - 1) * service_long + t_max
    assert dispatched_at is not None and dispatched_at > 0, "it had to wait for the shorts"
    assert dispatched_at <= bound, f"waited {dispatched_at:.1f}s, bound {bound:.1f}s"
    assert bound < 3 * service_long  # the bound is about 2 x its own service time here


def test_config_rejects_nonsense() -> None:
    with pytest.raises(AssertionError):
        PolicyConfig(batch_size=0)
    with pytest.raises(AssertionError):
        PolicyConfig(max_waste_ratio=-1.0)
