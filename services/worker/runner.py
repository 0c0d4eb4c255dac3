"""Running one batch on the engine: the worker's mechanism, with no scheduling decisions.

Static mode (the paper's setting): all of a batch's requests go to the engine together and the task
returns only when every one has finished, so the next batch starts after. Each request's result is
posted as soon as it finishes; the batch record is posted last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from services.engine.base import (
    ChatRequest,
    Engine,
    EngineError,
    StreamChunk,
    engine_headers,
)
from shared import keys, metrics, state, streams
from shared.redis_conn import REDIS_DOWN, call_retrying, execute_retrying
from shared.schemas import (
    Batch,
    BatchClaim,
    BatchItem,
    BatchRecord,
    CompletedEvent,
    QueuedRequest,
    RequestResult,
    RequestStatus,
    TextDelta,
)
from shared.tasks import parse_batch

log = logging.getLogger(__name__)

# How long a streaming request's new text may wait before it is written to Redis: pieces of all
# of a batch's streaming requests go out together in one pipeline this often.
TEXT_FLUSH_S = 0.02


class TextPublisher:
    """Writes the text streaming requests generate to their text streams (keys.request_text),
    batched: `add` from the event loop, a background task flushes every `TEXT_FLUSH_S`.

    Best effort: the request's result, written after, is the answer's record; a piece lost to a
    Redis outage only makes the client wait for that result."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.pending: dict[str, list[TextDelta]] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, request_id: str, delta: TextDelta) -> None:
        self.pending.setdefault(request_id, []).append(delta)

    def _write(self, pending: dict[str, list[TextDelta]]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for request_id, deltas in pending.items():
            streams.append_text(pipe, request_id, deltas)
        pipe.execute()

    async def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        try:
            await asyncio.to_thread(self._write, pending)
        except REDIS_DOWN as exc:
            log.warning("streamed text of %d requests not written: %s", len(pending), exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TEXT_FLUSH_S)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()


def text_sink(publisher: TextPublisher, req: QueuedRequest) -> Callable[[StreamChunk], None]:
    """What the engine calls with each piece of a streaming request's answer."""
    offset = len(req.continuation)

    def on_chunk(chunk: StreamChunk) -> None:
        nonlocal offset
        if chunk.text:
            publisher.add(req.request_id, TextDelta(run=req.reruns, offset=offset,
                                                    text=chunk.text, at=chunk.at))
            offset += len(chunk.text)

    return on_chunk


@dataclass(frozen=True)
class WorkerIdentity:
    """One worker process: its id (host-pid-random) and when it started."""

    worker_id: str
    started_at: float

    @classmethod
    def of_this_process(cls) -> WorkerIdentity:
        return cls(f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", time.time())


def _already_final(r: redis.Redis, request_id: str) -> bool:
    """At least once upstream (a request rerun after its worker was taken for dead, say) must not
    mean two results. The status write itself never overwrites a final status (one script in
    `state.record_transition`); this read also keeps a second result, continuation or rerun off
    the streams."""
    current = call_retrying(lambda: state.statuses(r, [request_id])).get(request_id)
    if current is not None and current.is_final:
        log.warning("request %s is already %s: a second result is dropped", request_id,
                    current.value)
        return True
    return False


def post_event(r: redis.Redis, event: CompletedEvent,
               continuation: QueuedRequest | None = None,
               request: QueuedRequest | None = None) -> bool:
    """Write a result's state change and its completed-stream entry in one transaction; a
    continuation goes back on the incoming stream in the same transaction, so it cannot be lost.
    A request's final result (`request`: the request) also ends its text stream with an empty
    piece, which tells the ingress answering it (streaming, or waiting for the whole answer) to
    read the result now. False when the request was already final (the result is dropped)."""
    if event.result is not None and _already_final(r, event.result.request_id):
        return False

    def build(pipe: redis.client.Pipeline) -> None:
        if event.result is not None and continuation is not None:
            state.record_requeued(pipe, event.result, continuation.continuations)
            streams.publish(pipe, streams.INCOMING, continuation)
            pipe.hincrby(keys.METRICS, "continuations", 1)
        elif event.result is not None:
            state.record_result(pipe, event.result)
            if request is not None:
                res = event.result
                streams.append_text(pipe, res.request_id, [TextDelta(
                    run=request.reruns, offset=len(res.text), text="", at=res.finished_at)])
        streams.publish(pipe, streams.COMPLETED, event)

    execute_retrying(r, build)
    return True


def observe_final(item: BatchItem, result: RequestResult) -> None:
    """Prometheus: a request's final run (its whole life, from acceptance)."""
    req = item.request
    gpu = str(result.gpu)
    if result.finish_reason == "error":
        metrics.finished(RequestStatus.FAILED, req.tenant, req.app_id)
        return
    metrics.finished(RequestStatus.COMPLETED, req.tenant, req.app_id)
    metrics.QUEUE_WAIT.labels(gpu).observe(max(0.0, result.started_at - req.queued_at))
    metrics.REQUEST_LATENCY.labels(gpu).observe(max(0.0, result.finished_at - req.queued_at))
    if result.first_token_at is not None:
        if req.generated_so_far == 0:  # a continuation's first token came in an earlier run
            metrics.TIME_TO_FIRST_TOKEN.labels(gpu).observe(
                max(0.0, result.first_token_at - req.queued_at))
        run_tokens = result.generated_tokens - req.generated_so_far
        if run_tokens > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(gpu).observe(
                max(0.0, result.finished_at - result.first_token_at) / (run_tokens - 1))
    if req.continuations == 0:  # one prediction, one run: their difference is the error
        metrics.PREDICTION_ERROR.labels(req.app_id).observe(
            item.predicted_tokens - result.generated_tokens)


def continuation_of(req: QueuedRequest, result: RequestResult) -> QueuedRequest | None:
    """The request to requeue when a run stopped at its cap short of the request's max_tokens."""
    if result.finish_reason != "length" or result.generated_tokens >= req.max_tokens:
        return None
    return req.model_copy(update={
        "continuation": result.text,
        "generated_so_far": result.generated_tokens,
        "continuations": req.continuations + 1,
        # The prompt of the next run includes the output so far.
        "input_tokens": req.input_tokens + (result.generated_tokens - req.generated_so_far),
    })


def post_rerun(r: redis.Redis, failed: RequestResult, req: QueuedRequest) -> None:
    """The engine failed this run: the request goes back through the predictor (its partial
    result travels on the completed stream as `requeued`, so the scheduler frees its slot)."""
    if _already_final(r, req.request_id):
        return

    def build(pipe: redis.client.Pipeline) -> None:
        state.record_rerun(pipe, req.request_id, failed.finished_at, req.reruns + 1,
                           failed.error or "engine error")
        streams.publish(pipe, streams.INCOMING, req.model_copy(update={"reruns": req.reruns + 1}))
        streams.publish(pipe, streams.COMPLETED, CompletedEvent(kind="requeued", result=failed))
        pipe.hincrby(keys.METRICS, "engine_reruns", 1)

    execute_retrying(r, build)


async def _run_item(
    engine: Engine, http: httpx.AsyncClient, model: str, batch: Batch, item: BatchItem,
    publisher: TextPublisher | None = None,
) -> RequestResult:
    req = item.request
    started = time.time()
    chat = ChatRequest(request_id=req.request_id, instruction=req.instruction,
                       user_input=req.input,
                       max_tokens=min(item.max_tokens, req.remaining_max_tokens),
                       sampling=req.sampling, continuation=req.continuation,
                       priority=item.engine_priority)
    try:
        if req.stream and publisher is not None:
            out = await engine.generate(http, model, chat,
                                        on_chunk=text_sink(publisher, req))
        else:
            out = await engine.generate(http, model, chat)
    except (httpx.HTTPError, EngineError, ValueError) as exc:
        log.warning("request %s failed on the engine: %s", req.request_id, exc)
        runs = f" (run {req.reruns + 1})" if req.reruns else ""
        return RequestResult(
            request_id=req.request_id, batch_id=batch.batch_id, gpu=batch.gpu,
            text=req.continuation, input_tokens=req.input_tokens,
            generated_tokens=req.generated_so_far, finish_reason="error",
            error=f"engine error{runs}: {exc}"[:500], started_at=started,
            finished_at=time.time(),
        )
    return RequestResult(
        request_id=req.request_id,
        batch_id=batch.batch_id,
        gpu=batch.gpu,
        text=req.continuation + out.text,
        input_tokens=out.prompt_tokens or req.input_tokens,
        generated_tokens=req.generated_so_far + out.completion_tokens,
        finish_reason="length" if out.finish_reason == "length" else "stop",
        started_at=out.started_at,
        first_token_at=out.first_token_at,
        finished_at=out.finished_at,
    )


def claim(r: redis.Redis, batch: Batch, worker: WorkerIdentity) -> bool:
    """Take the batch for this worker process (`state.claim_batch`), through a Redis outage."""
    mine = BatchClaim(worker_id=worker.worker_id, worker_started_at=worker.started_at,
                      claimed_at=time.time())
    if call_retrying(lambda: state.claim_batch(r, batch.gpu, batch.batch_id, mine)):
        return True
    log.warning("batch %s is not this worker's to run (delivered again after its worker died, "
                "or no longer in flight): skipped", batch.batch_id)
    return False


@dataclass(frozen=True)
class Shutdown:
    """The worker was asked to stop (`asked` set): a running batch gets `handback_s` more, then
    what is still generating is aborted and handed back (`post_handback`)."""

    asked: threading.Event
    handback_s: float


def post_handback(r: redis.Redis, req: QueuedRequest, batch: Batch, started: float) -> None:
    """A run aborted because its worker is stopping: the request goes back through the
    predictor (requeued, visibly waiting, not counted as a rerun: nothing went wrong with it).
    The `requeued` event frees its slot in the scheduler's books."""
    if _already_final(r, req.request_id):
        return
    now = time.time()
    partial = RequestResult(
        request_id=req.request_id, batch_id=batch.batch_id, gpu=batch.gpu,
        text=req.continuation, input_tokens=req.input_tokens,
        generated_tokens=req.generated_so_far, finish_reason="error",
        error="handed back: its worker stopped", started_at=started, finished_at=now)

    def build(pipe: redis.client.Pipeline) -> None:
        state.record_rerun(pipe, req.request_id, now, req.reruns, "its worker stopped")
        streams.publish(pipe, streams.INCOMING, req)
        streams.publish(pipe, streams.COMPLETED, CompletedEvent(kind="requeued", result=partial))
        pipe.hincrby(keys.METRICS, "handed_back", 1)

    execute_retrying(r, build)


async def _hand_back_on_shutdown(shutdown: Shutdown, items: list[BatchItem],
                                 tasks: list[asyncio.Task[RequestResult]],
                                 generating: set[str], handed: set[str]) -> None:
    """Once the worker is asked to stop and `handback_s` has passed, abort every engine run
    still going and note its request in `handed`."""
    while not shutdown.asked.is_set():
        await asyncio.sleep(CANCEL_POLL_S)
    await asyncio.sleep(shutdown.handback_s)
    for item, task in zip(items, tasks, strict=True):
        if item.request_id in generating and not task.done():
            log.info("request %s: its worker is stopping; handing it back", item.request_id)
            handed.add(item.request_id)
            task.cancel()


async def run_batch(
    r: redis.Redis, engine: Engine, engine_url: str, model: str, batch: Batch, timeout_s: float,
    max_reruns: int = 0, shutdown: Shutdown | None = None, api_key: str | None = None,
) -> BatchRecord:
    started = time.time()
    current = call_retrying(lambda: state.statuses(r, [i.request_id for i in batch.items]))
    # A request cancelled (or otherwise final) before its batch started does not run.
    live = [i for i in batch.items
            if (s := current.get(i.request_id)) is None or not s.is_final]

    def running(pipe: redis.client.Pipeline) -> None:
        for item in live:
            state.record_transition(pipe, item.request_id, RequestStatus.RUNNING, started,
                                    started_at=repr(started))

    execute_retrying(r, running)

    # Requests whose engine run is under way: only those are handed back at shutdown (one whose
    # result is being posted finishes; cancelling it then could post it twice).
    generating: set[str] = set()
    limits = httpx.Limits(max_connections=len(batch.items) + 2)
    publisher = TextPublisher(r) if any(i.request.stream for i in live) else None
    async with httpx.AsyncClient(base_url=engine_url, timeout=timeout_s, limits=limits,
                                 headers=engine_headers(api_key)) as http:

        async def run_and_post(item: BatchItem) -> RequestResult:
            generating.add(item.request_id)
            try:
                result = await _run_item(engine, http, model, batch, item, publisher)
            finally:
                generating.discard(item.request_id)
            if publisher is not None and item.request.stream:
                await publisher.flush()  # the text before the result that ends it
            if result.finish_reason == "error" and item.request.reruns < max_reruns:
                # The engine failed (restarting, say): run it again, a bounded number of times.
                await asyncio.to_thread(post_rerun, r, result, item.request)
                metrics.REQUEST_RERUNS.labels(cause="engine").inc()
                return result
            continuation = continuation_of(item.request, result)
            kind = "requeued" if continuation is not None else "request"
            # Redis calls are quick; run them in a thread so other streams keep flowing.
            posted = await asyncio.to_thread(post_event, r, CompletedEvent(kind=kind,
                                                                           result=result),
                                             continuation, item.request)
            if posted and continuation is None:
                observe_final(item, result)
            return result

        if publisher is not None:
            publisher.start()
        tasks = [asyncio.create_task(run_and_post(i)) for i in live]
        watchers = [asyncio.create_task(_abort_cancelled(r, live, tasks))]
        handed: set[str] = set()
        if shutdown is not None:
            watchers.append(asyncio.create_task(
                _hand_back_on_shutdown(shutdown, live, tasks, generating, handed)))
        try:
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for watcher in watchers:
                watcher.cancel()
            if publisher is not None:
                await publisher.stop()

    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome,
                                                                 asyncio.CancelledError):
            raise outcome
    for item, outcome in zip(live, outcomes, strict=True):
        if item.request_id in handed and isinstance(outcome, asyncio.CancelledError):
            post_handback(r, item.request, batch, started)
    ran = [(item, res) for item, res in zip(live, outcomes, strict=True)
           if isinstance(res, RequestResult)]
    finished = time.time()
    record = BatchRecord(
        batch_id=batch.batch_id,
        gpu=batch.gpu,
        policy=batch.policy,
        # What ran to the end: requests cancelled before or during the run are left out.
        size=len(ran),
        max_input_tokens=max((i.input_tokens for i, _ in ran), default=0),
        max_predicted_tokens=max((i.predicted_tokens for i, _ in ran), default=0),
        # Tokens generated in this run (a continuation's earlier output ran in an earlier batch).
        max_generated_tokens=max((res.generated_tokens - i.request.generated_so_far
                                  for i, res in ran), default=0),
        total_generated_tokens=sum(res.generated_tokens - i.request.generated_so_far
                                   for i, res in ran),
        estimated_service_s=batch.estimated_service_s,
        measured_s=finished - started,
        started_at=started,
        finished_at=finished,
    )
    post_event(r, CompletedEvent(kind="batch", batch=record))
    metrics.BATCH_SIZE.labels(str(batch.gpu)).observe(record.size)
    metrics.BATCH_DURATION.labels(str(batch.gpu)).observe(record.measured_s)
    return record


# How often a running batch looks for cancelled members (one pipelined read per batch).
CANCEL_POLL_S = 0.25


async def _abort_cancelled(r: redis.Redis, items: list[BatchItem],
                           tasks: list[asyncio.Task[RequestResult]]) -> None:
    """Cancel the run of each request cancelled meanwhile: its stream to the engine closes and
    the engine aborts the generation, freeing its KV cache for the rest."""
    ids = [i.request_id for i in items]
    while True:
        await asyncio.sleep(CANCEL_POLL_S)
        try:
            current = await asyncio.to_thread(state.statuses, r, ids)
        except REDIS_DOWN:
            continue  # the runs go on; look again once Redis is back
        for rid, task in zip(ids, tasks, strict=True):
            if current.get(rid) is RequestStatus.CANCELLED and not task.done():
                log.info("request %s cancelled: aborting its generation", rid)
                task.cancel()


def batch_request_ids(payload: str | bytes | Mapping[str, Any]) -> list[str]:
    """The request ids an unreadable batch payload still names (best effort)."""
    try:
        raw: Any = json.loads(payload) if isinstance(payload, str | bytes) else payload
        items = raw.get("items") if isinstance(raw, Mapping) else None
    except ValueError:
        return []
    ids = []
    for item in items if isinstance(items, list) else []:
        request = item.get("request") if isinstance(item, Mapping) else None
        rid = request.get("request_id") if isinstance(request, Mapping) else None
        if isinstance(rid, str) and rid:
            ids.append(rid)
    return ids


def fail_unreadable_batch(r: redis.Redis, payload: str | bytes | Mapping[str, Any],
                          error: ValueError) -> list[str]:
    """A batch this worker cannot read (another schema version, malformed): fail the requests it
    names that are still open, with the reason, rather than leave them running. The scheduler
    frees the batch's GPU slot at its batch timeout. Returns the failed ids."""
    ids = batch_request_ids(payload)
    current = state.statuses(r, ids)
    open_ids = [rid for rid in ids if (s := current[rid]) is not None and not s.is_final]
    now = time.time()
    pipe = r.pipeline(transaction=True)
    for rid in open_ids:
        state.record_failed(pipe, rid, now, f"the worker could not read its batch: {error}")
    pipe.hincrby(keys.METRICS, "refused:batch", 1)
    pipe.execute()
    log.error("refused a batch (%d requests named, %d failed): %s", len(ids), len(open_ids),
              error)
    return open_ids


def run_batch_sync(r: redis.Redis, engine: Engine, engine_url: str, model: str,
                   payload: str | bytes | Mapping[str, Any], timeout_s: float,
                   worker: WorkerIdentity, max_reruns: int = 0,
                   engine_ready_timeout_s: float = 600.0,
                   shutdown: Shutdown | None = None,
                   api_key: str | None = None) -> BatchRecord | None:
    """Run one batch; None when it was not this worker's to run (see `claim`). A batch waits
    for its engine first (one /health call when it serves): the reruns of an engine that
    failed must not fail again while it restarts."""
    try:
        batch = parse_batch(payload)
    except ValueError as exc:
        fail_unreadable_batch(r, payload, exc)
        # Raised, not retried: Celery acknowledges a failed task, so it cannot come back.
        raise
    if not claim(r, batch, worker):
        return None
    try:
        engine.wait_ready(engine_url, engine_ready_timeout_s)
        return asyncio.run(run_batch(r, engine, engine_url, model, batch, timeout_s,
                                     max_reruns, shutdown, api_key))
    except Exception:
        # Anything unexpected mid-batch (Redis gone for longer than the writes retry, a bug):
        # give the batch back, so the scheduler reruns its open requests now rather than leave
        # them running until batch_timeout_s.
        call_retrying(lambda: state.abandon_batch(r, batch.gpu, batch.batch_id,
                                                  worker.worker_id, time.time()))
        log.exception("batch %s given back to the scheduler", batch.batch_id)
        raise
