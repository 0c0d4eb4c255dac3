"""Cross-check of the load harness by a client nobody here wrote: vLLM's own `vllm bench serve`.

    python -m bench crosscheck [--load 1.5] [--window-s 60] [--seed 0]

At the load sweep's highest point (`--load` x the capacity in results/load_sweep.json, Poisson),
the same requests (the test split's, lengths forced with ignore_eos) are sent at the same times
by both clients, to plain vLLM and to Magnus (continuous engine, the `magnus` policy):

- the harness (bench/load_sweep.py's drivers: straight to the engine, or submit-and-read through
  Magnus's own API, latencies from the stack's stage timestamps);
- `vllm bench serve` (bench/vllm_serve.py, the installed vllm package's module) with a custom
  dataset of those prompts and lengths, streaming chat completions, latencies at the client.

Sampling: both clients send the same parameters (Magnus's defaults, SmolLM2's generation
config): vLLM's benchmark sent with its own defaults ran 2.3x fewer milliseconds per output token
on this CPU than the harness's requests (82 against 192 ms at 1.5x), a different workload, not
a measurement error.

Arrival times: vLLM's benchmark draws its Poisson gaps from numpy's global generator seeded with
`--seed`, scaled so the last request goes out at n / rate; the harness draws the same gaps
(`vllm_poisson_offsets`) and the run checks that vLLM's recorded send times match them. Each
prompt is one user message (the app's instruction, a blank line, the input), as
`vllm bench serve` sends a custom prompt; through Magnus all requests name one app (`bench`),
vLLM's benchmark having one `--model`. The target: the two clients' mean end-to-end latencies
within 10% of each other for each server. Writes results/crosscheck.json and the table in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis

from bench.load_sweep import (
    ARRIVAL_SEEDS,
    ENGINE_PROFILE,
    AloneTime,
    Outcome,
    Req,
    drive_direct,
    drive_magnus,
    request_pool,
    summarise,
)
from bench.report import update
from offline.launcher import Stack, free_port
from shared import keys, streams
from shared.schemas import SamplingParams
from shared.settings import REPO_ROOT, LauncherSettings, child_environment

RESULTS = REPO_ROOT / "results" / "crosscheck.json"
SWEEP = REPO_ROOT / "results" / "load_sweep.json"
DOC = REPO_ROOT / "docs" / "benchmarks.md"
APP = "bench"
SAMPLING = SamplingParams()
TOLERANCE = 0.10


@dataclass
class Row:
    server: str  # "vllm" (plain) or "magnus"
    client: str  # "harness" or "vllm bench serve"
    requests: int
    completed: int
    mean_e2e_s: float | None
    p50_e2e_s: float | None
    p99_e2e_s: float | None
    mean_ttft_s: float | None
    mean_tpot_s: float | None
    throughput_rps: float | None
    wall_s: float


def vllm_poisson_offsets(rate: float, n: int, seed: int) -> list[float]:
    """The send times `vllm bench serve --request-rate RATE --seed SEED` uses for n requests
    (vllm/benchmarks/serve.py, get_request: gamma gaps with shape 1 from numpy's global
    generator, summed, then scaled so the last is n / rate)."""
    gen = np.random.RandomState(seed)
    gaps = [float(gen.gamma(shape=1.0, scale=1.0 / rate)) for _ in range(n)]
    times = np.cumsum(gaps)
    return [float(t) for t in times * (n / rate) / times[-1]]


def one_turn(req: Req) -> Req:
    """The request as one user message, as `vllm bench serve` sends a custom prompt."""
    body = req.payload
    prompt = f"{body['instruction']}\n\n{body['input']}" if body["instruction"] else body["input"]
    return Req({"app_id": APP, "user_id": "bench", "instruction": "", "input": prompt,
                "max_tokens": body["max_tokens"], "ignore_eos": True},
               req.true_tokens, req.prompt_tokens)


def warm_up(base_url: str, model: str, headers: Mapping[str, str] | None = None) -> None:
    """One short chat request, answered before the measured run: `vllm bench serve` sends one
    too (its initial test run), so the harness does the same and neither client's first
    requests pay a cold path the other's do not."""
    resp = httpx.post(f"{base_url}/v1/chat/completions", timeout=300, headers=headers, json={
        "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]})
    resp.raise_for_status()


def harness_row(server: str, outcomes: Sequence[Outcome], rate: float, wall_s: float) -> Row:
    """The harness's figures, as the load sweep computes them (load_sweep.summarise)."""
    alone = AloneTime.from_profile(json.loads(ENGINE_PROFILE.read_text()))
    p = summarise(server, "continuous", "poisson", "full", 0.0, rate, outcomes, alone, None,
                  wall_s)
    return Row(server, "harness", p.requests, p.completed, p.mean_e2e_s, p.p50_e2e_s,
               p.p99_e2e_s, p.mean_ttft_s, p.mean_tpot_s, p.throughput_rps, wall_s)


def vllm_bench(base_url: str, model: str, tokenizer: Path, dataset: Path, rate: float, n: int,
               seed: int, out_dir: Path, name: str, api_key: str | None = None
               ) -> dict[str, Any]:
    """Run `vllm bench serve` (its module, in a child process) and return its result JSON
    (`api_key`: the server's bearer key, which it sends from OPENAI_API_KEY)."""
    cmd = [sys.executable, "-m", "bench", "vllm-serve", "--backend", "openai-chat",
           "--base-url", base_url, "--endpoint", "/v1/chat/completions", "--model", model,
           "--tokenizer", str(tokenizer), "--dataset-name", "custom",
           "--dataset-path", str(dataset), "--custom-output-len", "-1",
           "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(n),
           "--request-rate", str(rate), "--seed", str(seed), "--ignore-eos",
           # The sampling both servers use by default (SmolLM2's generation config, which the
           # harness sends): on this CPU top-p and the repetition penalty cost more than the
           # model's forward pass, so a client sending vLLM's defaults would run another load.
           "--temperature", str(SAMPLING.temperature), "--top-p", str(SAMPLING.top_p),
           "--repetition-penalty", str(SAMPLING.repetition_penalty),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--save-detailed", "--result-dir", str(out_dir),
           "--result-filename", f"{name}.json"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT,
                   env=child_environment({"OPENAI_API_KEY": api_key} if api_key else {}))
    result: dict[str, Any] = json.loads((out_dir / f"{name}.json").read_text())
    return result


def bench_row(server: str, result: dict[str, Any], wall_s: float) -> Row:
    def seconds(key: str) -> float | None:
        value = result.get(key)
        return None if value is None else float(value) / 1000

    return Row(server, "vllm bench serve", int(result["num_prompts"]), int(result["completed"]),
               seconds("mean_e2el_ms"), seconds("p50_e2el_ms"), seconds("p99_e2el_ms"),
               seconds("mean_ttft_ms"), seconds("mean_tpot_ms"),
               float(result["request_throughput"]), wall_s)


def own_metrics(r: redis.Redis) -> dict[str, float | int | None]:
    """Mean TTFT and TPOT of every request finished since the database was emptied, from
    Magnus's own record: the results on the completed stream and each request's queued time
    (as the stack's histograms magnus_time_to_first_token_seconds and ..._per_output_token_...
    measure them)."""
    results = [e.result for _, e in streams.read_range(r, streams.COMPLETED)
               if e.kind == "request" and e.result is not None
               and e.result.finish_reason != "error"]
    pipe = r.pipeline(transaction=False)
    for res in results:
        pipe.hget(keys.request(res.request_id), "queued_at")
    ttft, tpot = [], []
    for res, queued_at in zip(results, pipe.execute(), strict=True):
        if queued_at is None or res.first_token_at is None:
            continue
        ttft.append(res.first_token_at - float(queued_at))
        if res.generated_tokens > 1:
            tpot.append((res.finished_at - res.first_token_at) / (res.generated_tokens - 1))
    return {"requests": len(results),
            "mean_ttft_s": float(np.mean(ttft)) if ttft else None,
            "mean_tpot_s": float(np.mean(tpot)) if tpot else None}


def send_time_error(result: dict[str, Any], offsets: Sequence[float]) -> float | None:
    """Largest gap (s) between vLLM's recorded send times and the harness's offsets, both from
    the first request; None when the result has no send times."""
    starts = result.get("start_times")
    if not starts or len(starts) != len(offsets):
        return None
    ours = np.asarray(offsets) - offsets[0]
    theirs = np.sort(np.asarray(starts, dtype=float))
    theirs -= theirs[0]
    return float(np.max(np.abs(np.sort(ours) - theirs)))


def table(rows: Sequence[Row], agreement: dict[str, float | None]) -> str:
    def f(v: float | None, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| server | client | requests | completed | mean e2e s | p50 s | p99 s | "
             "mean TTFT s | mean TPOT ms | req/s | bench / harness mean e2e |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = agreement.get(r.server) if r.client == "vllm bench serve" else None
        lines.append(
            f"| {r.server} | {r.client} | {r.requests} | {r.completed} | {f(r.mean_e2e_s)} | "
            f"{f(r.p50_e2e_s)} | {f(r.p99_e2e_s)} | {f(r.mean_ttft_s)} | "
            f"{f(None if r.mean_tpot_s is None else r.mean_tpot_s * 1000, 1)} | "
            f"{f(r.throughput_rps)} | {'-' if ratio is None else f'{ratio:.3f}x'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, default=1.5)
    parser.add_argument("--capacity", type=float, default=None,
                        help="requests/s at 1.0x (default: results/load_sweep.json's)")
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--servers", default="vllm,magnus",
                        help="which to drive: vllm (plain), magnus, or both")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)

    capacity = args.capacity or float(json.loads(SWEEP.read_text())["capacity_rps"])
    rate = capacity * args.load
    n = round(rate * args.window_s)
    # The load sweep's sample at this point (bench/load_sweep.py run_plan), one turn each.
    sample_seed = args.seed + int(1000 * args.load) + ARRIVAL_SEEDS["poisson"]
    reqs = [one_turn(r) for r in random.Random(sample_seed).sample(request_pool(), n)]
    offsets = vllm_poisson_offsets(rate, n, args.seed)
    work = REPO_ROOT / "run" / "crosscheck"
    work.mkdir(parents=True, exist_ok=True)
    dataset = work / "requests.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": r.payload["input"],
                                           "output_tokens": r.true_tokens}) + "\n"
                               for r in reqs))
    print(f"capacity {capacity:.3f} req/s, load {args.load}x: {n} requests at {rate:.3f} req/s",
          flush=True)

    settings = LauncherSettings(
        engine_mode="continuous", ingress_port=free_port(), engine_base_port=free_port(),
        metrics_base_port=0, run_dir=work / "stack", redis_persist=False)
    rows: list[Row] = []
    own: dict[str, float | int | None] = {}
    send_errors: dict[str, float | None] = {}
    started = time.time()
    env = {"MAGNUS_POLICY": "magnus", "MAGNUS_RETRAIN_EVERY": "1000000"}
    with Stack(settings, service_env=env) as stack:
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        engine_url, model = stack.engine_url(0), settings.served_model_name
        servers = args.servers.split(",")
        if "vllm" in servers:
            warm_up(engine_url, model, stack.engine_headers())
            t0 = time.time()
            outs = asyncio.run(drive_direct(engine_url, model, reqs, offsets, args.timeout,
                                            stack.engine_headers()))
            rows.append(harness_row("vllm", outs, rate, time.time() - t0))
            print(table(rows[-1:], {}), flush=True)
            t0 = time.time()
            result = vllm_bench(engine_url, model, settings.model_dir, dataset, rate, n,
                                args.seed, work, "vllm", stack.engine_api_key)
            rows.append(bench_row("vllm", result, time.time() - t0))
            send_errors["vllm"] = send_time_error(result, offsets)

        for client in ("harness", "vllm bench serve") if "magnus" in servers else ():
            r.flushdb()  # each Magnus run starts from an empty stack and a fresh predictor
            stack.restart("predictor", env)
            stack.restart_schedulers(env)
            stack.wait_ready(180)
            if client == "harness":
                warm_up(stack.ingress_url, APP)
            t0 = time.time()
            if client == "harness":
                outs = asyncio.run(drive_magnus(stack.ingress_url, r, reqs, offsets,
                                                args.timeout))
                rows.append(harness_row("magnus", outs, rate, time.time() - t0))
            else:
                result = vllm_bench(stack.ingress_url, APP, settings.model_dir, dataset, rate,
                                    n, args.seed, work, "magnus")
                rows.append(bench_row("magnus", result, time.time() - t0))
                send_errors["magnus"] = send_time_error(result, offsets)
                own = own_metrics(r)
                print(f"Magnus's own timestamps of the same requests: {own}", flush=True)
        r.close()

    agreement: dict[str, float | None] = {}
    for server in args.servers.split(","):
        harness = next(x for x in rows if x.server == server and x.client == "harness")
        bench = next(x for x in rows if x.server == server and x.client != "harness")
        agreement[server] = (None if not harness.mean_e2e_s or bench.mean_e2e_s is None
                             else bench.mean_e2e_s / harness.mean_e2e_s)
    text = table(rows, agreement)
    print(text)
    within = {s: a is not None and abs(a - 1) <= TOLERANCE for s, a in agreement.items()}
    print(f"within {TOLERANCE:.0%}: {within}; largest send-time gap (s): {send_errors}")
    args.out.write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "capacity_rps": capacity,
        "rate": rate, "requests": n, "rows": [asdict(x) for x in rows],
        "bench_over_harness_mean_e2e": agreement, "within_tolerance": within,
        "tolerance": TOLERANCE, "max_send_time_gap_s": send_errors,
        # The streamed run through Magnus as Magnus itself timed it (acceptance, first token,
        # last token): vLLM's client against the server's own record of the same requests.
        "magnus_own_metrics_of_streamed_run": own,
        "wall_s": time.time() - started,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=1) + "\n")
    update(args.doc, {"crosscheck": text})
    return 0 if all(within.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
