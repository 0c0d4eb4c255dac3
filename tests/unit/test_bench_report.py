"""bench/report.py: the ratios docs/benchmarks.md states against each target, and the block
rewriting, on hand-made result rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.report import TARGETS, Target, pick, targets_block, update


def row(policy: str, mode: str, rate: float = 2.0, **metrics: float) -> dict[str, Any]:
    base = {"policy": policy, "mode": mode, "rate_per_s": rate, "requests": 10, "completed": 10,
            "request_throughput": 1.0, "token_throughput": 100.0, "mean_response_s": 10.0,
            "p50_response_s": 8.0, "p99_response_s": 30.0, "mean_ttft_s": 1.0,
            "wasted_tokens": 0, "continuations": 0, "predictor_mae": 50.0, "makespan_s": 10.0}
    return base | metrics


def target(name_part: str) -> Target:
    (t,) = [t for t in TARGETS if name_part in t.name]
    return t


def test_pick_takes_the_requested_rate_or_the_highest() -> None:
    rows = [row("magnus", "static", 0.5, request_throughput=0.5),
            row("magnus", "static", 2.0, request_throughput=0.9)]
    assert pick(rows, "magnus", "static")["request_throughput"] == 0.9  # type: ignore[index]
    assert pick(rows, "magnus", "static", 0.5)["request_throughput"] == 0.5  # type: ignore[index]
    assert pick(rows, "magnus", "continuous") is None


def test_throughput_target_is_a_lower_bound_and_response_an_upper_bound() -> None:
    thr = target("static: magnus / fcfs-fixed request throughput")
    rt = target("static: magnus / fcfs-fixed mean response")
    rows = [row("magnus", "static", request_throughput=3.4, mean_response_s=1.0),
            row("fcfs-fixed", "static", request_throughput=1.0, mean_response_s=20.0)]
    assert thr.ratio(rows) == pytest.approx(3.4) and thr.met(thr.ratio(rows)) == "met"
    assert rt.ratio(rows) == pytest.approx(0.05) and rt.met(rt.ratio(rows)) == "met"
    rows[0] = row("magnus", "static", request_throughput=1.2, mean_response_s=5.0)
    assert thr.met(thr.ratio(rows)) == "NOT met"
    assert rt.met(rt.ratio(rows)) == "NOT met"  # 0.25 > 0.10


def test_targets_block_marks_runs_that_did_not_happen() -> None:
    real = {"rows": [row("magnus", "continuous", p99_response_s=33.0),
                     row("continuous-fcfs", "continuous", p99_response_s=30.0)]}
    block = targets_block(real, None)
    p99 = next(line for line in block.splitlines() if "p99" in line)
    assert "1.10 (met)" in p99
    static = next(line for line in block.splitlines() if "fcfs-fixed request" in line)
    assert static.endswith("| - |")


def test_update_rewrites_only_the_named_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    doc.write_text("intro\n<!-- bench:real -->\nold\n<!-- /bench:real -->\nprose kept\n")
    update(doc, {"real": "new table\n"})
    assert doc.read_text() == ("intro\n<!-- bench:real -->\nnew table\n<!-- /bench:real -->\n"
                               "prose kept\n")
    with pytest.raises(ValueError, match="bench:sweep"):
        update(doc, {"sweep": "x"})
