"""Running one batch on the engine: the worker's mechanism, with no scheduling decisions.

Static mode (the paper's setting): all of a batch's requests go to the engine together and the task
returns only when every one has finished, so the next batch starts after. Each request's result is
posted as soon as it finishes; the batch record is posted last.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import redis

from services.engine import client as engine
from shared import keys, state
from shared.schemas import (
    Batch,
    BatchItem,
    BatchRecord,
    CompletedEvent,
    QueuedRequest,
    RequestResult,
    RequestStatus,
)

log = logging.getLogger(__name__)


def post_event(r: redis.Redis, event: CompletedEvent,
               continuation: QueuedRequest | None = None) -> None:
    """Write a result's state change and its completed-stream entry in one transaction; a
    continuation goes back on the incoming stream in the same transaction, so it cannot be lost."""
    pipe = r.pipeline(transaction=True)
    if event.result is not None and continuation is not None:
        state.record_requeued(pipe, event.result, continuation.continuations)
        pipe.xadd(keys.STREAM_INCOMING, {"request": continuation.model_dump_json()},
                  maxlen=keys.STREAM_MAXLEN, approximate=True)
        pipe.hincrby(keys.METRICS, "continuations", 1)
    elif event.result is not None:
        state.record_result(pipe, event.result)
    pipe.xadd(
        keys.STREAM_COMPLETED,
        {"event": event.model_dump_json()},
        maxlen=keys.STREAM_MAXLEN,
        approximate=True,
    )
    pipe.execute()


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


async def _run_item(
    http: httpx.AsyncClient, model: str, batch: Batch, item: BatchItem
) -> RequestResult:
    req = item.request
    started = time.time()
    try:
        out = await engine.chat(http, model, req.instruction, req.input,
                                min(item.max_tokens, req.remaining_max_tokens), req.sampling,
                                continuation=req.continuation)
    except (httpx.HTTPError, engine.EngineError, ValueError) as exc:
        log.warning("request %s failed on the engine: %s", req.request_id, exc)
        return RequestResult(
            request_id=req.request_id, batch_id=batch.batch_id, gpu=batch.gpu,
            text=req.continuation, input_tokens=req.input_tokens,
            generated_tokens=req.generated_so_far, finish_reason="error",
            error=f"engine error: {exc}"[:500], started_at=started, finished_at=time.time(),
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


async def run_batch(
    r: redis.Redis, engine_url: str, model: str, batch: Batch, timeout_s: float
) -> BatchRecord:
    started = time.time()
    pipe = r.pipeline(transaction=True)
    for item in batch.items:
        state.record_transition(pipe, item.request_id, RequestStatus.RUNNING, started,
                                started_at=repr(started))
    pipe.execute()

    limits = httpx.Limits(max_connections=len(batch.items) + 2)
    async with httpx.AsyncClient(base_url=engine_url, timeout=timeout_s, limits=limits) as http:

        async def run_and_post(item: BatchItem) -> RequestResult:
            result = await _run_item(http, model, batch, item)
            continuation = continuation_of(item.request, result)
            kind = "requeued" if continuation is not None else "request"
            # Redis calls are quick; run them in a thread so other streams keep flowing.
            await asyncio.to_thread(post_event, r, CompletedEvent(kind=kind, result=result),
                                    continuation)
            return result

        results = await asyncio.gather(*(run_and_post(i) for i in batch.items))

    finished = time.time()
    record = BatchRecord(
        batch_id=batch.batch_id,
        gpu=batch.gpu,
        policy=batch.policy,
        size=len(batch.items),
        max_input_tokens=max(i.input_tokens for i in batch.items),
        max_predicted_tokens=max(i.predicted_tokens for i in batch.items),
        # Tokens generated in this run (a continuation's earlier output ran in an earlier batch).
        max_generated_tokens=max(res.generated_tokens - i.request.generated_so_far
                                 for res, i in zip(results, batch.items, strict=True)),
        total_generated_tokens=sum(res.generated_tokens - i.request.generated_so_far
                                   for res, i in zip(results, batch.items, strict=True)),
        estimated_service_s=batch.estimated_service_s,
        measured_s=finished - started,
        started_at=started,
        finished_at=finished,
    )
    post_event(r, CompletedEvent(kind="batch", batch=record))
    return record


def run_batch_sync(r: redis.Redis, engine_url: str, model: str, payload: str | dict[str, Any],
                   timeout_s: float) -> BatchRecord:
    batch = (Batch.model_validate_json(payload) if isinstance(payload, str)
             else Batch.model_validate(payload))
    return asyncio.run(run_batch(r, engine_url, model, batch, timeout_s))
