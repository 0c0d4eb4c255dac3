"""Soak: steady load on a supervised stack while a random process is killed every minute.

    python -m bench soak [--minutes 10] [--rate 2.0] [--kill-every 60] [--seed 1]

Open-loop Poisson arrivals (`--rate` requests/s for `--minutes`) of short requests from a few
apps, each submitted as a client would (retried on 429 / 503 / a refused connection until it
gets its 202). Every `--kill-every` seconds one process gets SIGKILL, drawn at random in
shuffled rounds (each kind once before any twice): the worker, the engine, the predictor, the
leading or the standby scheduler, ingress or Redis. The launcher's supervisor restarts it;
nothing else helps. After the last arrival the run waits for every accepted request to end, then
counts completed, failed (with a reason), lost (no final state within `--drain-s`) and
duplicated (more than one final result), and writes results/soak.json and the table in
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from bench import faults
from offline.launcher import Stack
from shared import keys, state
from shared.schemas import RequestStatus

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "results" / "soak.json"
DOC = REPO_ROOT / "docs" / "reliability.md"

STANDBY_SCHEDULER = "scheduler (standby)"
# What a kill may hit: one process of each kind the stack runs on one GPU.
TARGETS = ["worker0", "engine0", "predictor", faults.LEADER_SCHEDULER, STANDBY_SCHEDULER,
           "ingress", "redis"]
APPS = [("qa", "Answer the question in one short sentence."),
        ("translate", "Translate the user's text into French."),
        ("summarise", "Summarise the text in a few words."),
        ("grammar", "Correct the grammar of the text.")]


@dataclass
class Kill:
    at_s: float  # since the first arrival
    target: str
    process: str
    recovered_s: float | None  # until restarted and the stack ready again (None: not within 180 s)


@dataclass
class Arrival:
    at_s: float
    request_id: str | None  # None: not accepted (refused, or not within the client's patience)
    error: str | None


def request_body(rng: random.Random, i: int) -> dict[str, object]:
    app_id, instruction = rng.choice(APPS)
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone", "cloud"])
                     for _ in range(rng.randint(3, 40)))
    return {"app_id": app_id, "instruction": instruction, "input": f"soak {i}: {words}",
            "user_id": f"user{rng.randint(1, 20)}", "max_tokens": rng.randint(4, 32)}


def kill_one(stack: Stack, target: str) -> tuple[str, float | None]:
    """SIGKILL the target's process; (which process, seconds until it serves again: for the
    leading scheduler, until another process leads)."""
    leader = stack.leader_scheduler() if "scheduler" in target else None
    if target == faults.LEADER_SCHEDULER and leader is not None:
        return leader.name, faults.kill_leader_scheduler(stack)()
    if "scheduler" in target:  # the standby (or, when none leads right now, any scheduler)
        names = [c.name for c in stack.children if c.name.startswith("scheduler")
                 and (leader is None or c.name != leader.name)]
        target = names[0]
    return target, faults.kill(stack, target, signal.SIGKILL)()


def kill_order(rng: random.Random, n: int) -> list[str]:
    """`n` targets in random order, drawn in shuffled rounds of every target: each kind of
    process is killed once before any is killed twice (a plain draw left two kinds untouched in
    ten minutes)."""
    order: list[str] = []
    while len(order) < n:
        round_ = list(TARGETS)
        rng.shuffle(round_)
        order.extend(round_)
    return order[:n]


def killer(stack: Stack, rng: random.Random, every_s: float, t0: float, stop: threading.Event,
           kills: list[Kill]) -> None:
    order = kill_order(rng, 10_000)
    while not stop.wait(max(0.0, t0 + every_s * (len(kills) + 1) - time.monotonic())):
        target = order[len(kills)]
        at = time.monotonic() - t0
        process, recovered = kill_one(stack, target)
        kills.append(Kill(round(at, 1), target, process,
                          None if recovered is None else round(recovered, 1)))
        print(f"[soak] {at:6.0f} s  killed {process} ({target}): "
              f"{'not back' if recovered is None else f'back in {recovered:.1f} s'}", flush=True)


def drive(stack: Stack, rng: random.Random, kill_rng: random.Random, rate: float,
          duration_s: float, kill_every_s: float) -> tuple[list[Arrival], list[Kill]]:
    kills: list[Kill] = []
    stop = threading.Event()
    t0 = time.monotonic()
    kill_thread = threading.Thread(target=killer,
                                   args=(stack, kill_rng, kill_every_s, t0, stop, kills),
                                   name="killer", daemon=True)
    kill_thread.start()
    futures: list[tuple[float, cf.Future[str]]] = []
    with cf.ThreadPoolExecutor(64) as pool:
        at, i = 0.0, 0
        while at < duration_s:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            body = request_body(rng, i)
            futures.append((at, pool.submit(faults.submit_one, stack.ingress_url, body, 120.0)))
            at += rng.expovariate(rate)
            i += 1
        stop.set()
        arrivals = []
        for at_s, fut in futures:
            try:
                arrivals.append(Arrival(round(at_s, 2), fut.result(), None))
            except AssertionError as exc:
                arrivals.append(Arrival(round(at_s, 2), None, str(exc)[:200]))
    kill_thread.join(timeout=240)
    return arrivals, kills


def latencies(r: redis.Redis, ids: list[str]) -> list[float]:
    out = []
    for rid in ids:
        h = r.hgetall(keys.request(rid))
        view = state.view_from_hash(rid, h)
        ts = view.timestamps
        if view.status is RequestStatus.COMPLETED and ts.get("finished") and ts.get("queued"):
            out.append(ts["finished"] - ts["queued"])
    return sorted(out)


def pct(xs: list[float], q: float) -> float | None:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def table(summary: dict[str, object], kills: list[Kill]) -> str:
    cols = ["offered", "accepted", "not accepted", "completed", "failed", "lost", "duplicated",
            "kills", "minutes"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(str(summary[c.replace(" ", "_")]) for c in cols) + " |", "",
             "| at s | killed | process | back in s |", "|---|---|---|---|"]
    for k in kills:
        back = "-" if k.recovered_s is None else f"{k.recovered_s:.1f}"
        lines.append(f"| {k.at_s:.0f} | {k.target} | {k.process} | {back} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from offline.launcher import free_port
    from offline.model import build_tiny
    from shared.settings import LauncherSettings

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds")
    parser.add_argument("--drain-s", type=float, default=600.0,
                        help="how long accepted requests may take to end after the last arrival")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    run_dir = REPO_ROOT / "run" / "soak"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    # Persisted Redis, as `make run` runs it: a killed Redis must come back with what it held.
    settings = LauncherSettings(redis_url=None, model_dir=build_tiny(), gpus=1,
                                ingress_port=free_port(), engine_base_port=free_port(),
                                metrics_base_port=0,
                                run_dir=run_dir, redis_persist=True)
    stack = Stack(settings)
    # Separate streams: the same seed kills the same processes whatever the arrivals do.
    rng, kill_rng = random.Random(args.seed), random.Random(args.seed + 1_000)
    started = time.time()
    try:
        stack.start()
        stack.start_supervision()
        arrivals, kills = drive(stack, rng, kill_rng, args.rate, args.minutes * 60, args.kill_every)
        ids = [a.request_id for a in arrivals if a.request_id is not None]
        final = faults.wait_final(stack, ids, args.drain_s)
        seen = faults.final_results_per_request(stack)
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        lat = latencies(r, ids)
        failures = Counter(str(r.hget(keys.request(rid), "error"))[:80]
                           for rid, s in final.items() if s is RequestStatus.FAILED)
        r.close()
        gave_up = stack.gave_up
    finally:
        stack.stop()
    statuses = Counter(s for s in final.values() if s is not None)
    summary: dict[str, object] = {
        "offered": len(arrivals), "accepted": len(ids),
        "not_accepted": len(arrivals) - len(ids),
        "completed": statuses[RequestStatus.COMPLETED],
        "failed": statuses[RequestStatus.FAILED],
        "lost": sum(1 for rid in ids if not faults._is_final(final.get(rid))),
        "duplicated": sum(1 for rid in ids if seen[rid] > 1),
        "kills": len(kills), "minutes": args.minutes,
    }
    print(table(summary, kills))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.time() - started), "args": {k: str(v) for k, v in vars(args).items()},
        "summary": summary, "supervisor_gave_up": gave_up,
        "latency_s": {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "p99": pct(lat, 0.99),
                      "max": lat[-1] if lat else None},
        "failure_reasons": dict(failures.most_common(10)),
        "not_accepted_reasons": dict(Counter(a.error for a in arrivals
                                             if a.error is not None).most_common(10)),
        "restarts": stack.restarts, "kills": [asdict(k) for k in kills],
    }, indent=1) + "\n")
    if DOC.exists() and args.out == RESULTS:
        from bench.report import update

        update(DOC, {"soak": table(summary, kills)})
    ok = summary["lost"] == 0 and summary["duplicated"] == 0 and gave_up is None
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
