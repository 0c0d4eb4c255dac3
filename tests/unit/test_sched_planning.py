"""`planning.plan`: the one decision function the scheduler loop and the simulator share."""

from __future__ import annotations

import ast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.cost_model import EngineCostModel
from bench.simulator import SimConfig, SimRequest, simulate
from services.scheduler import planning
from services.scheduler.estimator import PerGpuEstimators, ServiceRecord, ServiceTimeEstimator
from services.scheduler.planning import Dispatch, GpuState, plan
from services.scheduler.policy import (
    GpuSnapshot,
    PolicyConfig,
    WaitingRequest,
    admit_continuous,
    pool_for,
)
from services.scheduler.registry import POLICIES
from shared.settings import REPO_ROOT
from tests.factories import FixedPredictor, waiting_request

FLAT = EngineCostModel(step_base_s=0.01, step_per_seq_s=0.0, step_per_context_token_s=0.0,
                       prefill_step_s=0.1, prefill_per_token_s=0.0)


def _plan(name: str, waiting: list[WaitingRequest], gpus: list[GpuState], mode: str = "static",
          staged: int = 1) -> tuple[list[Dispatch], int]:
    config = PolicyConfig(name=name, engine_mode=mode)  # type: ignore[arg-type]
    pool = pool_for(config, waiting)
    dispatches = plan(config, pool, gpus, 100.0, ServiceTimeEstimator(), staged)
    return dispatches, len(pool)


def _check(dispatches: list[Dispatch], waiting: list[WaitingRequest], left: int) -> None:
    ids = [w.request_id for d in dispatches for w in d.members]
    assert len(ids) == len(set(ids)), "a request dispatched twice"
    assert len(ids) + left == len(waiting), "plan must remove exactly what it dispatches"
    for d in dispatches:
        assert d.held_kv_tokens and all(h >= 1 for h in d.held_kv_tokens)


def test_static_fills_running_and_staged_then_stops() -> None:
    waiting = [waiting_request(i, predicted=10 * (i + 1), queued_at=float(i)) for i in range(40)]
    dispatches, left = _plan("fcfs-fixed", waiting, [GpuState(0, 46_592)], staged=1)
    assert [len(d.members) for d in dispatches] == [8, 8]  # one running + one staged
    assert [w.request_id for w in dispatches[0].members] == [f"r{i}" for i in range(8)]
    _check(dispatches, waiting, left)
    full = GpuState(0, 46_592, inflight_batches=2)
    assert _plan("fcfs-fixed", waiting, [full], staged=1)[0] == []


def test_static_batch_records_caps_held_kv_and_demand() -> None:
    waiting = [waiting_request(i, predicted=20, queued_at=float(i), input_tokens=30 + i)
               for i in range(4)]
    (d, *_), left = _plan("magnus", waiting, [GpuState(0, 46_592)])
    assert d.token_caps == (20,) * 4
    assert d.held_kv_tokens == tuple(30 + i + 20 for i in range(4))
    assert d.kv_demand_tokens == 4 * (33 + 20)  # padded: size x (max input + max cap)
    assert d.estimated_service_s > 0
    _check([d], waiting, left)


def test_a_gpu_with_its_own_records_is_planned_with_its_own_speed() -> None:
    # GPU 1 (another node's, slower) has served 20 batches at 4x GPU 0's time for the same work.
    estimators = PerGpuEstimators(min_records=20)
    for i in range(40):
        gpu = i % 2
        estimators.observe(gpu, ServiceRecord(size=8, max_input_tokens=32, max_tokens=10 + i,
                                              measured_s=(1.0 if gpu == 0 else 4.0)))
    assert set(estimators.warm()) == {0, 1}
    assert estimators.for_gpu(7) is estimators.pooled  # a new GPU: the cluster's records
    config = PolicyConfig(name="fcfs-fixed", engine_mode="static")
    waiting = [waiting_request(i, predicted=60, queued_at=float(i), input_tokens=32)
               for i in range(16)]
    dispatches = plan(config, pool_for(config, waiting), [GpuState(0, 46_592),
                                                          GpuState(1, 46_592)],
                      100.0, estimators.pooled, staged_batches_per_gpu=0,
                      gpu_estimators=estimators.warm())
    by_gpu = {d.gpu: d.estimated_service_s for d in dispatches}
    assert by_gpu[1] == pytest.approx(4 * by_gpu[0], rel=0.05)
    pooled = estimators.pooled.estimate(8, 32, 60)  # beyond every record: neighbours of both
    assert by_gpu[0] < pooled < by_gpu[1]


def test_gpus_least_loaded_first() -> None:
    waiting = [waiting_request(i, predicted=10, queued_at=float(i)) for i in range(16)]
    gpus = [GpuState(0, 46_592, inflight_batches=1), GpuState(1, 46_592, inflight_batches=0)]
    dispatches, left = _plan("fcfs-fixed", waiting, gpus)
    assert [d.gpu for d in dispatches] == [1, 0]
    _check(dispatches, waiting, left)


def test_continuous_admits_once_within_budget_and_fcfs_sends_everyone() -> None:
    waiting = [waiting_request(i, predicted=100, queued_at=float(i), input_tokens=100)
               for i in range(10)]
    dispatches, left = _plan("magnus", waiting, [GpuState(0, 1_000, inflight_kv_tokens=200)],
                             mode="continuous")
    assert len(dispatches) == 1 and dispatches[0].estimated_service_s == 0.0
    assert 200 + sum(dispatches[0].held_kv_tokens) <= 1_000
    assert dispatches[0].kv_demand_tokens == sum(dispatches[0].held_kv_tokens)
    _check(dispatches, waiting, left)
    everyone, left = _plan("continuous-fcfs", waiting,
                           [GpuState(0, 1_000, inflight_kv_tokens=900)], mode="continuous")
    assert [len(d.members) for d in everyone] == [10] and left == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300)), min_size=1, max_size=30),
       st.integers(0, 3_000), st.integers(500, 4_000),
       st.sampled_from([n for n, s in POLICIES.items() if "continuous" in s.benchmarked_in]
                       + ["sjf-predicted", "magnus-no-hrrn"]))
def test_continuous_plan_admits_what_admit_continuous_admits(
        rows: list[tuple[int, int]], inflight: int, budget: int, name: str) -> None:
    """plan's cheap "nothing fits" shortcut never changes admission's answer."""
    waiting = [waiting_request(i, predicted=p, queued_at=float(i), input_tokens=n)
               for i, (p, n) in enumerate(rows)]
    config = PolicyConfig(name=name, engine_mode="continuous")
    direct = admit_continuous(config, pool_for(config, waiting), GpuSnapshot(0, budget),
                              inflight, 100.0, ServiceTimeEstimator())
    dispatches, left = _plan(name, waiting, [GpuState(0, budget, inflight_kv_tokens=inflight)],
                             mode="continuous")
    planned = [w for d in dispatches for w in d.members]
    assert [w.request_id for w in planned] == [w.request_id for w in direct]
    _check(dispatches, waiting, left)


def test_simulator_decides_only_through_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch the simulator runs came out of `planning.plan`."""
    calls: list[int] = []
    real_plan = planning.plan

    def spy(*args: object, **kwargs: object) -> list[Dispatch]:
        out = real_plan(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(len(out))
        return out

    monkeypatch.setattr(planning, "plan", spy)
    requests = [SimRequest(f"r{i}", "a", 0.1 * i, 10, 5, 8) for i in range(20)]
    for mode in ("static", "continuous"):
        calls.clear()
        result = simulate(requests, SimConfig(PolicyConfig("magnus", engine_mode=mode)),
                          FLAT, FixedPredictor(5, 6))
        assert calls and sum(calls) == len(result.batches), mode


def test_simulator_source_holds_no_decision_logic() -> None:
    """The simulator must not call the policy's decision functions itself (only plan does)."""
    tree = ast.parse((REPO_ROOT / "bench" / "simulator.py").read_text())
    decision_functions = {"decide_batch", "admit_continuous", "token_cap", "admission_tokens",
                          "fcfs_fixed", "adaptive_batches", "fixed_size_batches", "hrrn_pick",
                          "run_token_cap", "continuation_cap"}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not used & decision_functions, f"the simulator decides: {used & decision_functions}"
    assert "plan" in used



@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(1, 300), st.floats(0, 50)),
                min_size=1, max_size=40),
       st.lists(st.tuples(st.integers(500, 4_000), st.integers(0, 2_000)), min_size=1,
                max_size=5),
       st.sampled_from(["magnus", "magnus-oracle", "sjf-predicted", "magnus-no-hrrn"]))
def test_ranking_once_per_instant_admits_what_per_gpu_admission_admits(
        rows: list[tuple[int, int, float]], gpus: list[tuple[int, int]], name: str) -> None:
    """plan ranks the pool once and hands each GPU the next admissible prefix; asking
    admit_continuous GPU by GPU on the shrinking pool (what plan did before) gives the same."""
    waiting = [waiting_request(i, predicted=p, queued_at=q, input_tokens=n, true=p + 1)
               for i, (p, n, q) in enumerate(rows)]
    config = PolicyConfig(name=name, engine_mode="continuous")
    estimator = ServiceTimeEstimator()
    states = [GpuState(g, budget, inflight_kv_tokens=held)
              for g, (budget, held) in enumerate(gpus)]
    pool = pool_for(config, waiting)
    expected: list[tuple[int, list[str]]] = []
    for g in sorted(states, key=lambda s: (s.inflight_kv_tokens, s.gpu)):
        admitted = admit_continuous(config, pool, GpuSnapshot(g.gpu, g.kv_budget_tokens),
                                    g.inflight_kv_tokens, 100.0, estimator)
        if admitted:
            expected.append((g.gpu, [w.request_id for w in admitted]))
            pool.remove([w.request_id for w in admitted])
    pool = pool_for(config, waiting)
    got = plan(config, pool, states, 100.0, estimator)
    assert [(d.gpu, [w.request_id for w in d.members]) for d in got] == expected


def test_continuous_admission_stops_at_the_concurrency_cap() -> None:
    """A capped GPU takes at most its free slots; the rest stay in the pool, where the policy
    orders them (the shortest planned first here: all arrived together)."""
    waiting = [waiting_request(i, predicted=10 * (10 - i), queued_at=0.0, input_tokens=10)
               for i in range(10)]
    gpu = GpuState(0, 46_592, inflight_requests=1, max_running_requests=4)
    (d,), left = _plan("magnus", waiting, [gpu], mode="continuous")
    assert [w.request_id for w in d.members] == ["r9", "r8", "r7"]
    assert left == 7
    full = GpuState(0, 46_592, inflight_requests=4, inflight_kv_tokens=100,
                    max_running_requests=4)
    assert _plan("magnus", waiting, [full], mode="continuous")[0] == []
    # Plain vLLM has no cap: the engine holds everyone.
    everyone, left = _plan("continuous-fcfs", waiting, [full], mode="continuous")
    assert len(everyone[0].members) == 10 and left == 0


def test_cap_is_per_gpu_and_counts_this_instants_admissions() -> None:
    waiting = [waiting_request(i, predicted=20, queued_at=float(i)) for i in range(10)]
    gpus = [GpuState(0, 46_592, max_running_requests=3),
            GpuState(1, 46_592, inflight_requests=1, inflight_kv_tokens=5,
                     max_running_requests=3)]
    dispatches, left = _plan("magnus", waiting, gpus, mode="continuous")
    assert [(d.gpu, len(d.members)) for d in dispatches] == [(0, 3), (1, 2)]
    assert left == 5
    _check(dispatches, waiting, left)


def test_engine_priority_is_the_planned_length_only_for_vllm_priority() -> None:
    waiting = [waiting_request(i, predicted=p, queued_at=float(i))
               for i, p in enumerate([30, 5, 300])]
    (d,), _ = _plan("vllm-priority", waiting, [GpuState(0, 100, inflight_kv_tokens=90)],
                    mode="continuous")
    assert [w.request_id for w in d.members] == ["r0", "r1", "r2"]  # sent at once, in arrival
    assert d.engine_priorities == (30, 5, 300)  # the engine runs the shortest first
    (m,), _ = _plan("magnus", waiting, [GpuState(0, 46_592)], mode="continuous")
    assert set(m.engine_priorities) == {None}


def test_prompt_hrrn_ranks_by_prompt_not_by_prediction() -> None:
    """Requests that waited alike: the shortest prompt first, whatever the predictor says."""
    waiting = [waiting_request(0, predicted=5, queued_at=90.0, input_tokens=900),
               waiting_request(1, predicted=400, queued_at=90.0, input_tokens=20)]
    (d,), _ = _plan("prompt-hrrn", waiting, [GpuState(0, 46_592, max_running_requests=1)],
                    mode="continuous")
    assert [w.request_id for w in d.members] == ["r1"]
    (m,), _ = _plan("magnus", waiting, [GpuState(0, 46_592, max_running_requests=1)],
                    mode="continuous")
    assert [w.request_id for w in m.members] == ["r0"]
