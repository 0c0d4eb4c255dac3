"""Magnus against the baselines on the real stack and the real engine, in one run.

The same requests (a seeded mix of the workload's test split, with their profiled lengths for
the oracle) arrive at the same times for every policy. One stack per engine mode; between
policies only the scheduler and predictor restart (the engine stays loaded) and Redis is emptied.

    python -m bench.real_stack [--requests 60] [--rates 2.0] [--modes static,continuous]
        [--policies fcfs-fixed,sjf-predicted,magnus,magnus-oracle] [--arrivals poisson|azure]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.metrics import Outcome, RunSummary, summarise, table
from services.launcher import Stack, free_port
from services.workload.analysis import load_profile
from services.workload.arrivals import azure_trace_arrivals, poisson_arrivals
from services.workload.catalog import load_apps, load_records
from services.workload.profile import DEFAULT_OUT as PROFILE
from shared import keys
from shared.schemas import CompletedEvent
from shared.settings import REPO_ROOT, LauncherSettings

STATIC_POLICIES = ["fcfs-fixed", "sjf-predicted", "magnus", "magnus-oracle", "magnus-no-hrrn",
                   "magnus-fixed-batch"]
CONTINUOUS_POLICIES = ["continuous-fcfs", "magnus"]
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
    for _, fields in r.xrange(keys.STREAM_COMPLETED):
        event = CompletedEvent.model_validate_json(fields["event"])
        if event.batch is not None:
            b = event.batch
            waste += b.size * b.max_generated_tokens - b.total_generated_tokens
    return waste


def run_mode(mode: str, policies: list[str], rates: list[float], reqs: list[dict[str, Any]],
             args: argparse.Namespace) -> list[RunSummary]:
    run_dir = REPO_ROOT / "run" / f"bench-{mode}"
    settings = LauncherSettings(engine_mode=mode,
                                ingress_port=free_port(), engine_base_port=free_port(),
                                run_dir=run_dir)
    rows: list[RunSummary] = []
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
                stack.restart("scheduler", env)
                stack.wait_ready(120)
                outcomes = asyncio.run(replay(stack.ingress_url, reqs, arrivals, args.timeout))
                row = summarise(policy, mode, rate, outcomes, wasted_tokens(r))
                print(table([row]).splitlines()[-1], flush=True)
                rows.append(row)
        r.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rates", default="2.0")
    parser.add_argument("--modes", default="static,continuous")
    parser.add_argument("--policies", help="comma-separated; default: all for each mode")
    parser.add_argument("--arrivals", choices=["poisson", "azure"], default="poisson")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "real_stack.json")
    args = parser.parse_args(argv)
    reqs = workload(args.requests, args.seed, args.max_tokens)
    rates = [float(x) for x in args.rates.split(",")]
    rows: list[RunSummary] = []
    for mode in args.modes.split(","):
        policies = (args.policies.split(",") if args.policies else
                    STATIC_POLICIES if mode == "static" else CONTINUOUS_POLICIES)
        rows += run_mode(mode, policies, rates, reqs, args)
    print()
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
