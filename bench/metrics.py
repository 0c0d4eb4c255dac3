"""Benchmark metrics from per-request outcomes: one definition for the real stack and the
simulator, so their tables compare like with like."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from services.scheduler.registry import POLICIES, policy_names

# The policies both benchmarks (real stack, simulator) compare, per engine mode: the registry's
# (a policy is benchmarked in the modes its entry names).
STATIC_POLICIES = policy_names("static")
CONTINUOUS_POLICIES = policy_names("continuous")
# Those that run on an engine with its default (arrival-order) queue: a policy that hands its
# order to the engine (vllm-priority) needs one started with --scheduling-policy priority, which
# the load benchmark starts for it and the fixed-table run does not, and the simulated engine has
# no priority queue (it would simulate plain vLLM under that name).
FCFS_ENGINE_CONTINUOUS_POLICIES = [n for n in CONTINUOUS_POLICIES
                                   if not POLICIES[n].engine_priority]


@dataclass(frozen=True)
class Outcome:
    request_id: str
    arrived_at: float
    finished_at: float | None  # None: not finished when the run ended
    first_token_at: float | None
    generated_tokens: int
    predicted_tokens: int | None
    true_tokens: int | None
    continuations: int
    status: str


@dataclass(frozen=True)
class RunSummary:
    policy: str
    mode: str
    rate_per_s: float
    requests: int
    completed: int
    request_throughput: float
    token_throughput: float
    mean_response_s: float
    p50_response_s: float
    p99_response_s: float
    mean_ttft_s: float | None
    wasted_tokens: int
    continuations: int
    predictor_mae: float | None
    makespan_s: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def summarise(policy: str, mode: str, rate_per_s: float, outcomes: Sequence[Outcome],
              wasted_tokens: int) -> RunSummary:
    done = [o for o in outcomes if o.finished_at is not None and o.status == "completed"]
    start = min(o.arrived_at for o in outcomes)
    end = max((o.finished_at for o in done if o.finished_at is not None), default=start)
    makespan = max(end - start, 1e-9)
    response = np.array([o.finished_at - o.arrived_at for o in done if o.finished_at])
    ttft = [o.first_token_at - o.arrived_at for o in done if o.first_token_at is not None]
    errors = [abs(o.predicted_tokens - o.true_tokens) for o in done
              if o.predicted_tokens is not None and o.true_tokens is not None]
    return RunSummary(
        policy=policy, mode=mode, rate_per_s=rate_per_s, requests=len(outcomes),
        completed=len(done), request_throughput=len(done) / makespan,
        token_throughput=sum(o.generated_tokens for o in done) / makespan,
        mean_response_s=float(response.mean()) if len(response) else float("nan"),
        p50_response_s=float(np.percentile(response, 50)) if len(response) else float("nan"),
        p99_response_s=float(np.percentile(response, 99)) if len(response) else float("nan"),
        mean_ttft_s=float(np.mean(ttft)) if ttft else None,
        wasted_tokens=wasted_tokens,
        continuations=sum(o.continuations for o in outcomes),
        predictor_mae=float(np.mean(errors)) if errors else None,
        makespan_s=makespan,
    )


def table(rows: Sequence[RunSummary]) -> str:
    head = ("| policy | mode | rate/s | done | req/s | tok/s | mean RT s | p50 RT s | p99 RT s | "
            "TTFT s | wasted tok | contin. | pred MAE |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    def f(v: float | None, d: int = 2) -> str:
        return "-" if v is None else f"{v:.{d}f}"
    return head + "".join(
        f"| {r.policy} | {r.mode} | {r.rate_per_s:g} | {r.completed}/{r.requests} | "
        f"{f(r.request_throughput, 3)} | {f(r.token_throughput, 1)} | {f(r.mean_response_s)} | "
        f"{f(r.p50_response_s)} | {f(r.p99_response_s)} | {f(r.mean_ttft_s)} | "
        f"{r.wasted_tokens} | {r.continuations} | {f(r.predictor_mae, 1)} |\n" for r in rows)
