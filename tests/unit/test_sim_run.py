"""bench/sim_run.py's pure pieces: workload sampling, the sim-vs-real comparison, headlines."""

from __future__ import annotations

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
