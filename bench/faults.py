"""Fault injection on the real stack: kill a process, count what became of every request.

    python -m bench faults [--requests 20]     every fault below on one supervised stack (tiny
                                               model), then results/faults.json and the table
                                               in docs/reliability.md

Each fault: submit N requests, inject the fault while they are in flight, wait until each is
final, and count completed, failed (with a reason), lost (no final state within the deadline)
and duplicated (more than one final result on the completed stream); `recovery_s` is the time
from the fault until the killed service is serving again (restarted by the launcher's
supervisor, or the stack started again); for the leader scheduler, until the standby leads.
The integration suite runs the same scenarios with a few requests each
(tests/integration/test_faults.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import redis

from offline.launcher import Stack
from services.engine import get_engine
from services.engine.base import EngineError
from shared import keys, state, streams
from shared.schemas import RequestStatus

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "results" / "faults.json"
DOC = REPO_ROOT / "docs" / "reliability.md"


@dataclass
class FaultResult:
    fault: str
    submitted: int
    completed: int
    failed: int
    lost: int
    duplicated: int
    recovery_s: float | None
    failures: list[str]


def submit_one(base_url: str, body: dict[str, object], patience_s: float = 60.0) -> str:
    """Submit until accepted (202), as a client should: a 429 or 503 (Redis restarting) is
    retried after its Retry-After, a refused connection (ingress restarting) after 0.5 s;
    AssertionError for any other answer, or when not accepted within `patience_s`."""
    deadline = time.monotonic() + patience_s
    with httpx.Client(base_url=base_url, timeout=30) as c:
        while True:
            try:
                resp = c.post("/v1/requests", json=body)
            except httpx.TransportError:
                resp = None  # ingress itself restarting
            if resp is not None and resp.status_code == 202:
                return str(resp.json()["request_id"])
            if resp is not None and resp.status_code not in (429, 503):
                raise AssertionError(f"refused: {resp.status_code} {resp.text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not accepted within {patience_s:.0f} s: "
                                     f"{resp and resp.text}")
            time.sleep(float(resp.headers.get("retry-after", 0.5)) if resp else 0.5)


def submit(stack: Stack, n: int, tag: str, max_tokens: int = 8,
           ignore_eos: bool = False) -> list[str]:
    """N accepted requests (202)."""

    def one(i: int) -> str:
        return submit_one(stack.ingress_url, {
            "app_id": "qa", "instruction": "Answer briefly.", "input": f"{tag} question {i}",
            "max_tokens": max_tokens, "ignore_eos": ignore_eos})

    with cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def wait_final(stack: Stack, ids: list[str], timeout_s: float) -> dict[str, RequestStatus | None]:
    deadline = time.monotonic() + timeout_s
    current: dict[str, RequestStatus | None] = {}
    while time.monotonic() < deadline:
        try:
            r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
            current = state.statuses(r, ids)
            r.close()
        except redis.ConnectionError:
            current = {}
        if current and all(s is not None and s.is_final for s in current.values()):
            break
        time.sleep(0.5)
    return current


def wait_running(stack: Stack, ids: list[str], timeout_s: float) -> None:
    """Until one of `ids` runs on a worker (its batch started)."""
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while RequestStatus.RUNNING not in state.statuses(r, ids).values():
            if time.monotonic() > deadline:
                raise AssertionError(f"no request running within {timeout_s:.0f} s")
            time.sleep(0.02)
    finally:
        r.close()


def final_results_per_request(stack: Stack) -> Counter[str]:
    """Final results each request got on the completed stream (more than one: duplicated)."""
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    seen: Counter[str] = Counter()
    for _, fields in r.xrange(keys.STREAM_COMPLETED):
        event = streams.COMPLETED.decode(fields)
        if event.kind == "request" and event.result is not None:
            seen[event.result.request_id] += 1
    r.close()
    return seen


def _child_pid(stack: Stack, name: str) -> int:
    (child,) = [c for c in stack.children if c.name == name]
    return child.proc.pid


def wait_restarted(stack: Stack, name: str, before: int, timeout_s: float) -> float | None:
    """Seconds until the supervisor has restarted `name` (its restart count passed `before`)
    and the stack is ready again; None if it did not within the timeout."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        if stack.restarts.get(name, 0) > before:
            try:
                stack.wait_ready(max(1.0, deadline - time.monotonic()))
                if name.startswith("engine"):  # serving again, not only started
                    get_engine(stack.settings.engine).wait_ready(
                        stack.engine_url(int(name.removeprefix("engine"))),
                        max(1.0, deadline - time.monotonic()))
            except (RuntimeError, EngineError):
                return None
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def kill(stack: Stack, name: str,
         sig: signal.Signals = signal.SIGKILL) -> Callable[[], float | None]:
    """Kill service `name` with `sig`; the returned call waits for its restart."""
    before = stack.restarts.get(name, 0)
    os.kill(_child_pid(stack, name), sig)
    return lambda: wait_restarted(stack, name, before, timeout_s=180)


def kill_leader_scheduler(stack: Stack) -> Callable[[], float | None]:
    """Kill -9 the scheduler that leads; the returned call waits until another process leads
    (the handover time: a standby, or the killed one restarted if it wins the lock) and the
    killed one is back."""
    leader = stack.leader_scheduler()
    assert leader is not None, "no scheduler leads"
    killed_pid = leader.proc.pid
    restarted = kill(stack, leader.name)
    t0 = time.monotonic()

    def handover() -> float | None:
        deadline = t0 + 180
        while time.monotonic() < deadline:
            now_leading = stack.leader_scheduler()
            if now_leading is not None and now_leading.proc.pid != killed_pid:
                took_s = time.monotonic() - t0
                return took_s if restarted() is not None else None
            time.sleep(0.05)
        return None

    return handover


def count(fault: str, stack: Stack, ids: list[str], recovery_s: float | None,
          timeout_s: float) -> FaultResult:
    final = wait_final(stack, ids, timeout_s)
    results = final_results_per_request(stack)
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    failures = []
    for rid, s in final.items():
        if s is RequestStatus.FAILED:
            failures.append(f"{rid}: {r.hget(keys.request(rid), 'error')}")
    for rid in ids:
        if not _is_final(final.get(rid)):  # where a lost request stopped, to find the hole
            fields = r.hgetall(keys.request(rid))
            failures.append(f"{rid}: still {fields.get('status', 'unknown')}"
                            f" (batch {fields.get('batch_id', '-')})")
    r.close()
    return FaultResult(
        fault=fault, submitted=len(ids),
        completed=sum(1 for s in final.values() if s is RequestStatus.COMPLETED),
        failed=len(failures),
        lost=sum(1 for rid in ids if not _is_final(final.get(rid))),
        duplicated=sum(1 for rid in ids if results[rid] > 1),
        recovery_s=recovery_s, failures=failures[:10])


def _is_final(status: RequestStatus | None) -> bool:
    return status is not None and status.is_final


WHOLE_STACK = "restart the whole stack"
BETWEEN_BATCHES = "kill -9 worker (between batches)"
MID_BATCH = "kill -9 worker (mid-batch)"
ENGINE_MID = "kill -9 engine (mid-generation)"
# Long enough that a batch of the tiny model runs for seconds, so the kill lands inside it.
MID_BATCH_TOKENS = 768

# Not a process name: whichever scheduler holds the leader lock when the fault comes.
LEADER_SCHEDULER = "scheduler (leader)"

# The faults a supervised stack must ride out: (name, service to kill, signal).
KILLS: list[tuple[str, str, signal.Signals]] = [
    ("kill -9 predictor", "predictor", signal.SIGKILL),
    ("kill -9 leader scheduler", LEADER_SCHEDULER, signal.SIGKILL),
    ("kill -9 ingress", "ingress", signal.SIGKILL),
    (BETWEEN_BATCHES, "worker0", signal.SIGKILL),
    (MID_BATCH, "worker0", signal.SIGKILL),
    (ENGINE_MID, "engine0", signal.SIGKILL),
    ("restart Redis (SIGTERM)", "redis", signal.SIGTERM),
]


def run_kill(stack: Stack, fault: str, service: str, sig: signal.Signals, n: int,
             timeout_s: float = 300) -> FaultResult:
    if fault == BETWEEN_BATCHES:
        # Everything before the kill is done, the requests come after it.
        waiting = kill(stack, service, sig)
        recovery = waiting()
        ids = submit(stack, n, fault)
    elif fault in (MID_BATCH, ENGINE_MID):
        # Killed while a batch runs. A worker: the scheduler reruns the batch's open requests
        # once the restarted worker beats (services/scheduler/recovery.py); the dead one's
        # message is never run again. An engine: the worker reruns each failed request (at
        # most max_reruns times), and its next batch waits for the restarted engine.
        ids = submit(stack, n, fault, max_tokens=MID_BATCH_TOKENS, ignore_eos=True)
        wait_running(stack, ids, timeout_s=120)
        waiting = kill(stack, service, sig)
        recovery = waiting()
    else:
        ids = submit(stack, n, fault)  # accepted, so now in Redis and in flight
        waiting = (kill_leader_scheduler(stack) if service == LEADER_SCHEDULER
                   else kill(stack, service, sig))
        recovery = waiting()
    return count(fault, stack, ids, recovery, timeout_s)


def run_whole_stack_restart(stack: Stack, n: int, timeout_s: float = 300
                            ) -> tuple[Stack, FaultResult]:
    """Accept N, stop the whole stack at once, start it again on the same run directory (the
    embedded Redis reloads its append-only file): every request must still end."""
    ids = submit(stack, n, "whole-stack")
    stack.stop()
    t0 = time.monotonic()
    again = Stack(stack.settings, service_env=stack.service_env)
    again.start()
    again.start_supervision()
    recovery = time.monotonic() - t0
    return again, count(WHOLE_STACK, again, ids, recovery, timeout_s)


def table(results: list[FaultResult]) -> str:
    lines = ["| fault | submitted | completed | failed | lost | duplicated | recovery s |",
             "|---|---|---|---|---|---|---|"]
    for f in results:
        rec = "-" if f.recovery_s is None else f"{f.recovery_s:.1f}"
        lines.append(f"| {f.fault} | {f.submitted} | {f.completed} | {f.failed} | {f.lost} | "
                     f"{f.duplicated} | {rec} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from offline.launcher import free_port
    from offline.model import build_tiny
    from shared.settings import LauncherSettings

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", choices=[f for f, _, _ in KILLS] + [WHOLE_STACK],
                        help="one fault (results then go to --out only, not the doc)")
    args = parser.parse_args(argv)
    run_dir = REPO_ROOT / "run" / "faults"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    settings = LauncherSettings(redis_url=None, model_dir=build_tiny(), gpus=1,
                                ingress_port=free_port(), engine_base_port=free_port(),
                                metrics_base_port=0,
                                run_dir=run_dir)
    stack = Stack(settings, service_env={"MAGNUS_POLICY": "fcfs-fixed"})
    results: list[FaultResult] = []
    started = time.time()
    try:
        stack.start()
        stack.start_supervision()
        for fault, service, sig in KILLS:
            if args.only not in (None, fault):
                continue
            results.append(run_kill(stack, fault, service, sig, args.requests))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        if args.only in (None, WHOLE_STACK):
            stack, whole = run_whole_stack_restart(stack, args.requests)
            results.append(whole)
    finally:
        stack.stop()
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # The shape: a list of {fault, submitted, completed, failed, lost, duplicated,
    # recovery_s} (plus the first failure reasons); how the run went sits beside it.
    args.out.write_text(json.dumps([asdict(f) for f in results], indent=1) + "\n")
    args.out.with_suffix(".run.json").write_text(json.dumps(
        {"finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "wall_s": time.time() - started, "requests_per_fault": args.requests}, indent=1) + "\n")
    if DOC.exists() and args.out == RESULTS and args.only is None:
        from bench.report import update

        update(DOC, {"faults": table(results)})
    return 0 if all(f.lost == 0 and f.duplicated == 0 for f in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
