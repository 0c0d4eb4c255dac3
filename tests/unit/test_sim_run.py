"""bench/sim_run.py's pure pieces: workload sampling, the sim-vs-real comparison, headlines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench.cost_model import EngineCostModel
from bench.sim_run import (
    REPO_ROOT,
    Dataset,
    compare_with_real,
    fit_predictor,
    headline,
    realized_workload,
    run_all,
    sampled_workload,
)

COST = EngineCostModel(step_base_s=0.025, step_per_seq_s=0.0015, step_per_context_token_s=2e-6,
                       prefill_step_s=0.01, prefill_per_token_s=4e-4)


def dataset() -> Dataset:
    rows = [{"request_id": f"x{i}", "app_id": f"app{i % 3}", "split": split,
             "input_tokens": 40 + i, "generated_tokens": 5 + 37 * i % 600}
            for i in range(40) for split in (("train",) if i % 2 else ("test",))]
    return Dataset(Path("unused"), rows)


def test_sampled_workload_is_seeded_and_capped() -> None:
    data = dataset()
    a = sampled_workload(data, 50, 3, 2.0, 512)
    assert a == sampled_workload(data, 50, 3, 2.0, 512)
    assert a != sampled_workload(data, 50, 4, 2.0, 512)
    assert len(a) == 50 and all(1 <= r.true_tokens <= 512 for r in a)
    assert [r.arrival_s for r in a] == sorted(r.arrival_s for r in a)


def test_headline_and_comparison(tmp_path: Path) -> None:
    data = dataset()
    reqs = sampled_workload(data, 30, 0, 2.0, 512)
    rows = run_all(reqs, 2.0, 2, COST, fit_predictor(data, 512), (0.05, 0.03),
                   [("static", ["fcfs-fixed", "magnus", "magnus-oracle"]),
                    ("continuous", ["continuous-fcfs", "magnus", "magnus-oracle"])])
    heads = headline(rows)
    assert heads["static_magnus_vs_fcfs_throughput"] > 0
    assert all(v > 0 for v in heads.values())
    real = {"rows": [r.summary.as_dict() for r in rows[:2]]}
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    text, ratios = compare_with_real(rows, path)
    assert len(ratios) == 2 and all(r["throughput_ratio"] == pytest.approx(1.0) for r in ratios)
    assert "| fcfs-fixed | static |" in text
    missing, none = compare_with_real(rows, REPO_ROOT / "results" / "no-such-file.json")
    assert none == [] and "no real results" in missing


def test_realized_workload_replays_a_real_runs_lengths_and_keeps_the_oracles() -> None:
    data = dataset()
    reqs = sampled_workload(data, 4, 0, 2.0, 512)
    outcomes = [{"status": "completed", "generated_tokens": 7 + i, "true_tokens": q.true_tokens}
                for i, q in enumerate(reqs)]
    realized = realized_workload(reqs, {"outcomes": outcomes})
    assert realized is not None
    assert [q.true_tokens for q in realized] == [7, 8, 9, 10]
    assert [q.planned_tokens for q in realized] == [q.true_tokens for q in reqs]
    assert [q.arrival_s for q in realized] == [q.arrival_s for q in reqs]
    unfinished = [dict(outcomes[0], status="failed"), *outcomes[1:]]
    assert realized_workload(reqs, {"outcomes": unfinished}) is None
    assert realized_workload(reqs, {}) is None


def test_comparison_is_judged_on_realized_lengths_when_given(tmp_path: Path) -> None:
    data = dataset()
    reqs = sampled_workload(data, 20, 0, 2.0, 512)
    predictor = fit_predictor(data, 512)
    rows = run_all(reqs, 2.0, 1, COST, predictor, (0.05, 0.03), [("static", ["fcfs-fixed"])])
    shorter = [dataclasses.replace(q, true_tokens=max(1, q.true_tokens // 4),
                                   oracle_tokens=q.true_tokens) for q in reqs]
    realized = run_all(shorter, 2.0, 1, COST, predictor, (0.05, 0.03),
                       [("static", ["fcfs-fixed"])])
    path = tmp_path / "real.json"
    path.write_text(json.dumps({"rows": [realized[0].summary.as_dict()]}))
    _, (ratio,) = compare_with_real(rows, path, realized, engine_only=rows)
    assert ratio["lengths"] == "realized" and ratio["within_15pct"]
    assert ratio["throughput_ratio"] == pytest.approx(1.0)
    assert ratio["engine_only_throughput_ratio"] < 0.9  # four times the tokens: slower
    _, (profiled,) = compare_with_real(rows, path)
    assert profiled["lengths"] == "profiled" and not profiled["within_15pct"]


def test_scaled_cost_model_slows_every_step_by_the_factor() -> None:
    slow = COST.scaled(1.5)
    assert slow.step_time(8, 1000) == pytest.approx(1.5 * COST.step_time(8, 1000))
    assert slow.prefill_time(3000) == pytest.approx(1.5 * COST.prefill_time(3000))
    data = dataset()
    reqs = sampled_workload(data, 20, 0, 2.0, 512)
    fast, slower = (run_all(reqs, 2.0, 1, c, fit_predictor(data, 512), (0.05, 0.03),
                            [("static", ["fcfs-fixed"])])[0].summary for c in (COST, slow))
    assert slower.request_throughput < fast.request_throughput
