"""The policy registry, and the check every registered policy gets for free: it runs in the
simulator (through the scheduler's own `plan`) in both engine modes and loses no request."""

from __future__ import annotations

from typing import get_args

import pytest

from bench.cost_model import EngineCostModel
from bench.metrics import CONTINUOUS_POLICIES, STATIC_POLICIES
from bench.simulator import SimConfig, SimRequest, simulate
from services.scheduler.batching import EngineMode
from services.scheduler.policy import PolicyConfig
from services.scheduler.registry import (
    POLICIES,
    Batching,
    Ordering,
    PolicySpec,
    get_policy,
    policy_names,
)
from tests.factories import FixedPredictor

CPU_LIKE = EngineCostModel(step_base_s=0.025, step_per_seq_s=0.0015,
                           step_per_context_token_s=2e-6, prefill_step_s=0.01,
                           prefill_per_token_s=4e-4)


def test_unknown_policy_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'magnus2'.*magnus-oracle"):
        get_policy("magnus2")
    with pytest.raises(ValueError, match="unknown policy"):
        PolicyConfig(name="magnus2")


def test_specs_are_consistent() -> None:
    for name, spec in POLICIES.items():
        assert spec.name == name
        assert spec.batching in get_args(Batching) and spec.ordering in get_args(Ordering)
        assert spec.benchmarked_in and spec.summary
    with pytest.raises(AssertionError, match="cannot group by length"):
        PolicySpec("bad", "adaptive", "fcfs", "none", "budget", frozenset({"static"}), "x")


def test_benchmark_lists_come_from_the_registry() -> None:
    assert policy_names("static") == STATIC_POLICIES
    assert policy_names("continuous") == CONTINUOUS_POLICIES
    assert set(STATIC_POLICIES) | set(CONTINUOUS_POLICIES) == set(POLICIES)
    assert STATIC_POLICIES[0] == "fcfs-fixed" and CONTINUOUS_POLICIES[0] == "continuous-fcfs"


def _workload() -> list[SimRequest]:
    lengths = [3, 40, 7, 120, 15, 60, 2, 90, 30, 5, 200, 11]
    return [SimRequest(f"r{i}", "a" if i % 2 else "b", 0.05 * i, 20 + 7 * i, n, 256,
                       oracle_tokens=n) for i, n in enumerate(lengths * 3)]


@pytest.mark.parametrize("mode", get_args(EngineMode))
@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_serves_everyone_in_the_simulator(name: str, mode: EngineMode) -> None:
    """Adding a policy to the registry adds it here: each request finishes once with its full
    length, on two GPUs with a KV budget small enough to bind."""
    requests = _workload()
    config = SimConfig(PolicyConfig(name=name, engine_mode=mode, batch_size=4), gpus=2,
                       kv_budget_tokens=2_048)
    result = simulate(requests, config, CPU_LIKE, FixedPredictor(30, 60))
    assert len(result.outcomes) == len(requests)
    assert all(o.status == "completed" and o.generated_tokens == o.true_tokens
               for o in result.outcomes)
    if mode == "static" and get_policy(name).batching in ("adaptive", "length-sorted-fixed"):
        assert all(b.kv_demand_tokens <= 2_048 or b.size == 1 for b in result.batches), name
