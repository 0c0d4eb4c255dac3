"""The scheduler loop: the mechanism around the pure policies in `policy.py`.

It keeps the waiting pool and each GPU's in-flight batch in Redis (so a restarted scheduler rebuilds
them), asks the policy for a batch whenever a live GPU is free, and sends that batch to the GPU's
Celery queue. One scheduler leads at a time, holding a Redis lock with an expiry.

    python -m services.scheduler.main
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType

import redis
from celery import Celery

from services.scheduler import policy
from services.worker.celery_app import RUN_BATCH_TASK, make_celery
from shared import keys, state
from shared.redis_conn import connect
from shared.schemas import (
    Batch,
    BatchItem,
    CompletedEvent,
    PredictedRequest,
    RequestResult,
    RequestStatus,
    WorkerHeartbeat,
)
from shared.settings import SchedulerSettings
from shared.streams import GroupReader

log = logging.getLogger("magnus.scheduler")


def to_waiting(p: PredictedRequest) -> policy.WaitingRequest:
    return policy.WaitingRequest(
        request_id=p.request.request_id,
        queued_at=p.request.queued_at,
        input_tokens=p.request.input_tokens,
        max_tokens=p.request.max_tokens,
        predicted_tokens=p.prediction.predicted_tokens,
        upper_tokens=p.prediction.upper_tokens,
    )


class Scheduler:
    def __init__(self, r: redis.Redis, celery: Celery, settings: SchedulerSettings,
                 instance_id: str) -> None:
        self.r, self.celery, self.settings, self.instance_id = r, celery, settings, instance_id
        self.predicted = GroupReader(r, keys.STREAM_PREDICTED, keys.GROUP_SCHEDULER, instance_id)
        self.completed = GroupReader(r, keys.STREAM_COMPLETED, keys.GROUP_SCHEDULER, instance_id)
        self.pool: dict[str, PredictedRequest] = {}
        self.inflight: dict[int, dict[str, Batch]] = {}

    # --- leadership -------------------------------------------------------------------------
    def hold_leadership(self) -> bool:
        """Take or renew the leader lock; only the leader reads streams or dispatches."""
        ttl_ms = int(self.settings.leader_ttl_s * 1000)
        if self.r.set(keys.SCHEDULER_LEADER, self.instance_id, nx=True, px=ttl_ms):
            log.info("scheduler %s leads", self.instance_id)
            self.rebuild()
            return True
        if self.r.get(keys.SCHEDULER_LEADER) == self.instance_id:
            self.r.pexpire(keys.SCHEDULER_LEADER, ttl_ms)
            return True
        return False

    def rebuild(self) -> None:
        """Reload the waiting pool and in-flight batches a previous leader left in Redis, and take
        over stream entries it read but never acknowledged."""
        self.predicted.claim_all_pending()
        self.completed.claim_all_pending()
        self.pool.clear()
        ids = self.r.zrange(keys.SCHEDULER_WAITING, 0, -1)
        payloads = self.r.mget([keys.request_payload(i) for i in ids]) if ids else []
        for request_id, payload in zip(ids, payloads, strict=True):
            if payload is None:  # expired or already dispatched: nothing left to schedule
                self.r.zrem(keys.SCHEDULER_WAITING, request_id)
                continue
            self.pool[request_id] = PredictedRequest.model_validate_json(payload)
        self.inflight = {
            gpu: {bid: Batch.model_validate_json(b)
                  for bid, b in self.r.hgetall(keys.gpu_inflight(gpu)).items()}
            for gpu in range(self.settings.gpus)
        }
        log.info("rebuilt: %d waiting, %d in flight", len(self.pool),
                 sum(len(b) for b in self.inflight.values()))

    # --- inputs -----------------------------------------------------------------------------
    def ingest(self, block_ms: int) -> int:
        entries = self.predicted.read(256, block_ms)
        if not entries:
            return 0
        pipe = self.r.pipeline(transaction=True)
        for _, fields in entries:
            p = PredictedRequest.model_validate_json(fields["request"])
            rid = p.request.request_id
            self.pool[rid] = p
            pipe.set(keys.request_payload(rid), fields["request"], ex=keys.REQUEST_TTL_S)
            pipe.zadd(keys.SCHEDULER_WAITING, {rid: p.request.queued_at})
        self.predicted.ack(pipe, [eid for eid, _ in entries])
        pipe.execute()
        return len(entries)

    def observe_completions(self) -> int:
        entries = self.completed.read(256, block_ms=1)
        if not entries:
            return 0
        pipe = self.r.pipeline(transaction=True)
        for _, fields in entries:
            event = CompletedEvent.model_validate_json(fields["event"])
            if event.batch is not None:
                self.inflight.get(event.batch.gpu, {}).pop(event.batch.batch_id, None)
                pipe.hdel(keys.gpu_inflight(event.batch.gpu), event.batch.batch_id)
                pipe.hincrby(keys.METRICS, "batches_completed", 1)
        self.completed.ack(pipe, [eid for eid, _ in entries])
        pipe.execute()
        return len(entries)

    def live_gpus(self) -> dict[int, WorkerHeartbeat]:
        raw = self.r.mget([keys.worker_heartbeat(g) for g in range(self.settings.gpus)])
        return {g: WorkerHeartbeat.model_validate_json(b) for g, b in enumerate(raw) if b}

    # --- decisions --------------------------------------------------------------------------
    def decide(self, now: float) -> list[Batch]:
        """Form one batch for each live GPU that has nothing in flight."""
        batches: list[Batch] = []
        for gpu in sorted(self.live_gpus()):
            if self.inflight.get(gpu) or not self.pool:
                continue
            chosen = policy.fcfs_fixed([to_waiting(p) for p in self.pool.values()],
                                       self.settings.batch_size)
            items = [self._item(self.pool.pop(w.request_id), cap_at_upper=False) for w in chosen]
            batch = Batch(batch_id=uuid.uuid4().hex, gpu=gpu, policy=self.settings.policy,
                          items=items, estimated_service_s=0.0, formed_at=now)
            self.inflight.setdefault(gpu, {})[batch.batch_id] = batch
            batches.append(batch)
        return batches

    @staticmethod
    def _item(p: PredictedRequest, cap_at_upper: bool) -> BatchItem:
        """A batch item; Magnus policies cap the run at the predicted upper bound (a request that
        reaches it unfinished comes back as a continuation), baselines run to max_tokens."""
        req = p.request
        cap = req.remaining_max_tokens
        if cap_at_upper:
            cap = min(cap, p.prediction.upper_tokens)
        return BatchItem(request=req, max_tokens=max(cap, 1),
                         predicted_tokens=p.prediction.predicted_tokens,
                         upper_tokens=p.prediction.upper_tokens)

    def dispatch(self, batch: Batch, now: float) -> None:
        """Persist the batch as in flight, then hand it to the GPU's Celery queue."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.gpu_inflight(batch.gpu), batch.batch_id, batch.model_dump_json())
        for item in batch.items:
            pipe.zrem(keys.SCHEDULER_WAITING, item.request_id)
            pipe.delete(keys.request_payload(item.request_id))
            state.record_transition(pipe, item.request_id, RequestStatus.SCHEDULED, now,
                                    batch_id=batch.batch_id, gpu=batch.gpu)
        pipe.hincrby(keys.METRICS, "batches_dispatched", 1)
        pipe.execute()
        self.celery.send_task(RUN_BATCH_TASK, args=[batch.model_dump_json()],
                              queue=keys.celery_queue(batch.gpu))
        log.info("batch %s -> gpu %d: %d requests", batch.batch_id[:8], batch.gpu,
                 len(batch.items))

    def fail_stuck_batches(self, now: float) -> None:
        """A batch with no record long after dispatch died with its worker: fail its requests
        with a reason rather than leave them running forever."""
        for gpu, batches in self.inflight.items():
            for batch_id, batch in list(batches.items()):
                if now - batch.formed_at < self.settings.batch_timeout_s:
                    continue
                pipe = self.r.pipeline(transaction=True)
                for item in batch.items:
                    state.record_result(pipe, RequestResult(
                        request_id=item.request_id, batch_id=batch_id, gpu=gpu, text="",
                        input_tokens=item.input_tokens, generated_tokens=0,
                        finish_reason="error", error="batch timed out on its worker",
                        started_at=batch.formed_at, finished_at=now))
                pipe.hdel(keys.gpu_inflight(gpu), batch_id)
                pipe.execute()
                del batches[batch_id]

    def tick(self, clock: Callable[[], float], block_ms: int = 20) -> None:
        self.ingest(block_ms)
        self.observe_completions()
        now = clock()  # read after ingesting, so no batch is stamped before its requests arrived
        self.fail_stuck_batches(now)
        for batch in self.decide(now):
            self.dispatch(batch, now)

    def run(self, stop: threading.Event) -> None:
        last_lock = 0.0
        leading = False
        while not stop.is_set():
            now = time.time()
            if now - last_lock > self.settings.leader_ttl_s / 3:
                leading, last_lock = self.hold_leadership(), now
            if not leading:
                stop.wait(1.0)
                continue
            self.tick(time.time, block_ms=int(self.settings.tick_s * 1000))
        if leading and self.r.get(keys.SCHEDULER_LEADER) == self.instance_id:
            self.r.delete(keys.SCHEDULER_LEADER)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = SchedulerSettings()
    r = connect(settings.redis_url, settings.redis_connect_timeout_s)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Scheduler(r, make_celery(settings.redis_url), settings,
              instance_id=f"scheduler-{os.getpid()}-{uuid.uuid4().hex[:6]}").run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
