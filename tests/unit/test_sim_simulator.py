"""The simulator: hand-computed tiny runs, conservation, one batch at a time per GPU in static
mode, the KV budget under magnus, preemption, continuations, determinism."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.cost_model import EngineCostModel
from bench.simulator import (
    AppMeanPredictor,
    Engine,
    EngineSeq,
    SimConfig,
    SimRequest,
    SimResult,
    simulate,
)
from services.scheduler.policy import PolicyConfig
from shared import keys
from tests.factories import FixedPredictor

# Decode steps of 10 ms whatever the batch, prefill steps of 100 ms whatever the tokens: easy
# to add up by hand.
FLAT = EngineCostModel(step_base_s=0.01, step_per_seq_s=0.0, step_per_context_token_s=0.0,
                       prefill_step_s=0.1, prefill_per_token_s=0.0)
CPU_LIKE = EngineCostModel(step_base_s=0.025, step_per_seq_s=0.0015,
                           step_per_context_token_s=2e-6, prefill_step_s=0.01,
                           prefill_per_token_s=4e-4)
STATIC = ["fcfs-fixed", "sjf-predicted", "magnus", "magnus-oracle", "magnus-no-hrrn",
          "magnus-fixed-batch"]
CONTINUOUS = ["continuous-fcfs", "magnus", "magnus-oracle", "sjf-predicted"]


def req(i: int, at: float, true: int, input_tokens: int = 10, max_tokens: int = 8,
        app: str = "a") -> SimRequest:
    return SimRequest(f"r{i}", app, at, input_tokens, true, max_tokens)


def run(requests: list[SimRequest], name: str = "magnus-oracle", mode: str = "static",
        predictor: FixedPredictor | AppMeanPredictor | None = None,
        cost: EngineCostModel = FLAT, **kw: float) -> SimResult:
    config = SimConfig(PolicyConfig(name=name, engine_mode=mode), **kw)  # type: ignore[arg-type]
    return simulate(requests, config, cost, predictor or FixedPredictor(8, 8))


def finished(result: SimResult) -> dict[str, float]:
    return {o.request_id: o.finished_at for o in result.outcomes if o.finished_at is not None}


# --- hand-computed cases ---------------------------------------------------------------------

def test_one_request_prefill_then_decode_steps() -> None:
    result = run([req(0, 0.0, true=5)])
    (o,) = result.outcomes
    # Prefill step 0.1 s gives the first token; 4 decode steps of 0.01 s give the other 4.
    assert o.first_token_at == pytest.approx(0.1)
    assert o.finished_at == pytest.approx(0.14)
    assert o.generated_tokens == 5 and o.continuations == 0
    assert result.engine_steps == 5


def test_static_second_batch_waits_for_the_first() -> None:
    result = run([req(0, 0.0, true=3), req(1, 0.05, true=2)], name="fcfs-fixed")
    done = finished(result)
    assert done["r0"] == pytest.approx(0.12)  # 0.1 prefill + 2 decode steps
    # r1 was staged at 0.05 and starts at 0.12: 0.1 prefill + 1 decode step.
    assert done["r1"] == pytest.approx(0.23)
    assert [b.size for b in result.batches] == [1, 1]


def test_continuous_joins_at_the_next_step_boundary() -> None:
    result = run([req(0, 0.0, true=3), req(1, 0.05, true=2)], name="continuous-fcfs",
                 mode="continuous")
    done = finished(result)
    # r0 prefills over [0, 0.1]; r1 arrived mid-step and prefills in the mixed step
    # [0.1, 0.11] (r0 decodes a token in it: 10 ms, prefill tokens are free here); then one
    # more step of both, after which both are done.
    assert done["r0"] == pytest.approx(0.12) and done["r1"] == pytest.approx(0.12)
    by_id = {o.request_id: o for o in result.outcomes}
    assert by_id["r1"].first_token_at == pytest.approx(0.11)


def test_continuation_after_a_capped_run() -> None:
    # Predicted 2, upper 3; it really generates 5: the first run stops at its cap of 3.
    result = run([req(0, 0.0, true=5)], name="magnus", predictor=FixedPredictor(2, 3))
    (o,) = result.outcomes
    assert o.continuations == 1 and o.generated_tokens == 5
    # Run 1: 0.1 + 2 x 0.01 = 0.12. Run 2 (prompt 13, 2 tokens left): 0.1 + 0.01.
    assert o.finished_at == pytest.approx(0.23)
    assert o.first_token_at == pytest.approx(0.22)  # its last run's, as the real view records
    assert [b.max_generated_tokens for b in result.batches] == [3, 2]
    assert [b.max_input_tokens for b in result.batches] == [10, 13]


def test_oracle_needs_no_continuation() -> None:
    result = run([req(0, 0.0, true=5)], name="magnus-oracle", predictor=FixedPredictor(2, 3))
    assert result.outcomes[0].continuations == 0


def test_waste_counts_idle_slots_of_a_static_batch() -> None:
    result = run([req(0, 0.0, true=2), req(1, 0.0, true=6)], name="fcfs-fixed")
    assert len(result.batches) == 1
    assert result.wasted_tokens == 2 * 6 - 8


def test_overheads_delay_starts() -> None:
    result = run([req(0, 0.0, true=5)], predict_latency_s=0.5, dispatch_overhead_s=0.25)
    assert result.outcomes[0].finished_at == pytest.approx(0.89)


# --- the engine alone ------------------------------------------------------------------------

def test_engine_preempts_the_latest_and_recomputes() -> None:
    engine = Engine(FLAT, kv_tokens=32, block_size=4, max_num_seqs=8)
    a, b = EngineSeq(1, prompt_tokens=8, target_tokens=12), EngineSeq(2, 8, 12)
    engine.add(a)
    engine.add(b)
    now, done = 0.0, []
    while engine.has_work:
        end = engine.start(now)
        assert end is not None
        now = end
        done += engine.finish()
        assert engine.total_blocks - engine.free_blocks <= engine.total_blocks
    assert engine.preemptions >= 1
    assert {s.run_id for s in done} == {1, 2}
    assert all(s.generated == 12 for s in done)
    assert a.finished_at is not None and b.finished_at is not None
    assert a.finished_at < b.finished_at  # the later one was preempted and waited


def test_engine_cut_ends_a_jump_at_the_first_boundary_after() -> None:
    engine = Engine(FLAT, kv_tokens=1024)
    engine.add(EngineSeq(1, 4, 50))
    engine.start(0.0)
    engine.finish()  # prefill, one token out at 0.1
    end = engine.start(0.1)
    assert end == pytest.approx(0.1 + 49 * 0.01)
    assert engine.cut(0.125) == pytest.approx(0.13)
    engine.finish()
    assert engine.running[0].generated == 4


# --- properties ------------------------------------------------------------------------------

workloads = st.lists(
    st.tuples(st.floats(0.0, 2.0), st.integers(1, 48), st.integers(1, 40), st.integers(0, 2)),
    min_size=1, max_size=25)


def requests_of(rows: list[tuple[float, int, int, int]]) -> list[SimRequest]:
    return [SimRequest(f"r{i}", f"app{app}", at, inp, true, 48)
            for i, (at, true, inp, app) in enumerate(rows)]


def check_conserved(requests: list[SimRequest], result: SimResult) -> None:
    assert [o.request_id for o in result.outcomes] == [r.request_id for r in requests]
    for r, o in zip(requests, result.outcomes, strict=True):
        assert o.status == "completed" and o.finished_at is not None
        assert o.finished_at >= r.arrival_s
        assert o.generated_tokens == r.true_tokens == o.true_tokens
    # Every run of every request belongs to exactly one batch.
    runs = sum(b.size for b in result.batches)
    assert runs == len(requests) + sum(o.continuations for o in result.outcomes)


def check_static_one_at_a_time(result: SimResult) -> None:
    by_gpu = defaultdict(list)
    for b in result.batches:
        by_gpu[b.gpu].append((b.started_at, b.finished_at))
    for spans in by_gpu.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end - 1e-12, "two batches ran at once on one GPU"


@settings(max_examples=25, deadline=None)
@given(rows=workloads, budget=st.integers(120, 600), gpus=st.integers(1, 3),
       staged=st.integers(0, 2), name=st.sampled_from(STATIC))
def test_static_conserves_and_runs_one_batch_at_a_time(
        rows: list[tuple[float, int, int, int]], budget: int, gpus: int, staged: int,
        name: str) -> None:
    requests = requests_of(rows)
    predictor = FixedPredictor(10, 20)
    result = run(requests, name=name, predictor=predictor, gpus=gpus, kv_budget_tokens=budget,
                 staged_batches_per_gpu=staged, block_size=1, cost=CPU_LIKE)
    check_conserved(requests, result)
    check_static_one_at_a_time(result)
    assert max(result.peak_kv_tokens) <= budget
    if name.startswith("magnus"):
        # Padded batches within budget (a lone oversize request aside) never overflow the cache.
        assert all(b.kv_demand_tokens <= budget or b.size == 1 for b in result.batches)
        assert result.preemptions == 0


@settings(max_examples=25, deadline=None)
@given(rows=workloads, budget=st.integers(120, 600), gpus=st.integers(1, 3),
       name=st.sampled_from(CONTINUOUS))
def test_continuous_conserves(rows: list[tuple[float, int, int, int]], budget: int, gpus: int,
                              name: str) -> None:
    requests = requests_of(rows)
    result = run(requests, name=name, mode="continuous", predictor=FixedPredictor(10, 20),
                 gpus=gpus, kv_budget_tokens=budget, block_size=1, cost=CPU_LIKE)
    check_conserved(requests, result)
    assert max(result.peak_kv_tokens) <= budget
    if name != "continuous-fcfs":
        # Continuous runs are not capped, so a request longer than its predicted bound may
        # outgrow its reservation and force a preemption. With bounds that hold, admission keeps
        # actual KV use within the budget and the engine never has to preempt.
        upper = max(r.true_tokens for r in requests)
        safe = run(requests, name=name, mode="continuous", predictor=FixedPredictor(10, upper),
                   gpus=gpus, kv_budget_tokens=budget, block_size=1, cost=CPU_LIKE)
        check_conserved(requests, safe)
        assert safe.preemptions == 0


def test_continuous_fcfs_overcommits_and_preempts() -> None:
    requests = [req(i, 0.0, true=40, input_tokens=20, max_tokens=48) for i in range(10)]
    result = run(requests, name="continuous-fcfs", mode="continuous", kv_budget_tokens=200,
                 block_size=4, cost=CPU_LIKE)
    check_conserved(requests, result)
    assert result.preemptions > 0


def test_deterministic_per_seed() -> None:
    def workload(seed: int) -> list[SimRequest]:
        rng = random.Random(seed)
        t, out = 0.0, []
        for i in range(80):
            t += rng.expovariate(3.0)
            out.append(SimRequest(f"r{i}", f"app{i % 4}", t, rng.randint(20, 300),
                                  rng.randint(1, 512), 512))
        return out

    predictor = AppMeanPredictor.fit((f"app{i % 4}", 30 + 7 * i) for i in range(60))
    for name, mode in [("magnus", "static"), ("magnus", "continuous")]:
        a = run(workload(1), name=name, mode=mode, predictor=predictor, cost=CPU_LIKE)
        b = run(workload(1), name=name, mode=mode, predictor=predictor, cost=CPU_LIKE)
        c = run(workload(2), name=name, mode=mode, predictor=predictor, cost=CPU_LIKE)
        assert a.outcomes == b.outcomes and a.batches == b.batches
        assert a.outcomes != c.outcomes


def test_app_mean_predictor_repredicts_continuations_with_the_real_rule() -> None:
    predictor = AppMeanPredictor.fit([("a", 10), ("a", 20), ("a", 30), ("b", 400)])
    r = SimRequest("x", "a", 0.0, 10, 100, 512)
    point, upper = predictor.predict(r, 0)
    assert point == 20 and 20 <= upper <= 30
    later_point, later_upper = predictor.predict(r, 40)  # it outran the estimate
    assert later_point >= 1 and later_upper >= later_point
    assert later_upper <= 512 - 40
    assert predictor.predict(SimRequest("y", "zzz", 0.0, 10, 5, 512), 0)[0] >= 1  # fallback


def test_continuous_groups_wait_for_a_free_worker_thread() -> None:
    result = run([req(0, 0.0, true=3), req(1, 0.05, true=2)], name="continuous-fcfs",
                 mode="continuous", worker_threads=1)
    done = finished(result)
    # One thread: r1's group starts when r0's ends at 0.12, then 0.1 prefill + 1 decode step.
    assert done["r0"] == pytest.approx(0.12) and done["r1"] == pytest.approx(0.23)


def test_batches_go_to_per_node_queues_as_the_real_cluster_lays_them_out() -> None:
    # 10 GPUs in nodes of 4: node0 and node1 hold 4, node2 the last 2, ids in join order.
    requests = [req(i, 0.01 * i, true=3) for i in range(40)]
    result = run(requests, name="fcfs-fixed", gpus=10, gpus_per_node=4)
    assert [(s.gpu, s.node, s.device) for s in result.config.layout][3:6] == [
        (3, "node0", 3), (4, "node1", 0), (5, "node1", 1)]
    assert {b.node for b in result.batches} == {"node0", "node1", "node2"}
    for b in result.batches:
        assert b.queue == keys.celery_queue(b.gpu, b.node)
    shares = result.busy_share_by_node(max(finished(result).values()))
    assert sorted(shares) == ["node0", "node1", "node2"] and all(v > 0 for v in shares.values())
