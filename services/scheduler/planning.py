"""`plan`: everything the scheduler decides at one instant, as one pure function.

The live loop (services/scheduler/main.py) and the simulator (bench/simulator.py) both call
`plan` and only carry out what it returns: the loop as Batch messages on Celery queues, the
simulator as runs on modelled engines. Neither holds any decision logic of its own, so the policy
the simulator judges is the one that serves.

What `plan` decides, given the policy, the waiting pool, each live GPU's state and the clock:
- which GPUs may take work: in static mode a GPU takes a batch while it holds at most
  `staged_batches_per_gpu` batches (one running + that many queued behind it); in continuous
  mode a GPU takes whoever fits its KV budget beside what it holds, up to its concurrency cap
  (`GpuState.max_running_requests`, from the engine's measured throughput curve; capacity.py);
- the GPUs' order: least loaded first (in-flight batches in static mode, in-flight KV tokens in
  continuous mode, then index), a load balancer's behaviour; with one GPU there is no choice;
- per GPU, the batch (static: `policy.decide_batch`) or the admitted requests (continuous: the
  next admissible prefix of `policy.rank_continuous`, ranked once per instant: the same requests
  `policy.admit_continuous` would admit GPU by GPU), each member's token cap and the KV it counts
  as holding until its result arrives;
- passes: in static mode it passes over the GPUs again while anything was dispatched (a GPU that
  took its running batch may take its staged one from who is left); in continuous mode one pass
  (a GPU asked again at the same instant would rank the same pool and admit nobody).

Side effect, on purpose: `plan` removes what it dispatches from `pool`, the sorted pool the
caller keeps across decisions (copying 10,000 waiting requests each tick would cost more than the
decision). Nothing else is touched: GPU states are snapshots and the estimator is only read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.scheduler import policy
from services.scheduler.batching import LengthSortedPool
from services.scheduler.estimator import BatchTimeEstimator


@dataclass(frozen=True)
class GpuState:
    """A live GPU as the planner sees it."""

    gpu: int
    kv_budget_tokens: int
    inflight_batches: int = 0  # static mode: batches running or staged on it
    inflight_kv_tokens: int = 0  # continuous mode: KV its in-flight requests count as holding
    inflight_requests: int = 0  # continuous mode: requests running on it
    # Continuous mode: the most requests it should run at once (capacity.py; None: no cap).
    # Admission "budget" keeps the rest waiting in the pool, where the policy orders them.
    max_running_requests: int | None = None

    def __post_init__(self) -> None:
        assert self.inflight_batches >= 0 and self.inflight_kv_tokens >= 0, "negative load"
        assert self.inflight_requests >= 0, "negative load"
        assert self.max_running_requests is None or self.max_running_requests >= 1, (
            "a concurrency cap below one request")


@dataclass(frozen=True)
class Dispatch:
    """One batch (static) or admitted group (continuous) to send to `gpu` now."""

    gpu: int
    members: tuple[policy.WaitingRequest, ...]
    token_caps: tuple[int, ...]  # max_tokens each member's run is sent with
    held_kv_tokens: tuple[int, ...]  # KV each member counts as holding until its result
    engine_priorities: tuple[int | None, ...]  # per member, the engine priority (None: not sent)
    estimated_service_s: float  # static: the batch's estimate; continuous: 0 (not a batch)
    kv_demand_tokens: int  # static: size x (max input + max cap); continuous: sum held

    def __post_init__(self) -> None:
        assert self.members, "an empty dispatch"
        assert (len(self.members) == len(self.token_caps) == len(self.held_kv_tokens)
                == len(self.engine_priorities))
        assert all(1 <= c <= w.max_tokens for w, c in zip(self.members, self.token_caps,
                                                            strict=True)), "cap out of range"


def plan(config: policy.PolicyConfig, pool: LengthSortedPool, gpus: Sequence[GpuState],
         now: float, estimator: BatchTimeEstimator,
         staged_batches_per_gpu: int = 1,
         gpu_estimators: Mapping[int, BatchTimeEstimator] | None = None) -> list[Dispatch]:
    """The dispatches for this instant, in the order to send them (see the module docstring).
    `gpu_estimators`: a GPU's own batch-time estimator where it has one (GPUs may differ in
    speed); its static batches are chosen and estimated with it, the others with `estimator`."""
    assert staged_batches_per_gpu >= 0, "negative staging"
    assert len({g.gpu for g in gpus}) == len(gpus), "a GPU listed twice"
    static = config.engine_mode == "static"
    batches = {g.gpu: g.inflight_batches for g in gpus}
    kv_held = {g.gpu: g.inflight_kv_tokens for g in gpus}
    by_gpu = {g.gpu: g for g in gpus}
    running = {g.gpu: g.inflight_requests for g in gpus}
    budgets = {g.gpu: g.kv_budget_tokens for g in gpus}
    dispatches: list[Dispatch] = []
    progress = True
    # Continuous mode: the pool ranked once for this instant, and how much of it earlier GPUs took.
    ranking: policy.ContinuousRanking | None = None
    taken = 0
    while progress and len(pool):
        progress = False
        load = batches if static else kv_held
        for gpu in sorted(budgets, key=lambda g: (load[g], g)):
            if not len(pool):
                break
            if static:
                own = (gpu_estimators or {}).get(gpu, estimator)
                dispatch = _plan_static(config, pool, gpu, budgets[gpu], batches[gpu], now,
                                        own, staged_batches_per_gpu)
            elif _nothing_fits(config, pool, budgets[gpu], kv_held[gpu],
                               _free_slots(by_gpu[gpu], running[gpu])):
                dispatch = None
            else:
                if ranking is None:
                    ranking = policy.rank_continuous(config, pool, now, estimator)
                count = ranking.admissible(taken, budgets[gpu], kv_held[gpu],
                                           _free_slots(by_gpu[gpu], running[gpu]))
                dispatch = _continuous(config, gpu, ranking.requests[taken:taken + count])
                taken += count
            if dispatch is None:
                continue
            pool.remove([w.request_id for w in dispatch.members])
            batches[gpu] += 1
            running[gpu] += len(dispatch.members)
            kv_held[gpu] += sum(dispatch.held_kv_tokens)
            dispatches.append(dispatch)
            progress = static
    return dispatches


def _plan_static(config: policy.PolicyConfig, pool: LengthSortedPool, gpu: int,
                 kv_budget_tokens: int, inflight_batches: int, now: float,
                 estimator: BatchTimeEstimator, staged_batches_per_gpu: int) -> Dispatch | None:
    if inflight_batches > staged_batches_per_gpu:
        return None  # one running + `staged` queued already
    decision = policy.decide_batch(config, pool, policy.GpuSnapshot(gpu, kv_budget_tokens), now,
                                   estimator)
    if decision is None:
        return None
    caps = tuple(_within(w, c) for w, c in zip(decision.members, decision.token_caps,
                                               strict=True))
    held = tuple(w.input_tokens + c for w, c in zip(decision.members, caps, strict=True))
    demand = len(caps) * (max(w.input_tokens for w in decision.members) + max(caps))
    priorities = tuple(policy.engine_priority(config, w) for w in decision.members)
    return Dispatch(gpu, decision.members, caps, held, priorities, decision.estimated_service_s,
                    demand)


def _continuous(config: policy.PolicyConfig, gpu: int,
                admitted: Sequence[policy.WaitingRequest]) -> Dispatch | None:
    if not admitted:
        return None
    caps = tuple(_within(w, policy.token_cap(config, w)) for w in admitted)
    # Continuous runs are not capped at the prediction, but admission counts each as holding its
    # prompt + planned length (policy.admission_tokens) until its result arrives.
    held = tuple(policy.admission_tokens(config, w) for w in admitted)
    priorities = tuple(policy.engine_priority(config, w) for w in admitted)
    return Dispatch(gpu, tuple(admitted), caps, held, priorities, 0.0, sum(held))


def _within(request: policy.WaitingRequest, cap: int) -> int:
    """A run's cap within what the request may still generate (at least one token)."""
    return max(min(cap, request.max_tokens), 1)


def _free_slots(gpu: GpuState, running: int) -> int | None:
    """The GPU's concurrency cap less what it runs now (this instant's admissions included)."""
    if gpu.max_running_requests is None:
        return None
    return max(gpu.max_running_requests - running, 0)


def _nothing_fits(config: policy.PolicyConfig, pool: LengthSortedPool, kv_budget_tokens: int,
                  inflight_kv_tokens: int, free_slots: int | None) -> bool:
    """Whether `admit_continuous` would surely admit nobody: something is in flight and not even
    the smallest waiting request fits the KV left. The same answer without ranking the whole pool
    (which, for 64 GPUs after every event, dominated the simulator's run time). The pool's caps
    are at most the ones admission uses, so this never says "nothing" when something fits."""
    if config.spec.admission == "everyone":
        return False  # admits everyone
    if free_slots == 0:
        return True  # the GPU runs as many as its cap
    if inflight_kv_tokens == 0:
        return False  # an idle GPU takes even an oversize request
    smallest = int((pool.input_tokens + pool.cap_tokens).min())
    return inflight_kv_tokens + smallest > kv_budget_tokens

