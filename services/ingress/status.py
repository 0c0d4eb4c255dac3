"""The live status page's numbers: `summarize` is a pure function of one `StatusSnapshot` (the clock
passed in), `read_snapshot` the thin read of Redis behind it.

What the page shows, and where each figure comes from:
- queue depth per stage, app and tenant: every open request (keys.OPEN_REQUESTS) and its hash;
- whether a predictor is ready (keys.PREDICTOR_HEARTBEAT);
- per GPU: batches in flight (keys.gpu_inflight), their open requests, the KV-cache tokens those
  requests may hold (prompt + tokens so far + this run's cap: what the scheduler reserves), and
  the engine's KV budget from the worker's heartbeat;
- latency percentiles and predictor error over the last minutes, in buckets: the request results
  on the completed stream (its entry ids are millisecond timestamps, so a window is an id range),
  joined with each request's hash (queued time, prediction, app, tenant).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import redis
from pydantic import BaseModel

from shared import keys, state, streams
from shared.schemas import Batch, RequestResult, RequestStatus, WorkerHeartbeat

# Stages a request waits in before it runs, and those in which it holds an engine.
WAITING_STAGES = (RequestStatus.QUEUED, RequestStatus.PREDICTED, RequestStatus.REQUEUED)
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class OpenRequest:
    request_id: str
    status: RequestStatus
    app_id: str
    tenant: str


@dataclass(frozen=True)
class FinishedRequest:
    """A final result seen on the completed stream, with what its request hash adds."""

    result: RequestResult
    app_id: str
    tenant: str
    queued_at: float
    predicted_tokens: int | None
    # Runs after the first (the prediction on the hash is then of a remainder, not the whole).
    continuations: int


@dataclass(frozen=True)
class GpuSnapshot:
    gpu: int
    batches: Sequence[Batch]
    heartbeat: WorkerHeartbeat | None


@dataclass(frozen=True)
class StatusSnapshot:
    now: float
    window_s: float
    bucket_s: float
    open_requests: Sequence[OpenRequest]
    # Open requests beyond what was read (the page reads a bounded number).
    open_unread: int
    gpus: Sequence[GpuSnapshot]
    finished: Sequence[FinishedRequest]
    # The process id in the predictor's readiness key (keys.PREDICTOR_HEARTBEAT); None: no
    # predictor has its model loaded and reads requests.
    predictor_pid: str | None = None


class Percentiles(BaseModel):
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


class QueueReport(BaseModel):
    open: int
    waiting: int
    scheduled: int
    running: int
    by_status: dict[str, int]
    # Open requests per app and per tenant, split into waiting and in an engine.
    by_app: dict[str, dict[str, int]]
    by_tenant: dict[str, dict[str, int]]


class GpuReport(BaseModel):
    gpu: int
    # The node it is on (its heartbeat's, else its batches'; None: neither is known).
    node: str | None
    alive: bool
    busy: bool
    heartbeat_age_s: float | None
    batches: int
    requests: int
    kv_reserved_tokens: int
    kv_budget_tokens: int | None
    kv_reserved_fraction: float | None
    policies: list[str]


class Bucket(BaseModel):
    """Requests that finished within one bucket of the window (`start` .. `start + bucket_s`)."""

    start: float
    completed: int
    failed: int
    generated_tokens: int
    latency_s: Percentiles
    ttft_s: Percentiles
    queue_wait_s: Percentiles
    # Predicted minus generated tokens, over requests served in one run.
    prediction_abs_error: float | None
    prediction_signed_error: float | None


class PredictorReport(BaseModel):
    count: int
    mean_abs_error_tokens: float | None
    mean_signed_error_tokens: float | None
    # The share of requests whose length the prediction came within 25% (or 8 tokens) of.
    within_25pct: float | None


class StatusReport(BaseModel):
    now: float
    window_s: float
    bucket_s: float
    # A predictor is up (model loaded, reading requests): without one nothing leaves `queued`.
    predictor_ready: bool
    queue: QueueReport
    gpus: list[GpuReport]
    window: Bucket
    buckets: list[Bucket]
    predictor: PredictorReport


def percentiles(values: Sequence[float]) -> Percentiles:
    """Nearest-rank percentiles (no interpolation: every figure is a latency that happened)."""
    if not values:
        return Percentiles(count=0, mean=None, p50=None, p90=None, p99=None)
    ordered = sorted(values)
    n = len(ordered)

    def rank(p: int) -> float:
        return round(ordered[max(0, math.ceil(p / 100 * n) - 1)], 4)

    return Percentiles(count=n, mean=round(sum(ordered) / n, 4), p50=rank(50), p90=rank(90),
                       p99=rank(99))


def _queue(snapshot: StatusSnapshot) -> QueueReport:
    by_status = Counter(o.status.value for o in snapshot.open_requests)
    by_app: dict[str, Counter[str]] = {}
    by_tenant: dict[str, Counter[str]] = {}
    for o in snapshot.open_requests:
        where = "waiting" if o.status in WAITING_STAGES else "dispatched"
        by_app.setdefault(o.app_id, Counter())[where] += 1
        by_tenant.setdefault(o.tenant, Counter())[where] += 1
    waiting = sum(by_status[s.value] for s in WAITING_STAGES)
    return QueueReport(
        open=len(snapshot.open_requests) + snapshot.open_unread,
        waiting=waiting,
        scheduled=by_status[RequestStatus.SCHEDULED.value],
        running=by_status[RequestStatus.RUNNING.value],
        by_status=dict(sorted(by_status.items())),
        by_app={a: {"waiting": c["waiting"], "dispatched": c["dispatched"]}
                for a, c in sorted(by_app.items(), key=lambda kv: -kv[1].total())},
        by_tenant={t: {"waiting": c["waiting"], "dispatched": c["dispatched"]}
                   for t, c in sorted(by_tenant.items(), key=lambda kv: -kv[1].total())},
    )


def _gpu(g: GpuSnapshot, open_ids: set[str], now: float) -> GpuReport:
    # A continuous-mode group stays in flight until its last member ends: count only members
    # still open, which are what holds KV now.
    members = [item for b in g.batches for item in b.items if item.request_id in open_ids]
    reserved = sum(i.input_tokens + i.request.generated_so_far + i.max_tokens for i in members)
    beat = g.heartbeat
    budget = beat.kv_budget_tokens if beat is not None else None
    node = beat.node if beat is not None else (g.batches[0].node if g.batches else None)
    return GpuReport(
        gpu=g.gpu, node=node, alive=beat is not None, busy=bool(beat and beat.busy),
        heartbeat_age_s=None if beat is None else round(max(0.0, now - beat.at), 2),
        batches=len(g.batches), requests=len(members), kv_reserved_tokens=reserved,
        kv_budget_tokens=budget,
        kv_reserved_fraction=round(reserved / budget, 4) if budget else None,
        policies=sorted({b.policy for b in g.batches}),
    )


def _bucket(start: float, finished: Sequence[FinishedRequest]) -> Bucket:
    done = [f for f in finished if f.result.finish_reason != "error"]
    failed = sum(1 for f in finished if f.result.finish_reason == "error")
    errors = [f.predicted_tokens - f.result.generated_tokens for f in done
              if f.predicted_tokens is not None and f.continuations == 0]
    return Bucket(
        start=round(start, 3), completed=len(done), failed=failed,
        generated_tokens=sum(f.result.generated_tokens for f in done),
        latency_s=percentiles([f.result.finished_at - f.queued_at for f in done]),
        ttft_s=percentiles([f.result.first_token_at - f.queued_at for f in done
                            if f.result.first_token_at is not None]),
        queue_wait_s=percentiles([f.result.started_at - f.queued_at for f in done]),
        prediction_abs_error=round(sum(abs(e) for e in errors) / len(errors), 2)
        if errors else None,
        prediction_signed_error=round(sum(errors) / len(errors), 2) if errors else None,
    )


def _predictor(finished: Sequence[FinishedRequest]) -> PredictorReport:
    pairs = [(f.predicted_tokens, f.result.generated_tokens) for f in finished
             if f.result.finish_reason != "error" and f.predicted_tokens is not None
             and f.continuations == 0]
    if not pairs:
        return PredictorReport(count=0, mean_abs_error_tokens=None,
                               mean_signed_error_tokens=None, within_25pct=None)
    errors = [p - g for p, g in pairs]
    close = sum(1 for p, g in pairs if abs(p - g) <= max(8, 0.25 * g))
    return PredictorReport(
        count=len(pairs),
        mean_abs_error_tokens=round(sum(abs(e) for e in errors) / len(errors), 2),
        mean_signed_error_tokens=round(sum(errors) / len(errors), 2),
        within_25pct=round(close / len(pairs), 4))


def summarize(snapshot: StatusSnapshot) -> StatusReport:
    """Everything the status page draws, from one snapshot."""
    assert snapshot.window_s > 0 and snapshot.bucket_s > 0, "window and bucket must be positive"
    now, start = snapshot.now, snapshot.now - snapshot.window_s
    finished = [f for f in snapshot.finished if start <= f.result.finished_at <= now]
    n_buckets = math.ceil(snapshot.window_s / snapshot.bucket_s)
    grouped: list[list[FinishedRequest]] = [[] for _ in range(n_buckets)]
    for f in finished:
        index = min(n_buckets - 1, int((f.result.finished_at - start) // snapshot.bucket_s))
        grouped[index].append(f)
    open_ids = {o.request_id for o in snapshot.open_requests}
    return StatusReport(
        now=now, window_s=snapshot.window_s, bucket_s=snapshot.bucket_s,
        predictor_ready=snapshot.predictor_pid is not None,
        queue=_queue(snapshot),
        gpus=[_gpu(g, open_ids, now) for g in snapshot.gpus],
        window=_bucket(start, finished),
        buckets=[_bucket(start + i * snapshot.bucket_s, group)
                 for i, group in enumerate(grouped)],
        predictor=_predictor(finished),
    )


# --- the read (mechanism) --------------------------------------------------------------------

_OPEN_FIELDS = ("status", "app_id", "tenant")
_FINISHED_FIELDS = ("app_id", "tenant", "queued_at", "predicted_tokens", "continuations")


def read_snapshot(r: redis.Redis, gpus: int, now: float, window_s: float, bucket_s: float,
                  max_open: int, max_finished: int) -> StatusSnapshot:
    """One snapshot, in a few round trips: at most `max_open` open requests (the oldest) and
    the latest `max_finished` results of the window."""
    open_total = int(r.zcard(keys.OPEN_REQUESTS))
    open_ids: list[str] = list(r.zrange(keys.OPEN_REQUESTS, 0, max_open - 1))
    finished_entries = r.xrevrange(keys.STREAM_COMPLETED, "+", f"{int((now - window_s) * 1000)}",
                                   count=max_finished)
    results: list[RequestResult] = []
    for _, fields in finished_entries:
        try:
            event = streams.COMPLETED.decode(fields)
        except ValueError:
            continue  # the stream's readers report unreadable entries; the page skips them
        if event.kind == "request" and event.result is not None:
            results.append(event.result)

    pipe = r.pipeline(transaction=False)
    for rid in open_ids:
        pipe.hmget(keys.request(rid), _OPEN_FIELDS)
    for res in results:
        pipe.hmget(keys.request(res.request_id), _FINISHED_FIELDS)
    gpu_ids = state.known_gpus(r, gpus)  # every node's GPUs, as the scheduler sees them
    for g in gpu_ids:
        pipe.hvals(keys.gpu_inflight(g))
        pipe.get(keys.worker_heartbeat(g))
    pipe.get(keys.PREDICTOR_HEARTBEAT)
    *replies, predictor_pid = pipe.execute()

    open_requests = []
    for rid, (status, app_id, tenant) in zip(open_ids, replies[:len(open_ids)], strict=True):
        if status is None:
            continue  # expired, or final since the set was read
        try:
            stage = RequestStatus(status)
        except ValueError:
            continue
        open_requests.append(OpenRequest(rid, stage, app_id or "?", tenant or "default"))
    rest = replies[len(open_ids):]
    finished = []
    for res, (app_id, tenant, queued_at, predicted, continuations) in zip(
            results, rest[:len(results)], strict=True):
        if queued_at is None:
            continue  # the hash expired
        finished.append(FinishedRequest(
            result=res, app_id=app_id or "?", tenant=tenant or "default",
            queued_at=float(queued_at),
            predicted_tokens=int(predicted) if predicted is not None else None,
            continuations=int(continuations or 0)))
    rest = rest[len(results):]
    gpu_snapshots = []
    for i, g in enumerate(gpu_ids):
        raw_batches, raw_beat = rest[2 * i], rest[2 * i + 1]
        batches = []
        for raw in raw_batches:
            try:
                batches.append(Batch.parse(raw))
            except ValueError:
                continue
        beat = None
        if raw_beat is not None:
            try:
                beat = WorkerHeartbeat.parse(raw_beat)
            except ValueError:
                beat = None
        gpu_snapshots.append(GpuSnapshot(gpu=g, batches=batches, heartbeat=beat))
    return StatusSnapshot(now=now, window_s=window_s, bucket_s=bucket_s,
                          open_requests=open_requests,
                          open_unread=max(0, open_total - len(open_ids)),
                          gpus=gpu_snapshots, finished=finished, predictor_pid=predictor_pid)
