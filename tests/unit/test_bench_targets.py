"""The repeated target runs' bookkeeping (bench/targets.py, bench/report.py's wins block) and the
isolated configuration's settings (bench/isolation.py, shared/settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.isolation import CoreReport, Isolation, SharedCore
from bench.report import wins_block
from bench.targets import PointSpec, save_rows
from offline.launcher import Stack
from shared.settings import LauncherSettings, cpu_set


def test_points_parse_and_refuse_nonsense() -> None:
    assert PointSpec.parse("burst300") == PointSpec("burst300", "burst", 0.0, 300)
    assert PointSpec.parse("gamma-1.3") == PointSpec("gamma-1.3", "gamma", 1.3, None)
    for bad in ("burst", "uniform-1.0", "poisson-", "burstx"):
        with pytest.raises(ValueError):
            PointSpec.parse(bad)
    assert PointSpec.parse("burst5").offsets(0.0, 5, 0) == [0.0] * 5
    gaps = PointSpec.parse("gamma-1.0").offsets(2.0, 400, 1)
    assert gaps == sorted(gaps) and 150 < gaps[-1] < 260  # mean rate 2/s, bursty


def test_cpu_lists_and_the_isolated_settings() -> None:
    assert cpu_set("0") == {0} and cpu_set("0,2-3") == {0, 2, 3}
    for bad in ("", "a", "3-1", "-1"):
        with pytest.raises(ValueError):
            cpu_set(bad)
    iso = Isolation(frozenset({1}), frozenset({0}))
    s = iso.settings(LauncherSettings())
    assert (s.service_cpus, s.cpu_omp_threads_bind) == ("0", "1")
    stack = Stack(s)
    assert stack.affinity("engine0") == {0, 1}  # the Worker binds inside it
    assert stack.affinity("worker0") == stack.affinity("redis") == {0}
    assert Stack(LauncherSettings()).affinity("engine0") is None
    with pytest.raises(ValueError, match="shares cores"):
        LauncherSettings(service_cpus="0-1", cpu_omp_threads_bind="1")
    with pytest.raises(ValueError, match="not auto"):
        LauncherSettings(service_cpus="0")


def test_a_run_whose_engine_shared_its_core_fails_the_check() -> None:
    iso = Isolation(frozenset({1}), frozenset({0}))
    good = CoreReport(iso, cpu_s={"engine-compute": {1: 99.0, 0: 1.0}, "service": {0: 50.0}},
                      busy_s={0: 60.0, 1: 100.0})
    good.check()
    for bad in (
        CoreReport(iso, cpu_s={"engine-compute": {0: 90.0, 1: 10.0}}, busy_s={1: 10.0}),
        CoreReport(iso, cpu_s={"engine-compute": {1: 50.0}}, busy_s={1: 80.0}),  # foreign 37%
        CoreReport(iso, cpu_s={"engine-compute": {1: 50.0}}, busy_s={1: 50.0},
                   trespassers=["12/13 service [0, 1]"]),
    ):
        with pytest.raises(SharedCore):
            bad.check()


def row(point: str, policy: str, engine: str, repeat: int, mean: float, p99: float = 10.0,
        rps: float = 1.0, slowdown: float = 10.0) -> dict[str, Any]:
    return {"point": point, "policy": policy, "config": {"engine": engine}, "repeat": repeat,
            "mean_e2e_s": mean, "p99_e2e_s": p99, "throughput_rps": rps,
            "max_slowdown": slowdown, "isolation": None}


def test_rows_merge_by_point_policy_config_and_repeat(tmp_path: Path) -> None:
    path = tmp_path / "load.json"
    save_rows([row("burst300", "vllm", "knee", 1, 100.0)], {"knee": 30}, path)
    save_rows([row("burst300", "vllm", "knee", 1, 90.0), row("burst300", "magnus", "knee", 1,
                                                             50.0)], {"capacity_rps": 1.0}, path)
    import json

    data = json.loads(path.read_text())
    assert [(r["policy"], r["mean_e2e_s"]) for r in data["targets"]] == [
        ("magnus", 50.0), ("vllm", 90.0)]
    assert data["targets_meta"] == {"knee": 30, "capacity_rps": 1.0}


def test_the_wins_table_pairs_repeats_against_the_better_plain_vllm() -> None:
    rows = []
    for k, (capped, default, magnus, oracle) in enumerate(
            [(160, 140, 80, 78), (170, 150, 95, 90), (150, 130, 70, 70)], start=1):
        rows += [row("burst300", "vllm", "knee", k, capped, rps=0.9),
                 row("burst300", "vllm", "default", k, default, rps=1.0, slowdown=400),
                 row("burst300", "magnus", "knee", k, magnus, rps=1.0, slowdown=30),
                 row("burst300", "magnus-oracle", "knee", k, oracle)]
    text = wins_block({"targets": rows, "targets_meta": {"capacity_rps": 1.0, "knee": 30}})
    mean_line = next(line for line in text.splitlines()
                     if "mean completion vs plain" in line)
    # Against the default-limit plain vLLM (the lower median mean): 80/140, 95/150, 70/130.
    assert "vllm@default" in mean_line and "0.57 (0.54-0.63)" in mean_line
    assert "met" in mean_line and "NOT" not in mean_line
    oracle_line = next(line for line in text.splitlines() if "its oracle" in line)
    assert "1.03 (1.00-1.06)" in oracle_line
    slowdown = next(line for line in text.splitlines() if "worst slowdown" in line)
    assert "0.07" in slowdown and "| met |" in slowdown
    assert "(not run yet" in wins_block({"rows": []})
