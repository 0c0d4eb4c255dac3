"""Typed streams and refused messages against real Redis (no engine starts): readers parse what
publishers wrote, skip a poison entry without stalling, and never lose a request silently."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis

from services.engine.base import ChatOutcome, ChatRequest, KVCacheInfo, StreamChunk
from services.engine.vllm import VllmEngine
from services.predictor.main import PredictorService
from services.worker.main import WorkerContext
from services.worker.runner import WorkerIdentity, run_batch, run_batch_sync
from shared import keys, state, streams
from shared.schemas import (
    Batch,
    BatchItem,
    CompletedEvent,
    QueuedRequest,
    RequestResult,
    RequestStatus,
    SchemaVersionError,
    WorkerHeartbeat,
)
from shared.settings import PredictorSettings, WorkerSettings

pytestmark = pytest.mark.integration


def queued(rid: str, max_tokens: int = 64) -> QueuedRequest:
    return QueuedRequest(request_id=rid, app_id="a", user_id="u", instruction="", input="x",
                         max_tokens=max_tokens, input_tokens=10, queued_at=time.time())


def submit(r: redis.Redis, req: QueuedRequest) -> None:
    state.record_queued(r, req)
    streams.publish(r, streams.INCOMING, req)


def submit_v2(r: redis.Redis, req: QueuedRequest) -> None:
    """The request as a producer of schema version 2 would write it."""
    state.record_queued(r, req)
    raw = json.loads(req.model_dump_json()) | {"schema_version": 2}
    r.xadd(keys.STREAM_INCOMING, {streams.INCOMING.field: json.dumps(raw)})


def reader(r: redis.Redis, spec: streams.StreamSpec[streams.M], consumer: str = "c"
           ) -> streams.StreamReader[streams.M]:
    return streams.StreamReader(r, spec, "test-group", consumer)


def status_of(r: redis.Redis, rid: str) -> state.RequestView:
    return state.view_from_hash(rid, r.hgetall(keys.request(rid)))


def test_published_messages_are_read_typed_and_replayed_until_acknowledged(
        redis_client: redis.Redis) -> None:
    for i in range(3):
        submit(redis_client, queued(f"req-{i}"))
    first = reader(redis_client, streams.INCOMING)
    got = first.read(count=10, block_ms=10)
    assert [m.request_id for _, m in got] == ["req-0", "req-1", "req-2"]
    assert all(isinstance(m, QueuedRequest) for _, m in got)
    pipe = redis_client.pipeline()
    first.ack(pipe, [got[0][0]])
    pipe.execute()
    # A restarted consumer of the same name re-reads what it never acknowledged, first.
    again = reader(redis_client, streams.INCOMING)
    assert [m.request_id for _, m in again.read(count=10, block_ms=10)] == ["req-1", "req-2"]


def test_a_poison_request_fails_visibly_and_the_reader_keeps_going(
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    submit_v2(redis_client, queued("req-bad"))
    submit(redis_client, queued("req-good"))
    r = reader(redis_client, streams.INCOMING)
    with caplog.at_level(logging.WARNING, logger="shared.streams"):
        # count=1: the first read gets only the poison entry, and reads on rather than answer [].
        got = r.read(count=1, block_ms=10)
    assert [m.request_id for _, m in got] == ["req-good"]
    view = status_of(redis_client, "req-bad")
    assert view.status is RequestStatus.FAILED and view.finish_reason == "error"
    assert view.error is not None
    assert "QueuedRequest has schema_version 2; this process reads schema_version 1" in view.error
    assert "finished" in view.timestamps
    assert "req-bad" in caplog.text
    # The poison entry is acknowledged: not pending, never read again.
    assert redis_client.xpending(keys.STREAM_INCOMING, "test-group")["pending"] == 1  # req-good
    assert r.refused == 1
    assert redis_client.hget(keys.METRICS, "refused:incoming") == "1"
    again = reader(redis_client, streams.INCOMING)
    assert [m.request_id for _, m in again.read(count=10, block_ms=10)] == ["req-good"]


def test_an_entry_naming_no_known_request_is_logged_as_error_and_skipped(
        redis_client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    redis_client.xadd(keys.STREAM_INCOMING, {"request": "not json"})
    redis_client.xadd(keys.STREAM_INCOMING, {"wrong-field": "{}"})
    raw = json.loads(queued("req-ghost").model_dump_json()) | {"schema_version": 9}
    redis_client.xadd(keys.STREAM_INCOMING, {"request": json.dumps(raw)})  # no state recorded
    r = reader(redis_client, streams.INCOMING)
    with caplog.at_level(logging.ERROR, logger="shared.streams"):
        assert r.read(count=10, block_ms=10) == []
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 3 and "req-ghost" in errors[2].getMessage()
    assert not redis_client.exists(keys.request("req-ghost"))  # no half-made request state
    assert redis_client.xpending(keys.STREAM_INCOMING, "test-group")["pending"] == 0


def test_a_final_request_is_not_overwritten_by_a_replayed_poison_entry(
        redis_client: redis.Redis) -> None:
    req = queued("req-done")
    submit_v2(redis_client, req)
    now = time.time()
    state.record_result(redis_client, RequestResult(
        request_id=req.request_id, batch_id="b", gpu=0, text="ok", input_tokens=10,
        generated_tokens=3, finish_reason="stop", started_at=now, finished_at=now))
    assert reader(redis_client, streams.INCOMING).read(count=10, block_ms=10) == []
    assert status_of(redis_client, "req-done").status is RequestStatus.COMPLETED


def test_a_refused_completed_event_leaves_request_state_alone(redis_client: redis.Redis) -> None:
    req = queued("req-c")
    state.record_queued(redis_client, req)
    state.record_transition(redis_client, req.request_id, RequestStatus.RUNNING, time.time())
    event = json.loads(CompletedEvent(kind="batch").model_dump_json()) | {"schema_version": 3}
    redis_client.xadd(keys.STREAM_COMPLETED, {"event": json.dumps(event)})
    streams.publish(redis_client, streams.COMPLETED, CompletedEvent(kind="batch"))
    got = reader(redis_client, streams.COMPLETED).read(count=10, block_ms=10)
    assert [e.kind for _, e in got] == ["batch"]
    assert status_of(redis_client, "req-c").status is RequestStatus.RUNNING


def test_the_predictor_loop_predicts_past_a_poison_entry(redis_client: redis.Redis,
                                                         redis_url: str, tmp_path: Path) -> None:
    settings = PredictorSettings(redis_url=redis_url, use_model=False,
                                 cache_dir=tmp_path / "cache")
    svc = PredictorService(redis_client, settings, consumer="p")
    submit_v2(redis_client, queued("req-old"))
    submit(redis_client, queued("req-new"))
    assert svc.predict_incoming(block_ms=10) == 1
    assert status_of(redis_client, "req-old").status is RequestStatus.FAILED
    assert status_of(redis_client, "req-new").status is RequestStatus.PREDICTED
    ((_, predicted),) = streams.read_range(redis_client, streams.PREDICTED)
    assert predicted.request.request_id == "req-new"
    # Its training reader skips a refused completed event and learns from the next one.
    event = json.loads(CompletedEvent(kind="batch").model_dump_json()) | {"schema_version": 0}
    redis_client.xadd(keys.STREAM_COMPLETED, {"event": json.dumps(event)})
    now = time.time()
    streams.publish(redis_client, streams.COMPLETED, CompletedEvent(kind="request", result=(
        RequestResult(request_id="req-new", batch_id="b", gpu=0, text="t", input_tokens=10,
                      generated_tokens=12, finish_reason="stop", started_at=now,
                      finished_at=now))))
    assert svc.learn_from_completed() == 1
    (stored,) = redis_client.lrange(keys.TRAINING_LENGTHS, 0, -1)
    assert json.loads(stored)["generated_tokens"] == 12


class ScriptedEngine(VllmEngine):
    """Answers from a script instead of a server (generate only)."""

    def __init__(self, answer: Callable[[ChatRequest], ChatOutcome]) -> None:
        super().__init__()
        self.answer = answer

    async def generate(self, http: httpx.AsyncClient, model: str, request: ChatRequest,
                       on_chunk: Callable[[StreamChunk], None] | None = None) -> ChatOutcome:
        outcome = self.answer(request)
        if on_chunk is not None:  # a streaming request: its text in two pieces
            half = len(outcome.text) // 2
            for piece in (outcome.text[:half], outcome.text[half:]):
                on_chunk(StreamChunk(at=time.time(), text=piece))
        return outcome


def test_the_worker_posts_results_continuations_and_the_batch_record(
        redis_client: redis.Redis) -> None:
    def answer(req: ChatRequest) -> ChatOutcome:
        now = time.time()
        return ChatOutcome(text="t" * req.max_tokens, prompt_tokens=10,
                           completion_tokens=req.max_tokens,
                           finish_reason="length" if req.request_id == "capped" else "stop",
                           started_at=now, first_token_at=now, finished_at=now)

    items = [BatchItem(request=queued("done"), max_tokens=5, predicted_tokens=5, upper_tokens=5),
             BatchItem(request=queued("capped"), max_tokens=4, predicted_tokens=4,
                       upper_tokens=4)]
    for item in items:
        state.record_queued(redis_client, item.request)
    batch = Batch(batch_id="b1", gpu=0, policy="magnus", items=items, estimated_service_s=1.0,
                  formed_at=time.time())
    record = asyncio.run(run_batch(redis_client, ScriptedEngine(answer), "http://unused", "m",
                                   batch, 10.0))
    assert record.size == 2 and record.total_generated_tokens == 9
    events = [e for _, e in streams.read_range(redis_client, streams.COMPLETED)]
    assert sorted(e.kind for e in events) == ["batch", "request", "requeued"]
    ((_, continuation),) = streams.read_range(redis_client, streams.INCOMING)
    assert continuation.request_id == "capped" and continuation.generated_so_far == 4
    assert status_of(redis_client, "done").status is RequestStatus.COMPLETED


def test_the_worker_streams_the_text_of_a_streaming_request_before_its_result(
        redis_client: redis.Redis) -> None:
    """Only a request whose client streams gets its text streamed; its pieces carry their
    offsets in the whole answer (after a continuation's earlier text) and are written before
    the result, which ends the stream with an empty piece. A request whose client waits for the
    whole answer gets the end piece alone (it wakes that client)."""
    def answer(req: ChatRequest) -> ChatOutcome:
        now = time.time()
        return ChatOutcome(text="abcdef", prompt_tokens=10, completion_tokens=6,
                           finish_reason="stop", started_at=now, first_token_at=now,
                           finished_at=now)

    streaming = queued("streamed").model_copy(update={"stream": True, "continuation": "xy",
                                                      "generated_so_far": 2})
    items = [BatchItem(request=r, max_tokens=8, predicted_tokens=8, upper_tokens=8)
             for r in (streaming, queued("polled"))]
    for item in items:
        state.record_queued(redis_client, item.request)
    batch = Batch(batch_id="b3", gpu=0, policy="magnus", items=items, estimated_service_s=1.0,
                  formed_at=time.time())
    asyncio.run(run_batch(redis_client, ScriptedEngine(answer), "http://unused", "m", batch,
                          10.0))
    deltas = [streams.decode_text(f)
              for _, f in redis_client.xrange(keys.request_text("streamed"))]
    # The pieces, then the empty end piece written with the result (ingress reads it now).
    assert [(d.offset, d.text) for d in deltas] == [(2, "abc"), (5, "def"), (8, "")]
    assert redis_client.ttl(keys.request_text("streamed")) > 0
    polled = [streams.decode_text(f) for _, f in redis_client.xrange(keys.request_text("polled"))]
    assert [(d.offset, d.text) for d in polled] == [(6, "")]
    assert status_of(redis_client, "streamed").text == "xyabcdef"


def test_the_worker_fails_the_requests_of_a_batch_it_cannot_read(
        redis_client: redis.Redis) -> None:
    req = queued("req-w")
    state.record_queued(redis_client, req)
    batch = Batch(batch_id="b2", gpu=0, policy="magnus", estimated_service_s=1.0, formed_at=1.0,
                  items=[BatchItem(request=req, max_tokens=8, predicted_tokens=8,
                                   upper_tokens=8)])
    payload = json.loads(batch.model_dump_json()) | {"schema_version": 2}
    with pytest.raises(SchemaVersionError, match="Batch has schema_version 2"):
        run_batch_sync(redis_client, VllmEngine(), "http://unused", "m", json.dumps(payload), 1.0,
                       WorkerIdentity("worker-test", 1.0))
    view = status_of(redis_client, "req-w")
    assert view.status is RequestStatus.FAILED and view.error is not None
    assert "could not read its batch: Batch has schema_version 2" in view.error


def test_worker_context_beats_the_engines_kv_budget(redis_client: redis.Redis,
                                                    redis_url: str) -> None:
    settings = WorkerSettings(redis_url=redis_url, gpu=2)
    ctx = WorkerContext(settings=settings, redis=redis_client, engine=VllmEngine())
    ctx.beat(KVCacheInfo(block_size=16, num_blocks=100))
    beat = WorkerHeartbeat.parse(redis_client.get(keys.worker_heartbeat(2)))
    assert (beat.kv_budget_tokens, beat.busy, beat.gpu) == (1600, False, 2)
    created = WorkerContext.create(settings)  # settings checked, engine picked, Redis reached
    assert created.redis.ping() and created.engine.name == "vllm"
    created.shutdown()


def test_a_request_keeps_its_first_result(redis_client: redis.Redis) -> None:
    """At least once upstream, once downstream: a second final result for a request already
    final (a batch sent again after a Redis outage) is dropped, not written or published."""
    from services.worker.runner import post_event
    from shared.schemas import CompletedEvent, RequestResult

    def result(text: str) -> CompletedEvent:
        return CompletedEvent(kind="request", result=RequestResult(
            request_id="req-once", batch_id="b", gpu=0, text=text, input_tokens=5,
            generated_tokens=2, finish_reason="stop", started_at=1.0, finished_at=2.0))

    redis_client.hset(keys.request("req-once"), mapping={"status": "running"})
    post_event(redis_client, result("first"))
    post_event(redis_client, result("second"))
    assert redis_client.hget(keys.request("req-once"), "text") == "first"
    assert redis_client.xlen(keys.STREAM_COMPLETED) == 1


def test_an_engine_failure_reruns_the_request_a_bounded_number_of_times(
        redis_client: redis.Redis) -> None:
    """The engine fails mid-run (restarting, say): the request goes back through the predictor
    with its rerun counted; once max_reruns is spent it fails, naming the run."""
    from services.engine.base import EngineError

    def answer(req: ChatRequest) -> ChatOutcome:
        raise EngineError("stream ended without a finish reason")

    fresh = queued("fresh")
    spent = queued("spent").model_copy(update={"reruns": 1})
    items = [BatchItem(request=q, max_tokens=5, predicted_tokens=5, upper_tokens=5)
             for q in (fresh, spent)]
    for item in items:
        state.record_queued(redis_client, item.request)
    batch = Batch(batch_id="b3", gpu=0, policy="magnus", items=items, estimated_service_s=1.0,
                  formed_at=time.time())
    asyncio.run(run_batch(redis_client, ScriptedEngine(answer), "http://unused", "m", batch,
                          10.0, max_reruns=1))
    ((_, rerun),) = streams.read_range(redis_client, streams.INCOMING)
    assert rerun.request_id == "fresh" and rerun.reruns == 1
    assert status_of(redis_client, "fresh").status is RequestStatus.REQUEUED
    view = status_of(redis_client, "spent")
    assert view.status is RequestStatus.FAILED and view.error is not None
    assert view.error.startswith("engine error (run 2): stream ended without a finish reason")
    kinds = sorted(e.kind for _, e in streams.read_range(redis_client, streams.COMPLETED))
    assert kinds == ["batch", "request", "requeued"]


def test_a_final_status_is_never_overwritten(redis_client: redis.Redis) -> None:
    """The first of a result, a failure and a cancellation wins; later stages cannot revive."""
    for rid in ("done", "gone"):
        state.record_queued(redis_client, queued(rid))
    now = time.time()
    state.record_result(redis_client, RequestResult(
        request_id="done", batch_id="b", gpu=0, text="first", input_tokens=10,
        generated_tokens=3, finish_reason="stop", started_at=now, finished_at=now))
    state.record_transition(redis_client, "done", RequestStatus.RUNNING, now)
    state.record_cancelled(redis_client, "done", now, "too late")
    assert status_of(redis_client, "done").status is RequestStatus.COMPLETED
    state.record_cancelled(redis_client, "gone", now, "cancelled by the client")
    state.record_transition(redis_client, "gone", RequestStatus.PREDICTED, now)
    state.record_result(redis_client, RequestResult(
        request_id="gone", batch_id="b", gpu=0, text="late", input_tokens=10,
        generated_tokens=3, finish_reason="stop", started_at=now, finished_at=now))
    view = status_of(redis_client, "gone")
    assert view.status is RequestStatus.CANCELLED and view.text in (None, "")
    assert redis_client.zcard(keys.OPEN_REQUESTS) == 0


def test_the_worker_skips_cancelled_requests_and_aborts_one_cancelled_mid_run(
        redis_client: redis.Redis) -> None:
    class SlowEngine(VllmEngine):
        def __init__(self) -> None:
            super().__init__()
            self.aborted: list[str] = []

        async def generate(self, http: httpx.AsyncClient, model: str, request: ChatRequest,
                           on_chunk: Callable[[StreamChunk], None] | None = None
                           ) -> ChatOutcome:
            if request.request_id == "slow":
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.aborted.append(request.request_id)
                    raise
            now = time.time()
            return ChatOutcome(text="ok", prompt_tokens=10, completion_tokens=2,
                               finish_reason="stop", started_at=now, first_token_at=now,
                               finished_at=now)

    items = [BatchItem(request=queued(rid), max_tokens=5, predicted_tokens=5, upper_tokens=5)
             for rid in ("before", "slow", "fast")]
    for item in items:
        state.record_queued(redis_client, item.request)
    state.record_cancelled(redis_client, "before", time.time(), "cancelled by the client")
    batch = Batch(batch_id="b4", gpu=0, policy="magnus", items=items, estimated_service_s=1.0,
                  formed_at=time.time())

    def cancel_slow_soon() -> None:
        time.sleep(0.5)
        state.record_cancelled(redis_client, "slow", time.time(), "cancelled by the client")

    engine = SlowEngine()
    canceller = threading.Thread(target=cancel_slow_soon)
    canceller.start()
    record = asyncio.run(run_batch(redis_client, engine, "http://unused", "m", batch, 60.0))
    canceller.join()
    assert engine.aborted == ["slow"] and record.size == 1
    assert status_of(redis_client, "before").status is RequestStatus.CANCELLED
    assert status_of(redis_client, "slow").status is RequestStatus.CANCELLED
    assert status_of(redis_client, "fast").status is RequestStatus.COMPLETED
    results = [e.result.request_id for _, e in streams.read_range(redis_client, streams.COMPLETED)
               if e.result is not None]
    assert results == ["fast"]
