"""Simulated benchmarks: the real policies on a cost-model engine fitted to the measured profile.

Three parts, each printing tables (bench/metrics.py, the real stack's definitions) and writing
results/sim_*.json and docs/img/sim_*.png:

- real: the configuration `python -m bench.real_stack` runs by default (60 test-split requests,
  the same selection and Poisson arrivals at 2.0/s, max_tokens 512, 1 GPU of 46,592 KV tokens,
  every static policy and the continuous ones), side by side with results/real_stack.json when
  that exists (sim / real throughput and mean response time).
- sweep: 1 GPU, a load sweep from light load to saturation.
- scale: 8 and 64 GPUs, ten times the real run's requests per GPU, drawn with replacement from
  the test split, the arrival rate scaled with the GPUs.

Then the generated blocks of docs/simulator.md (tables, cost-model fit) are rewritten.

    python -m bench.sim_run [--parts real,sweep,scale] [--cost-profile PROFILE_JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.cost_model import DEFAULT_PROFILE, CostModelFit, EngineCostModel, load_fit
from bench.metrics import FCFS_ENGINE_CONTINUOUS_POLICIES, STATIC_POLICIES, RunSummary, table
from bench.plots import plot_cdf, plot_vs_rate
from bench.simulator import AppMeanPredictor, SimConfig, SimRequest, SimResult, simulate
from offline.workload.analysis import load_profile
from offline.workload.arrivals import poisson_arrivals
from offline.workload.catalog import load_records
from offline.workload.profile import DEFAULT_OUT as PROFILE
from services.scheduler.batching import EngineMode
from services.scheduler.policy import PolicyConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "results"
IMG = REPO_ROOT / "docs" / "img"
DOC = REPO_ROOT / "docs" / "simulator.md"
PARTIAL_PROFILE = PROFILE.with_suffix("").with_suffix(".partial.jsonl")


# --- workload ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Dataset:
    path: Path
    rows: list[dict[str, Any]]

    def split(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["split"] == name]


def load_dataset() -> Dataset:
    """The profiled dataset: the final one when it exists, else the growing partial file."""
    path = PROFILE if PROFILE.exists() else PARTIAL_PROFILE
    rows = list({str(r["request_id"]): r for r in load_profile(path)}.values())
    return Dataset(path, rows)


def fit_predictor(data: Dataset, max_tokens: int) -> AppMeanPredictor:
    """Per-app mean and p90 of the train split's profiled lengths."""
    return AppMeanPredictor.fit((str(r["app_id"]), min(int(r["generated_tokens"]), max_tokens))
                                for r in data.split("train"))


def _request(row: dict[str, Any], request_id: str, at: float, max_tokens: int) -> SimRequest:
    return SimRequest(request_id=request_id, app_id=str(row["app_id"]), arrival_s=at,
                      input_tokens=int(row["input_tokens"]),
                      true_tokens=max(1, min(int(row["generated_tokens"]), max_tokens)),
                      max_tokens=max_tokens)


def real_stack_workload(data: Dataset, n: int, seed: int, rate: float,
                        max_tokens: int) -> list[SimRequest]:
    """bench.real_stack.workload's selection (the same seeded sample of profiled test-split
    records, in the same order) and arrivals, with each record's profiled lengths."""
    profiled = {str(r["request_id"]): r for r in data.split("test")}
    records = [r for r in load_records(split="test") if r.request_id in profiled]
    chosen = random.Random(seed).sample(records, min(n, len(records)))
    arrivals = poisson_arrivals(rate, len(chosen), seed=seed)
    return [_request(profiled[r.request_id], f"{r.request_id}#{i}", at, max_tokens)
            for i, (r, at) in enumerate(zip(chosen, arrivals, strict=True))]


def check_same_selection(requests: Sequence[SimRequest], n: int, seed: int,
                         max_tokens: int) -> bool | None:
    """Whether `requests` are bench.real_stack.workload's requests (same apps, same profiled
    lengths, same order); None when the final profile that function reads does not exist yet."""
    if not PROFILE.exists():
        return None
    from bench.real_stack import workload

    real = workload(n, seed, max_tokens)
    return [(r["app_id"], r["true_output_tokens"]) for r in real] == [
        (q.app_id, q.true_tokens) for q in requests]


def sampled_workload(data: Dataset, n: int, seed: int, rate: float,
                     max_tokens: int) -> list[SimRequest]:
    """n requests drawn with replacement from the profiled test split, Poisson arrivals."""
    rows = sorted(data.split("test"), key=lambda r: str(r["request_id"]))
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rate, n, seed=seed)
    return [_request(rows[rng.randrange(len(rows))], f"s{i}", at, max_tokens)
            for i, at in enumerate(arrivals)]


# --- runs -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    summary: RunSummary
    gpus: int
    preemptions: int
    batches: int
    mean_batch_size: float
    busy_share: float  # engine busy time / (GPUs x makespan)
    # The cluster as nodes (SimConfig.layout): how many, and the least and most busy node's
    # share (work spread over the per-node queues).
    nodes: int
    node_busy_min: float
    node_busy_max: float
    sim_s: float  # wall time of the simulation itself
    response_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("summary", "response_s")}
        return self.summary.as_dict() | d


def run_all(requests: Sequence[SimRequest], rate: float, gpus: int, cost: EngineCostModel,
            predictor: AppMeanPredictor, overheads: tuple[float, float],
            modes: Sequence[tuple[EngineMode, Sequence[str]]],
            gpus_per_node: int = 8) -> list[Row]:
    rows: list[Row] = []
    for mode, policies in modes:
        for name in policies:
            config = SimConfig(PolicyConfig(name=name, engine_mode=mode),
                               gpus=gpus, gpus_per_node=gpus_per_node,
                               predict_latency_s=overheads[0], dispatch_overhead_s=overheads[1])
            t0 = time.perf_counter()
            result = simulate(requests, config, cost, predictor)
            rows.append(_row(result, rate, gpus, time.perf_counter() - t0))
            print(table([rows[-1].summary]).splitlines()[-1]
                  + f" preempt {rows[-1].preemptions} | {rows[-1].sim_s:.1f}s sim", flush=True)
    return rows


def _row(result: SimResult, rate: float, gpus: int, sim_s: float) -> Row:
    summary = result.summary(rate)
    response = sorted(o.finished_at - o.arrived_at for o in result.outcomes
                      if o.finished_at is not None)
    sizes = [b.size for b in result.batches]
    by_node = result.busy_share_by_node(summary.makespan_s)
    return Row(summary=summary, gpus=gpus, preemptions=result.preemptions,
               batches=len(sizes), mean_batch_size=float(np.mean(sizes)) if sizes else 0.0,
               busy_share=sum(result.busy_s) / (gpus * summary.makespan_s),
               nodes=len(by_node), node_busy_min=min(by_node.values()),
               node_busy_max=max(by_node.values()), sim_s=sim_s, response_s=response)


def modes_for(policies_static: Sequence[str], policies_cont: Sequence[str]
              ) -> list[tuple[EngineMode, Sequence[str]]]:
    return [("static", policies_static), ("continuous", policies_cont)]


def find(rows: Sequence[Row], policy: str, mode: str) -> Row:
    (row,) = [r for r in rows if r.summary.policy == policy and r.summary.mode == mode]
    return row


# --- comparisons ------------------------------------------------------------------------------

def realized_workload(requests: Sequence[SimRequest], real_row: dict[str, Any]
                      ) -> list[SimRequest] | None:
    """`requests` with the lengths one real run actually generated (sampling at temperature 0.2
    does not reproduce the profiled lengths), the oracle still told the profiled ones as the
    real oracle was; None when that run has no per-request outcomes or left some unfinished."""
    outcomes = real_row.get("outcomes")
    if (not outcomes or len(outcomes) != len(requests)
            or any(o["status"] != "completed" for o in outcomes)):
        return None
    out = []
    for q, o in zip(requests, outcomes, strict=True):
        assert o["true_tokens"] == q.true_tokens, "real outcomes are not in the workload's order"
        out.append(replace(q, true_tokens=max(1, min(int(o["generated_tokens"]), q.max_tokens)),
                           oracle_tokens=q.true_tokens))
    return out


def compare_with_real(rows: Sequence[Row], real_path: Path, realized: Sequence[Row] = (),
                      engine_only: Sequence[Row] = ()) -> tuple[str, list[dict[str, Any]]]:
    """Sim / real ratios of throughput and mean response time for every run both have, judged
    on the simulation of the lengths that real run generated when `realized` has it, else on
    the profiled lengths (`rows`). `engine_only`: the realized runs on the engine profile alone
    (no stack slowdown), shown beside."""
    if not real_path.exists():
        return f"(no {real_path.relative_to(REPO_ROOT)}: no real results to compare with)\n", []
    real = json.loads(real_path.read_text())["rows"]
    out: list[dict[str, Any]] = []
    lines = ["| policy | mode | real req/s | sim req/s | sim/real | real mean RT s | sim mean RT "
             "s | sim/real | within 15% | sim/real, engine profile alone: req/s | mean RT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def find_in(these: Sequence[Row], r: dict[str, Any]) -> RunSummary | None:
        match = [x.summary for x in these
                 if x.summary.policy == r["policy"] and x.summary.mode == r["mode"]]
        return match[0] if match else None

    for r in real:
        judged = find_in(realized, r) or find_in(rows, r)
        if judged is None:
            continue
        thr = judged.request_throughput / max(r["request_throughput"], 1e-12)
        rt = judged.mean_response_s / max(r["mean_response_s"], 1e-12)
        ok = abs(thr - 1) <= 0.15 and abs(rt - 1) <= 0.15
        alone = find_in(engine_only, r)
        alone_thr = None if alone is None else alone.request_throughput / max(
            r["request_throughput"], 1e-12)
        alone_rt = None if alone is None else alone.mean_response_s / max(
            r["mean_response_s"], 1e-12)
        out.append({"policy": judged.policy, "mode": judged.mode, "throughput_ratio": thr,
                    "mean_response_ratio": rt, "within_15pct": ok,
                    "lengths": "realized" if find_in(realized, r) else "profiled",
                    "engine_only_throughput_ratio": alone_thr,
                    "engine_only_mean_response_ratio": alone_rt})
        lines.append(f"| {judged.policy} | {judged.mode} | {r['request_throughput']:.3f} | "
                     f"{judged.request_throughput:.3f} | {thr:.2f} | "
                     f"{r['mean_response_s']:.2f} | {judged.mean_response_s:.2f} | {rt:.2f} | "
                     f"{'yes' if ok else 'no'} | {cell(alone_thr)} | {cell(alone_rt)} |")
    return "\n".join(lines) + "\n", out


def headline(rows: Sequence[Row]) -> dict[str, float]:
    """The ratios the project quotes: Magnus against its baselines and its oracle."""
    def r(p: str, m: str) -> RunSummary:
        return find(rows, p, m).summary

    out: dict[str, float] = {}
    ms, fs = r("magnus", "static"), r("fcfs-fixed", "static")
    out["static_magnus_vs_fcfs_throughput"] = ms.request_throughput / fs.request_throughput
    out["static_fcfs_vs_magnus_mean_response"] = fs.mean_response_s / ms.mean_response_s
    mc, cf = r("magnus", "continuous"), r("continuous-fcfs", "continuous")
    out["continuous_magnus_vs_cfcfs_throughput"] = mc.request_throughput / cf.request_throughput
    out["continuous_magnus_vs_cfcfs_mean_response"] = mc.mean_response_s / cf.mean_response_s
    out["continuous_magnus_vs_cfcfs_p99_response"] = mc.p99_response_s / cf.p99_response_s
    for mode in ("static", "continuous"):
        m, o = r("magnus", mode), r("magnus-oracle", mode)
        out[f"{mode}_magnus_vs_oracle_throughput"] = m.request_throughput / o.request_throughput
        out[f"{mode}_magnus_vs_oracle_mean_response"] = m.mean_response_s / o.mean_response_s
    return out


# --- parts ------------------------------------------------------------------------------------

@dataclass
class Context:
    args: argparse.Namespace
    data: Dataset
    predictor: AppMeanPredictor
    fit: CostModelFit
    overheads: tuple[float, float]
    sections: dict[str, str]
    slowdown: float = 1.0  # the stack slowdown the runs use (fit_stack_slowdown)

    @property
    def cost(self) -> EngineCostModel:
        return self.fit.model.scaled(self.slowdown)


def part_real(ctx: Context) -> None:
    a = ctx.args
    reqs = real_stack_workload(ctx.data, a.requests, a.seed, a.rate, a.max_tokens)
    same = check_same_selection(reqs, a.requests, a.seed, a.max_tokens)
    assert same is not False, "the selection differs from bench.real_stack.workload's"
    print(f"\n## real-stack default: {len(reqs)} requests, {a.rate}/s, 1 GPU "
          f"(same selection as bench.real_stack: {same})")
    rows = run_all(reqs, a.rate, 1, ctx.cost, ctx.predictor, ctx.overheads,
                   modes_for(STATIC_POLICIES, FCFS_ENGINE_CONTINUOUS_POLICIES))
    tab = table([r.summary for r in rows])
    realized = realized_runs(reqs, a.rate, ctx, RESULTS / "real_stack.json", ctx.cost)
    engine_only = (realized_runs(reqs, a.rate, ctx, RESULTS / "real_stack.json", ctx.fit.model)
                   if ctx.slowdown != 1.0 else realized)
    comparison, ratios = compare_with_real(rows, RESULTS / "real_stack.json", realized,
                                           engine_only)
    print("\n" + tab + "\n" + comparison)
    plot_cdf([r.summary for r in rows], [r.response_s for r in rows], "real-stack default (sim)",
             IMG / "sim_cdf_real_default.png")
    _save("sim_real_default.json", ctx, rows, {"requests": len(reqs), "rate": a.rate,
                                               "same_selection_as_real_stack": same,
                                               "comparison": ratios,
                                               "stack_slowdown": ctx.slowdown})
    ctx.sections["real"] = (tab + "\n" + _extras(rows) + "\nSide by side with the real stack:\n\n"
                            + comparison)


def realized_runs(requests: Sequence[SimRequest], rate: float, ctx: Context,
                  real_path: Path, cost: EngineCostModel) -> list[Row]:
    """For every run of `real_path` at `rate`, its policy simulated on the lengths that run
    generated: the simulator judged on its engine and policy model, not on sampling noise."""
    if not real_path.exists():
        return []
    out: list[Row] = []
    for real_row in json.loads(real_path.read_text())["rows"]:
        if real_row["rate_per_s"] != rate:
            continue
        reqs = realized_workload(requests, real_row)
        if reqs is None:
            continue
        print(f"realized lengths of the real {real_row['policy']} ({real_row['mode']}) run:")
        out += run_all(reqs, rate, 1, cost, ctx.predictor, ctx.overheads,
                       [(real_row["mode"], [real_row["policy"]])])
    return out


def fit_stack_slowdown(ctx: Context, real_path: Path, policy: str = "fcfs-fixed",
                       mode: EngineMode = "static") -> float | None:
    """The factor by which the engine runs slower inside the whole stack than alone (where it
    was profiled): the predictor's embeddings, ingress, the scheduler and the worker's streaming
    share the CPU with it. Fitted on ONE real run (fcfs-fixed, static: no predictions involved),
    by bisection, so that the simulation of that run's realized lengths has its throughput; the
    other runs then test the simulator. None when there is no such run."""
    if not real_path.exists():
        return None
    a = ctx.args
    reqs = real_stack_workload(ctx.data, a.requests, a.seed, a.rate, a.max_tokens)
    rows = [r for r in json.loads(real_path.read_text())["rows"]
            if (r["policy"], r["mode"], r["rate_per_s"]) == (policy, mode, a.rate)]
    realized = realized_workload(reqs, rows[0]) if rows else None
    if realized is None:
        return None
    target = float(rows[0]["request_throughput"])

    def throughput(factor: float) -> float:
        config = SimConfig(PolicyConfig(name=policy, engine_mode=mode),
                           gpus=1,
                           predict_latency_s=ctx.overheads[0],
                           dispatch_overhead_s=ctx.overheads[1])
        result = simulate(realized, config, ctx.fit.model.scaled(factor), ctx.predictor)
        return result.summary(a.rate).request_throughput

    lo, hi = 0.25, 8.0  # throughput falls as the factor grows
    for _ in range(30):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if throughput(mid) > target else (lo, mid)
    return math.sqrt(lo * hi)


def part_sweep(ctx: Context) -> None:
    a = ctx.args
    rows: list[Row] = []
    for rate in [float(x) for x in a.sweep_rates.split(",")]:
        reqs = sampled_workload(ctx.data, a.sweep_requests, a.seed, rate, a.max_tokens)
        print(f"\n## load sweep: {len(reqs)} requests, {rate}/s, 1 GPU")
        rows += run_all(reqs, rate, 1, ctx.cost, ctx.predictor, ctx.overheads,
                        modes_for(STATIC_POLICIES, FCFS_ENGINE_CONTINUOUS_POLICIES))
    tab = table([r.summary for r in rows])
    print("\n" + tab)
    plot_vs_rate([r.summary for r in rows],
                 "Simulated load sweep, 1 GPU (CPU-calibrated cost model)",
                 IMG / "sim_load_sweep.png")
    _save("sim_load_sweep.json", ctx, rows, {"requests": a.sweep_requests,
                                             "rates": a.sweep_rates})
    ctx.sections["sweep"] = tab + "\n" + _extras(rows)


def part_scale(ctx: Context) -> None:
    a = ctx.args
    rows: list[Row] = []
    heads: dict[str, dict[str, float]] = {}
    for gpus in [int(x) for x in a.scale_gpus.split(",")]:
        n, rate = a.scale_requests_per_gpu * gpus, a.rate * gpus
        reqs = sampled_workload(ctx.data, n, a.seed, rate, a.max_tokens)
        print(f"\n## scale: {gpus} GPUs, {n} requests, {rate}/s")
        skip = set(filter(None, a.scale_skip.split(",")))
        these = run_all(reqs, rate, gpus, ctx.cost, ctx.predictor, ctx.overheads,
                        modes_for([p for p in STATIC_POLICIES if p not in skip],
                                  [p for p in FCFS_ENGINE_CONTINUOUS_POLICIES if p not in skip]),
                        gpus_per_node=a.gpus_per_node)
        heads[str(gpus)] = headline(these)
        plot_cdf([r.summary for r in these], [r.response_s for r in these], f"{gpus} GPUs (sim)",
                 IMG / f"sim_cdf_{gpus}gpu.png")
        rows += these
    tab = table([r.summary for r in rows])
    print("\n" + tab + "\n" + json.dumps(heads, indent=2))
    _save("sim_scale.json", ctx, rows, {"requests_per_gpu": a.scale_requests_per_gpu,
                                        "rate_per_gpu": a.rate, "headline": heads})
    ctx.sections["scale"] = (tab + "\n" + _extras(rows) + "\nHeadline ratios:\n\n"
                             + _headline_table(heads))


def _extras(rows: Sequence[Row]) -> str:
    lines = ["| policy | mode | GPUs (nodes) | rate/s | preemptions | batches | mean batch | busy "
             "| node busy min-max |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.summary.policy} | {r.summary.mode} | {r.gpus} ({r.nodes}) | "
              f"{r.summary.rate_per_s:g} | {r.preemptions} | {r.batches} | "
              f"{r.mean_batch_size:.1f} | {r.busy_share:.0%} | "
              f"{r.node_busy_min:.0%}-{r.node_busy_max:.0%} |" for r in rows]
    return "\n".join(lines) + "\n"


def _headline_table(heads: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(heads.values())))
    lines = ["| ratio | " + " | ".join(f"{g} GPUs" for g in heads) + " |",
             "|---|" + "---|" * len(heads)]
    lines += [f"| {k} | " + " | ".join(f"{heads[g][k]:.2f}" for g in heads) + " |"
              for k in names]
    return "\n".join(lines) + "\n"


def _save(name: str, ctx: Context, rows: Sequence[Row], extra: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": str(ctx.data.path.relative_to(REPO_ROOT)),
               "cost_model": ctx.fit.as_dict(), "args": {k: str(v) for k, v in
                                                         vars(ctx.args).items()},
               "stack_slowdown": ctx.slowdown,
               "overheads": {"predict_latency_s": ctx.overheads[0],
                             "dispatch_overhead_s": ctx.overheads[1]},
               **extra, "rows": [r.as_dict() for r in rows]}
    (RESULTS / name).write_text(json.dumps(payload, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="real,sweep,scale")
    parser.add_argument("--cost-profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--cost-stat", choices=["median", "min"], default="median",
                        help="fit each profile point's median or fastest repeat")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rate", type=float, default=2.0)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep-rates", default="0.25,0.5,1.0,1.5,2.0")
    parser.add_argument("--sweep-requests", type=int, default=300)
    parser.add_argument("--scale-gpus", default="8,64")
    parser.add_argument("--scale-requests-per-gpu", type=int, default=600)
    parser.add_argument("--scale-skip", default="",
                        help="policies the scale runs leave out, comma-separated (prompt-hrrn "
                             "at 64 GPUs ran over 15 minutes on one core without finishing)")
    parser.add_argument("--gpus-per-node", type=int, default=4,
                        help="the scale runs' cluster: nodes of this many GPUs, each GPU with "
                             "its own <node>.gpu.<id> queue as `magnus node` lays them out "
                             "(8 GPUs: 2 nodes, 64: 16)")
    # Latencies of the real stack outside the engine (see SimConfig).
    parser.add_argument("--predict-latency", type=float, default=0.05)
    parser.add_argument("--dispatch-overhead", type=float, default=0.03)
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/simulator.md")
    parser.add_argument("--stack-slowdown", default="auto",
                        help="'auto': fit it on results/real_stack.json's fcfs-fixed run "
                             "(1.0 without one); or a number; 1.0: the engine profile alone")
    args = parser.parse_args(argv)
    data = load_dataset()
    fit = load_fit(args.cost_profile, args.cost_stat)
    print(f"dataset {data.path.name}: {len(data.rows)} rows; cost model {fit.model}")
    ctx = Context(args, data, fit_predictor(data, args.max_tokens), fit,
                  (args.predict_latency, args.dispatch_overhead), {})
    if args.stack_slowdown == "auto":
        ctx.slowdown = fit_stack_slowdown(ctx, RESULTS / "real_stack.json") or 1.0
    else:
        ctx.slowdown = float(args.stack_slowdown)
    print(f"stack slowdown: {ctx.slowdown:.3f} (engine step times x this)")
    parts = {"real": part_real, "sweep": part_sweep, "scale": part_scale}
    for part in args.parts.split(","):
        parts[part](ctx)
    if not args.no_doc:
        update_doc(DOC, ctx)
    return 0


def update_doc(path: Path, ctx: Context) -> None:
    """Replace each part's generated block (between `<!-- sim:NAME -->` and `<!-- /sim:NAME -->`)
    and the cost-model block in the hand-written doc; the prose around them stays."""
    if not path.exists():
        print(f"(no {path}: tables not written there)")
        return
    text = path.read_text()
    blocks = dict(ctx.sections)
    blocks["cost"] = _cost_block(ctx.fit, ctx.data.path)
    for name, body in blocks.items():
        start, end = f"<!-- sim:{name} -->", f"<!-- /sim:{name} -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            text = f"{head}{start}\n{body.rstrip()}\n{end}{tail}"
    path.write_text(text)


def _cost_block(fit: CostModelFit, dataset: Path) -> str:
    m, d, p = fit.model, fit.decode, fit.prefill
    return (
        "| law | constants | points | R^2 | mean rel. error | max rel. error |\n"
        "|---|---|---|---|---|---|\n"
        f"| decode step | a = {m.step_base_s * 1e3:.2f} ms, b = {m.step_per_seq_s * 1e3:.3f} "
        f"ms/seq, c = {m.step_per_context_token_s * 1e6:.3f} us/context token | {d.points} | "
        f"{d.r2:.3f} | {d.mean_relative_error:.1%} | {d.max_relative_error:.1%} |\n"
        f"| prefill | p0 = {m.prefill_step_s * 1e3:.2f} ms/step, p1 = "
        f"{m.prefill_per_token_s * 1e3:.4f} ms/token (chunks of {m.chunk_tokens}) | {p.points} | "
        f"{p.r2:.3f} | {p.mean_relative_error:.1%} | {p.max_relative_error:.1%} |\n\n"
        f"Workload lengths: `{dataset.relative_to(REPO_ROOT)}`.\n")


if __name__ == "__main__":
    raise SystemExit(main())
