"""Scheduling policies: pure functions over snapshots of the waiting pool and the free GPU.

No Redis, no Celery, no clock reads: the loop passes `now` in and carries out what is returned.

Entry points for the loop:
- `decide_batch(config, waiting, gpu, now, estimator)`: static engine, the one batch to run now on
  a free GPU (None when nobody waits).
- `admit_continuous(config, waiting, gpu, inflight_kv_tokens, now, estimator)`: continuous engine,
  which waiting requests to send to the engine now.
- `token_cap(config, request)` / `continuation_cap(request)`: the most tokens a run may generate.

For 10,000 waiting requests keep one `LengthSortedPool` (built with `pool_for(config)`) across
decisions and pass it as `waiting`: `add` on arrival, `remove` on dispatch. Any other sequence is
sorted on every call (several ms at that size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import get_args

import numpy as np

from services.scheduler import ordering
from services.scheduler.batching import (
    CandidateBatch,
    CandidateSet,
    EngineMode,
    FloatArray,
    IntArray,
    LengthSortedPool,
    adaptive_batches,
    batch_of,
    effective_predicted,
    fixed_size_batches,
    run_token_cap,
)
from services.scheduler.estimator import BatchTimeEstimator
from services.scheduler.ordering import WaitDefinition
from services.scheduler.registry import PolicySpec, get_policy


@dataclass(frozen=True)
class WaitingRequest:
    """What a policy may know of a waiting request."""

    request_id: str
    queued_at: float
    input_tokens: int
    max_tokens: int
    predicted_tokens: int
    upper_tokens: int
    # The profiled length, when a benchmark replays a profiled workload: only the oracle reads it.
    true_output_tokens: int | None = None


def waiting_request(request_id: str, queued_at: float, prompt_tokens: int,
                    remaining_max_tokens: int, predicted_tokens: int, upper_tokens: int,
                    true_output_tokens: int | None, generated_so_far: int) -> WaitingRequest:
    """The policy's view of a request or a continuation: `prompt_tokens` and
    `remaining_max_tokens` are this run's (a continuation's prompt holds its output so far), and
    the prediction is of what remains. The oracle's knowledge (the profiled length) runs out once
    a sampled run outgrows it: from then on it plans with the prediction, as the others do,
    instead of 1-token runs."""
    true_remaining = (None if true_output_tokens is None or generated_so_far >= true_output_tokens
                      else true_output_tokens - generated_so_far)
    return WaitingRequest(request_id=request_id, queued_at=queued_at, input_tokens=prompt_tokens,
                          max_tokens=remaining_max_tokens, predicted_tokens=predicted_tokens,
                          upper_tokens=upper_tokens, true_output_tokens=true_remaining)


@dataclass(frozen=True)
class GpuSnapshot:
    gpu: int
    kv_budget_tokens: int


@dataclass(frozen=True)
class PolicyConfig:
    """A registered policy (`registry.POLICIES`) with its tuning knobs."""

    name: str = "magnus"
    batch_size: int = 8  # fixed-size variants (fcfs-fixed, sjf-predicted, magnus-fixed-batch)
    max_waste_ratio: float = 0.5  # idle decode steps per useful token, per member (batching.py)
    waste_slack_tokens: int = 16  # idle steps any member may take on top of the ratio
    max_batch_size: int = 256  # the engine's max_num_seqs: no adaptive batch is larger
    hrrn_wait: WaitDefinition = "oldest"
    engine_mode: EngineMode = "static"
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        get_policy(self.name)  # refuses an unknown name, listing the registered ones
        assert self.hrrn_wait in get_args(WaitDefinition), f"unknown wait {self.hrrn_wait!r}"
        assert self.engine_mode in get_args(EngineMode), f"unknown mode {self.engine_mode!r}"
        assert self.batch_size >= 1 and self.max_batch_size >= 1, "batch sizes must be positive"
        assert self.max_waste_ratio >= 0 and self.waste_slack_tokens >= 0, "negative waste bound"
        assert self.max_model_len >= 2, "model context too small"

    @property
    def spec(self) -> PolicySpec:
        return get_policy(self.name)

    @property
    def oracle(self) -> bool:
        return self.spec.oracle

    @property
    def uses_predictions(self) -> bool:
        return self.spec.uses_predictions


@dataclass(frozen=True)
class Decision:
    """The batch to run now, and why: its estimated service time and response ratio."""

    policy: str
    batch: CandidateBatch
    estimated_service_s: float
    response_ratio: float
    candidates: int  # how many candidate batches were compared

    @property
    def members(self) -> tuple[WaitingRequest, ...]:
        return self.batch.members

    @property
    def token_caps(self) -> tuple[int, ...]:
        """Per member, the max_tokens to send to the engine for this run."""
        return self.batch.token_caps


def fcfs_fixed(waiting: Sequence[WaitingRequest], batch_size: int) -> list[WaitingRequest]:
    """First come, first served, in batches of at most `batch_size` (the paper's baseline).

    Takes whoever waits when the GPU frees rather than waiting for a full batch: holding a free GPU
    idle to fill a batch only adds latency.
    """
    assert batch_size >= 1, "batch size must be positive"
    chosen = sorted(waiting, key=lambda w: (w.queued_at, w.request_id))[:batch_size]
    assert len({w.request_id for w in chosen}) == len(chosen), "a request twice in one batch"
    return chosen


def continuation_cap(request: WaitingRequest, max_model_len: int | None = None) -> int:
    """The token cap for a run: the request's upper bound, within max_tokens (and the context
    left, if given). A run that reaches it unfinished goes back as a continuation (the loop's I/O).
    """
    return run_token_cap(request, max_model_len=max_model_len)


def token_cap(config: PolicyConfig, request: WaitingRequest) -> int:
    """The max_tokens a run of this request is sent with, always within the model context.

    Static batches of the predicting policies cap a run at the predicted upper bound (the true
    length for the oracle): a static batch waits for its longest member, so a run that outgrows
    its prediction comes back as a continuation instead of holding the batch. Continuous mode and
    the prediction-free baselines send the whole remaining max_tokens: a long run holds nobody up
    in a continuous engine, and a continuation would only prefill its prompt and output again.
    """
    if not config.uses_predictions or config.engine_mode == "continuous":
        return run_token_cap(_uncapped(request), max_model_len=config.max_model_len)
    return run_token_cap(request, max_model_len=config.max_model_len, oracle=config.oracle)


def admission_tokens(config: PolicyConfig, request: WaitingRequest) -> int:
    """KV tokens continuous admission counts a request as holding until its result arrives:
    prompt + planned run length (predicted upper bound, true length for the oracle, max_tokens
    for the baselines). `admit_continuous` sums these against the budget; the run itself is not
    capped there, so a request past its bound uses more and vLLM's paging absorbs it."""
    if not config.uses_predictions:
        return request.input_tokens + token_cap(config, request)
    return request.input_tokens + run_token_cap(request, max_model_len=config.max_model_len,
                                                oracle=config.oracle)


def engine_priority(config: PolicyConfig, request: WaitingRequest) -> int | None:
    """The priority a request is sent to the engine with (lower first): its planned length for
    a policy that lets the engine order (`engine_priority`), else None (not sent)."""
    if not config.spec.engine_priority:
        return None
    return effective_predicted(request, request.max_tokens, oracle=config.oracle)


def pool_for(config: PolicyConfig, waiting: Sequence[WaitingRequest] = ()) -> LengthSortedPool:
    """The sorted pool this policy batches from; keep it in the loop across decisions."""
    return LengthSortedPool(waiting, max_model_len=config.max_model_len, oracle=config.oracle)


def decide_batch(config: PolicyConfig, waiting: Sequence[WaitingRequest], gpu: GpuSnapshot,
                 now: float, estimator: BatchTimeEstimator) -> Decision | None:
    """Static engine: the one batch to run now on the free `gpu`, or None if nobody waits.

    Candidates come from the spec's `batching` (adaptive: `adaptive_batches`; length-sorted-fixed:
    `fixed_size_batches`; arrival-fixed: `fcfs_fixed`; everyone: all who wait, in arrival order,
    with no budget), and the pick from its `ordering` (hrrn, sjf, fcfs) over those candidates.
    """
    if not waiting:
        return None
    assert gpu.kv_budget_tokens >= 1, "a GPU without KV budget cannot run a batch"
    if config.spec.batching in ("arrival-fixed", "everyone"):
        return _decide_by_arrival(config, waiting, now, estimator)
    candidates = _candidates(config, _as_pool(config, waiting), gpu)
    if config.spec.ordering == "hrrn":
        pick = ordering.hrrn_pick(candidates, now, estimator, config.hrrn_wait)
        return Decision(config.name, candidates[pick.index], pick.estimated_service_s,
                        pick.response_ratio, len(candidates))
    index = (ordering.sjf_index(candidates) if config.spec.ordering == "sjf"
             else ordering.fcfs_index(candidates))
    return _decision(config, candidates[index], now, estimator, len(candidates))


def admit_continuous(config: PolicyConfig, waiting: Sequence[WaitingRequest], gpu: GpuSnapshot,
                     inflight_kv_tokens: int, now: float,
                     estimator: BatchTimeEstimator) -> list[WaitingRequest]:
    """Continuous engine: which waiting requests to send now, in the order to send them.

    Admission "everyone" (continuous-fcfs) sends everyone in arrival order (plain vLLM; no
    budget). The others ("budget") send, in
    their order, while the predicted KV use (inflight + sum of input + cap) fits the budget, and
    stop at the first that does not fit rather than let smaller ones past it: skipping would
    starve long requests, the very thing the ordering prevents. If nothing is in flight the first
    is sent even if alone it is over budget (it fits the context; see batching.py).

    Order (the spec's `ordering`): hrrn ranks each request by its own response ratio, its service
    being the estimated time of that request alone. Chosen over "predicted length with aging"
    because it is aging with a rate derived from the request itself rather than a tuning
    constant: a request of service S passes a fresh one of service s after waiting
    S x (1 + wait_s / s) - S, which is the same rule the static policy uses, so the two modes
    stay comparable.
    sjf: shortest predicted first. fcfs: arrival order.
    """
    assert inflight_kv_tokens >= 0, "negative KV in flight"
    ranking = rank_continuous(config, waiting, now, estimator)
    return ranking.requests[:ranking.admissible(0, gpu.kv_budget_tokens, inflight_kv_tokens)]


@dataclass(frozen=True)
class ContinuousRanking:
    """The waiting requests in continuous admission order, with the KV each would reserve.

    The order depends only on the requests, the clock and the estimator, not on the GPU: at one
    instant every GPU admits a prefix of what the GPUs before it left, so `plan` ranks the pool
    once per instant and hands each GPU the next prefix (`admissible(start, ...)`), which is
    exactly what ranking the shrunken pool again for each GPU would give, without its cost
    (a kNN estimate per waiting request, per GPU)."""

    requests: list[WaitingRequest]
    demand_tokens: IntArray  # per request in `requests`: prompt + planned run (its reservation)
    everyone: bool  # admission "everyone": no budget

    def admissible(self, start: int, kv_budget_tokens: int, inflight_kv_tokens: int,
                   free_slots: int | None = None) -> int:
        """How many requests from `start` on a GPU with this budget and KV in flight admits:
        all of them for "everyone"; else the longest prefix that fits, stopping at the first
        that does not rather than letting smaller ones past it, and a lone oversize request
        when nothing is in flight (it fits the context; see batching.py); never more than
        `free_slots` (the GPU's concurrency cap less what it runs; None: no cap)."""
        left = len(self.requests) - start
        assert left >= 0 and inflight_kv_tokens >= 0
        assert free_slots is None or free_slots >= 0, "negative free slots"
        if self.everyone or left == 0:
            return left
        if free_slots is not None:
            left = min(left, free_slots)
            if left == 0:
                return 0
        cumulative = np.cumsum(self.demand_tokens[start:start + left])
        admitted = int(np.searchsorted(cumulative, kv_budget_tokens - inflight_kv_tokens,
                                       side="right"))
        alone_over_budget = admitted == 0 and inflight_kv_tokens == 0
        if alone_over_budget:
            admitted = 1
        assert alone_over_budget or admitted == 0 or (
            inflight_kv_tokens + int(cumulative[admitted - 1]) <= kv_budget_tokens), (
            "over KV budget")
        return admitted


def rank_continuous(config: PolicyConfig, waiting: Sequence[WaitingRequest], now: float,
                    estimator: BatchTimeEstimator) -> ContinuousRanking:
    """The admission order of `admit_continuous` (see there), with each request's reservation."""
    if config.spec.admission == "everyone" or not waiting:
        chosen = sorted(waiting, key=lambda w: (w.queued_at, w.request_id))
        return ContinuousRanking(chosen, np.zeros(len(chosen), dtype=np.int64), everyone=True)
    predicted, inputs, caps, queued_at = _request_columns(config, waiting)
    if config.spec.ordering == "hrrn":
        service = estimator.estimate_many(np.ones_like(inputs), inputs, predicted)
        ratios = ordering.response_ratios(now - queued_at, service)
        order = np.lexsort((queued_at, -ratios))
    elif config.spec.ordering == "hrrn-prompt":
        # Output length unknown: every run planned at the median cap, so only prompts differ.
        planned = np.full_like(inputs, int(np.median(caps)))
        service = estimator.estimate_many(np.ones_like(inputs), inputs, planned)
        ratios = ordering.response_ratios(now - queued_at, service)
        order = np.lexsort((queued_at, -ratios))
    elif config.spec.ordering == "sjf":
        order = np.lexsort((queued_at, predicted))
    else:
        order = np.argsort(queued_at, kind="stable")
    chosen = [waiting[int(i)] for i in order]
    assert len({w.request_id for w in chosen}) == len(chosen), "a request ranked twice"
    return ContinuousRanking(chosen, (inputs + caps)[order], everyone=False)


# --- internals ----------------------------------------------------------------------------
def _as_pool(config: PolicyConfig, waiting: Sequence[WaitingRequest]) -> LengthSortedPool:
    if isinstance(waiting, LengthSortedPool) and waiting.matches(
            max_model_len=config.max_model_len, oracle=config.oracle):
        return waiting
    return pool_for(config, waiting)


def _request_columns(config: PolicyConfig, waiting: Sequence[WaitingRequest]) -> tuple[
        IntArray, IntArray, IntArray, FloatArray]:
    """Planned length, input, cap and queued_at per request: the kept pool's columns when it was
    built for this policy (no per-request Python work), else computed here."""
    if config.uses_predictions and isinstance(waiting, LengthSortedPool) and waiting.matches(
            max_model_len=config.max_model_len, oracle=config.oracle):
        return (waiting.predicted_tokens, waiting.input_tokens, waiting.cap_tokens,
                waiting.queued_at)
    caps = [token_cap(config, w) for w in waiting]
    predicted = [effective_predicted(w, c, oracle=config.oracle)
                 for w, c in zip(waiting, caps, strict=True)]
    return (np.array(predicted, dtype=np.int64), np.array([w.input_tokens for w in waiting],
                                                          dtype=np.int64),
            np.array(caps, dtype=np.int64),
            np.array([w.queued_at for w in waiting], dtype=np.float64))


def _candidates(config: PolicyConfig, pool: LengthSortedPool, gpu: GpuSnapshot) -> CandidateSet:
    if config.spec.batching == "adaptive":
        return adaptive_batches(pool, gpu.kv_budget_tokens, engine_mode=config.engine_mode,
                                max_waste_ratio=config.max_waste_ratio,
                                waste_slack_tokens=config.waste_slack_tokens,
                                max_batch_size=config.max_batch_size)
    return fixed_size_batches(pool, config.batch_size, gpu.kv_budget_tokens,
                              engine_mode=config.engine_mode)


def _decide_by_arrival(config: PolicyConfig, waiting: Sequence[WaitingRequest], now: float,
                       estimator: BatchTimeEstimator) -> Decision:
    if config.spec.batching == "arrival-fixed":
        members = fcfs_fixed(waiting, config.batch_size)
    else:
        members = sorted(waiting, key=lambda w: (w.queued_at, w.request_id))
    caps = [token_cap(config, w) for w in members]
    predicted = [effective_predicted(w, c, oracle=config.oracle)
                 for w, c in zip(members, caps, strict=True)]
    batch = batch_of(members, caps, predicted, config.engine_mode)
    return _decision(config, batch, now, estimator, candidates=1)


def _decision(config: PolicyConfig, batch: CandidateBatch, now: float,
              estimator: BatchTimeEstimator, candidates: int) -> Decision:
    service = estimator.estimate(batch.size, batch.max_input_tokens, batch.max_predicted_tokens)
    wait = now - (batch.oldest_queued_at if config.hrrn_wait == "oldest" else batch.mean_queued_at)
    return Decision(config.name, batch, service, ordering.response_ratio(wait, service),
                    candidates)


def _uncapped(request: WaitingRequest) -> WaitingRequest:
    """The request as a prediction-free policy sees it: its upper bound is its max_tokens."""
    return replace(request, upper_tokens=request.max_tokens)
