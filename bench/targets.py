"""Where Magnus wins, and by how much: repeated, interleaved runs on the isolated engine.

    python -m bench targets --curve                 measure the isolated serving curve (the knee)
    python -m bench targets --points burst300 --repeats 3
    python -m bench targets --points poisson-1.0,poisson-1.3 --repeats 3
    python -m bench targets --report                only rewrite docs/benchmarks.md's table

How a run is made (docs/benchmarks.md, "Where Magnus wins"):
- **The isolated engine** (bench/isolation.py): the engine's compute on the last core, every
  other process (this harness included) on the others, as a GPU host's accelerator is the
  engine's alone; checked during every run (a run whose engine shared its core fails).
- **vLLM's limits as an operator sets them**: `max_num_seqs` at the knee of the serving curve
  measured in this configuration (results/serving_curve_isolated.json: the smallest concurrency
  reaching `--knee-share` of the most output throughput), for every policy and as Magnus's own
  concurrency cap; plain vLLM also runs with vLLM's default limit, and targets are judged
  against the better of the two plain configurations.
- **Points**: batch jobs, `burst<N>` (N requests at once through the OpenAI API,
  `/v1/chat/completions`, as a client with a batch would: Magnus's ingress or vLLM's server);
  online arrivals `<poisson|gamma|azure>-<load>` (gamma with a coefficient of variation of 3;
  the Azure trace's own gaps, time-scaled), load in multiples of the measured capacity, over
  `--window-s`, sent to `/v1/requests` (Magnus) or streamed to the engine (plain vLLM).
- **Requests**: a seeded sample of the workload's test split with their profiled lengths forced
  (`max_tokens` = the length, `ignore_eos`), the same at the same offsets for every policy and
  repeat.
- **Interleaving**: per repeat, every point on the knee engine, its policies back to back
  (vllm, magnus, magnus-oracle: A B C), then every point on the default-limit engine (vllm);
  then the next repeat. Rows (one per point, policy, engine configuration and repeat) go to
  results/load_sweep.json under "targets"; a later part replaces rows with the same key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.isolation import CoreWatch, Isolation, settle_engine_threads
from bench.load_sweep import (
    ARRIVAL_SEEDS,
    ENGINE_PROFILE,
    ISOLATED_CURVE,
    AloneTime,
    Outcome,
    Req,
    capacity_of,
    drive_direct,
    drive_magnus,
    engine_preemptions,
    knee_of,
    measure_isolated_curve,
    request_pool,
    summarise,
)
from bench.real_stack import machine
from offline.launcher import Stack, free_port
from offline.workload.arrivals import azure_trace_arrivals, gamma_arrivals, poisson_arrivals
from shared.schemas import SamplingParams
from shared.settings import REPO_ROOT, LauncherSettings

RESULTS = REPO_ROOT / "results"
OUT = RESULTS / "load_sweep.json"
DEFAULT_POINTS = ("burst300,poisson-1.0,poisson-1.3,gamma-1.0,gamma-1.3,poisson-0.3,gamma-0.3,"
                  "azure-1.0,burst1000")
VLLM = "vllm"  # plain vLLM, no Magnus: the harness talks to the engine's own server
KNEE, DEFAULT = "knee", "default"  # the engine's max_num_seqs: at the knee, or vLLM's own
# Which policies run on which engine configuration, in run order (interleaved per repeat).
POLICIES: dict[str, tuple[str, ...]] = {KNEE: (VLLM, "magnus", "magnus-oracle"),
                                        DEFAULT: (VLLM,)}
GAMMA_CV = 3.0
SAMPLING = SamplingParams()


@dataclass(frozen=True)
class PointSpec:
    name: str
    kind: str  # burst | poisson | gamma | azure
    load: float  # x capacity (0 for a burst)
    requests: int | None  # a burst's size (online: rate x window)

    @classmethod
    def parse(cls, name: str) -> PointSpec:
        if name.startswith("burst") and name[5:].isdigit():
            return cls(name, "burst", 0.0, int(name[5:]))
        kind, _, load = name.partition("-")
        if kind not in ("poisson", "gamma", "azure") or not load:
            raise ValueError(f"point {name!r}: burst<N> or <poisson|gamma|azure>-<load>")
        return cls(name, kind, float(load), None)

    def offsets(self, rate: float, n: int, seed: int) -> list[float]:
        if self.kind == "burst":
            return [0.0] * n
        if self.kind == "poisson":
            return poisson_arrivals(rate, n, seed)
        if self.kind == "gamma":
            return gamma_arrivals(rate, n, seed, cv=GAMMA_CV)
        return azure_trace_arrivals(rate, n, seed)


# --- batch jobs through the OpenAI API --------------------------------------------------------
async def drive_openai_batch(base_url: str, reqs: Sequence[Req], model: str | None,
                             headers: Mapping[str, str], timeout_s: float,
                             magnus: bool) -> list[Outcome]:
    """Every request at once to `/v1/chat/completions` (not streamed), as a client with a
    batch job would; each one's completion time is when its answer arrives. `model`: the
    engine's model name (plain vLLM); None: each request's app (Magnus names the app there)."""
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 headers=dict(headers)) as http:

        async def one(req: Req) -> Outcome:
            body = req.payload
            messages = ([{"role": "system", "content": body["instruction"]}]
                        if body["instruction"] else [])
            # The same sampling on both servers (Magnus's defaults, SmolLM2's generation
            # config): on this CPU top-p and the repetition penalty cost about as much as the
            # forward pass, so a client leaving vLLM at its own defaults would give it less work
            # (a trial run did: 19% less engine CPU for the same tokens).
            chat: dict[str, Any] = {
                "model": model or body["app_id"], "user": body["user_id"],
                "messages": [*messages, {"role": "user", "content": body["input"]}],
                "max_tokens": body["max_tokens"], "ignore_eos": True, "stream": False,
                "temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p}
            if magnus:
                chat["true_output_tokens"] = req.true_tokens  # what the oracle plans with
            else:  # vLLM's extension; Magnus applies its own, the same value
                chat["repetition_penalty"] = SAMPLING.repetition_penalty
            out = Outcome(sent_at=time.time(), true_tokens=req.true_tokens)
            try:
                resp = await http.post("/v1/chat/completions", json=chat)
            except httpx.HTTPError as exc:
                out.status, out.error = "failed", f"{type(exc).__name__}: {exc}"[:200]
                return out
            if resp.status_code != 200:
                out.status, out.error = "failed", f"{resp.status_code}: {resp.text[:200]}"
                return out
            usage = resp.json()["usage"]
            out.status, out.finished_at = "completed", time.time()
            out.input_tokens = int(usage["prompt_tokens"])
            out.generated_tokens = int(usage["completion_tokens"])
            return out

        return list(await asyncio.gather(*(one(r) for r in reqs)))


# --- one run ----------------------------------------------------------------------------------
@dataclass
class Runner:
    args: argparse.Namespace
    isolation: Isolation | None
    pool: Sequence[Req]
    alone: AloneTime
    capacity: float
    knee: int

    def settings(self, config: str) -> LauncherSettings:
        s = LauncherSettings(
            engine_mode="continuous", ingress_port=free_port(), engine_base_port=free_port(),
            metrics_base_port=0, run_dir=REPO_ROOT / "run" / f"targets-{config}",
            redis_persist=False, engine_max_num_seqs=self.knee if config == KNEE else None)
        return self.isolation.settings(s) if self.isolation else s

    def start(self, config: str) -> Stack:
        # Magnus's own cap: the same knee (the engine never queues what Magnus sends).
        env = {"MAGNUS_POLICY": "magnus", "MAGNUS_MAX_RUNNING_REQUESTS": str(self.knee),
               "MAGNUS_RETRAIN_EVERY": "1000000"}
        stack = Stack(self.settings(config), service_env=env)
        stack.start()
        if self.isolation is not None:
            moved = settle_engine_threads(stack, self.isolation)
            print(f"isolation: {moved} engine helper threads moved to the service cores",
                  flush=True)
        return stack

    def workload(self, point: PointSpec) -> tuple[list[Req], list[float], float]:
        rate = self.capacity * point.load
        n = point.requests or max(self.args.min_requests, round(rate * self.args.window_s))
        seed = self.args.seed + int(1000 * point.load) + ARRIVAL_SEEDS.get(point.kind, 43) + \
            (point.requests or 0)
        reqs = random.Random(seed).sample(list(self.pool), n) if n <= len(self.pool) else \
            random.Random(seed).choices(list(self.pool), k=n)
        return reqs, point.offsets(rate, n, seed), rate

    def run(self, stack: Stack, point: PointSpec, policy: str, config: str, repeat: int
            ) -> dict[str, Any]:
        reqs, offsets, rate = self.workload(point)
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        headers = stack.engine_headers()
        if policy != VLLM:
            env = {"MAGNUS_POLICY": policy, "MAGNUS_MAX_RUNNING_REQUESTS": str(self.knee),
                   "MAGNUS_RETRAIN_EVERY": "1000000"}
            r.flushdb()
            stack.restart("predictor", env)
            stack.restart_schedulers(env)
            stack.wait_ready(180)
        before = engine_preemptions(stack.engine_url(0))
        watch = CoreWatch(stack, self.isolation) if self.isolation else None
        t0 = time.time()
        try:
            if watch is not None:
                watch.__enter__()
            if point.kind == "burst":
                base = stack.engine_url(0) if policy == VLLM else stack.ingress_url
                outs = asyncio.run(drive_openai_batch(
                    base, reqs, stack.settings.served_model_name if policy == VLLM else None,
                    headers if policy == VLLM else {}, self.args.timeout, policy != VLLM))
            elif policy == VLLM:
                outs = asyncio.run(drive_direct(stack.engine_url(0),
                                                stack.settings.served_model_name, reqs, offsets,
                                                self.args.timeout, headers))
            else:
                outs = asyncio.run(drive_magnus(stack.ingress_url, r, reqs, offsets,
                                                self.args.timeout))
        finally:
            if watch is not None:
                watch.__exit__(None, None, None)
            r.close()
        wall = time.time() - t0
        after = engine_preemptions(stack.engine_url(0))
        summary = summarise(policy, "continuous", point.kind, "full", point.load, rate, outs,
                            self.alone, None if before is None or after is None
                            else after - before, wall)
        isolation = watch.report.as_dict() if watch is not None else None
        row = {**summary.row(), "point": point.name, "config": {
            "engine": config, "max_num_seqs": self.knee if config == KNEE else None,
            "isolated": self.isolation is not None}, "repeat": repeat,
            "mean_completion_s": summary.mean_e2e_s, "isolation": isolation,
            "makespan_s": _makespan(outs)}
        line = (f"{point.name} r{repeat} {policy}@{config}: {summary.completed}/"
                f"{summary.requests} mean {summary.mean_e2e_s or 0:.1f} s, p99 "
                f"{summary.p99_e2e_s or 0:.1f} s, {summary.throughput_rps:.3f} req/s, worst "
                f"slowdown {summary.max_slowdown or 0:.0f} ({wall:.0f} s)")
        print(line, flush=True)
        if watch is not None:
            print("  " + watch.report.line(), flush=True)
            watch.report.check()  # a run on a shared core measures nothing: stop here
        return row


def _makespan(outs: Sequence[Outcome]) -> float | None:
    done = [o.finished_at for o in outs if o.finished_at is not None]
    return max(done) - min(o.sent_at for o in outs) if done else None


# --- results ----------------------------------------------------------------------------------
def row_key(row: Mapping[str, Any]) -> tuple[str, str, str, int]:
    return (str(row["point"]), str(row["policy"]), str(row["config"]["engine"]),
            int(row["repeat"]))


def save_rows(new: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], path: Path = OUT
              ) -> None:
    """Merge `new` into the file's "targets" rows (same key: replaced), keeping the rest."""
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    rows = {row_key(r): r for r in data.get("targets", [])}
    rows.update({row_key(r): dict(r) for r in new})
    data["targets"] = sorted(rows.values(), key=row_key)
    data["targets_meta"] = {**data.get("targets_meta", {}), **meta}
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default=DEFAULT_POINTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-repeat", type=int, default=1,
                        help="number the repeats from here (a later part adds repeats)")
    parser.add_argument("--configs", default=f"{KNEE},{DEFAULT}")
    parser.add_argument("--curve", action="store_true",
                        help="measure the isolated serving curve first (else read it)")
    parser.add_argument("--curve-concurrency", default="8,16,24,32,48,64,96")
    parser.add_argument("--knee-share", type=float, default=0.97)
    parser.add_argument("--window-s", type=float, default=120.0)
    parser.add_argument("--min-requests", type=int, default=40)
    parser.add_argument("--shared-cores", action="store_true",
                        help="no isolation: every process on every core (labelled shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--report", action="store_true", help="only rewrite the docs' table")
    parser.add_argument("--out", type=Path, default=OUT,
                        help="the results file (another one for a trial run: no report then)")
    args = parser.parse_args(argv)
    from bench import report

    if args.report:
        return report.main([])
    isolation = None if args.shared_cores else Isolation.for_machine()
    if isolation is not None:
        isolation.pin_this_process()
    pool = request_pool()
    alone = AloneTime.from_profile(json.loads(ENGINE_PROFILE.read_text()))
    started = time.time()
    if isolation is None:
        raise SystemExit("the target runs are isolated (two cores or more); --shared-cores is "
                         "for `python -m bench load`")
    levels = [int(x) for x in args.curve_concurrency.split(",")]
    curve = (measure_isolated_curve(isolation, pool, levels, args.seed, args.timeout)
             if args.curve or not ISOLATED_CURVE.exists()
             else json.loads(ISOLATED_CURVE.read_text()))
    knee, capacity = knee_of(curve, args.knee_share), capacity_of(curve, pool)
    print(f"isolated serving curve: capacity {capacity:.3f} req/s, knee {knee} at once "
          f"({args.knee_share:.0%} of the most output throughput)", flush=True)
    runner = Runner(args, isolation, pool, alone, capacity, knee)
    points = [PointSpec.parse(p) for p in args.points.split(",") if p]
    meta = {"capacity_rps": capacity, "knee": knee, "knee_share": args.knee_share,
            "curve": str(ISOLATED_CURVE.relative_to(REPO_ROOT)), "machine": machine(),
            "isolation": isolation.describe() if isolation else None,
            "window_s": args.window_s, "gamma_cv": GAMMA_CV}
    configs = [c for c in args.configs.split(",") if c]
    for repeat in range(args.first_repeat, args.first_repeat + args.repeats):
        for config in configs:
            stack = runner.start(config)
            try:
                for point in points:
                    rows = [runner.run(stack, point, policy, config, repeat)
                            for policy in POLICIES[config]]
                    save_rows(rows, {**meta, "updated_at": time.strftime(
                        "%Y-%m-%d %H:%M UTC", time.gmtime())}, args.out)
            finally:
                stack.stop()
        print(f"repeat {repeat} done at {(time.time() - started) / 60:.1f} min", flush=True)
    return report.main([]) if args.out == OUT else 0


if __name__ == "__main__":
    raise SystemExit(main())
