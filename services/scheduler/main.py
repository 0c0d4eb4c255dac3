"""The scheduler loop: the mechanism around the pure policies in `policy.py`.

It keeps the waiting pool and each GPU's in-flight batch in Redis (so a restarted scheduler rebuilds
them), asks the policy for a batch whenever a live GPU is free, and sends that batch to the GPU's
Celery queue. One scheduler leads at a time, holding a Redis lock with an expiry.

    python -m services.scheduler.main
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping

import redis

from services.scheduler import capacity, fairness, planning, policy, recovery
from services.scheduler.estimator import PerGpuEstimators, ServiceRecord
from shared import keys, metrics, state, streams
from shared.lifecycle import start_service
from shared.redis_conn import REDIS_DOWN, RedisOutage, connect
from shared.schemas import (
    Batch,
    BatchClaim,
    BatchItem,
    BatchRecord,
    PredictedRequest,
    RequestResult,
    RequestStatus,
    WorkerHeartbeat,
)
from shared.settings import SchedulerSettings
from shared.tasks import TaskSender, make_celery, send_batch

log = logging.getLogger("magnus.scheduler")

# Renew the leader lock only while this instance holds it: a GET then PEXPIRE could extend the
# lock of a standby that took over in between.
_RENEW_LEADERSHIP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def instance_id_for(pid: int) -> str:
    """The value a scheduler writes to the leader lock: its process id first, so an operator
    (and the launcher) can tell which process leads."""
    return f"scheduler-{pid}-{uuid.uuid4().hex[:6]}"


def pid_of_instance(instance_id: str) -> int | None:
    parts = instance_id.split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def to_waiting(p: PredictedRequest) -> policy.WaitingRequest:
    """The policy's view of a request. For a continuation, lengths are what remains to generate
    (its input_tokens already hold the output so far)."""
    req = p.request
    return policy.waiting_request(
        req.request_id, req.queued_at, req.input_tokens, req.remaining_max_tokens,
        p.prediction.predicted_tokens, p.prediction.upper_tokens, req.true_output_tokens,
        req.generated_so_far)


def load_decode_curve(settings: SchedulerSettings) -> capacity.DecodeCurve | None:
    """The engine's measured throughput curve for the concurrency cap: its serving curve when
    one was measured, else its decode curve; None (no cap, logged) when the cap is set
    outright, the mode is static or no curve is readable."""
    path = settings.engine_profile_path
    if settings.engine_mode != "continuous" or settings.max_running_requests is not None:
        return None
    serving = settings.serving_curve_path
    if serving is not None and serving.exists():
        try:
            return capacity.DecodeCurve.load_serving(serving)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("serving curve %s unreadable (%s): trying the decode curve", serving, exc)
    if path is None or not path.exists():
        log.warning("no engine profile at %s: continuous admission has no concurrency cap", path)
        return None
    try:
        return capacity.DecodeCurve.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("engine profile %s unreadable (%s): no concurrency cap", path, exc)
        return None


def policy_config(settings: SchedulerSettings) -> policy.PolicyConfig:
    return policy.PolicyConfig(
        name=settings.policy, batch_size=settings.batch_size,
        max_waste_ratio=settings.max_waste_ratio, waste_slack_tokens=settings.waste_slack_tokens,
        max_batch_size=settings.max_batch_size, hrrn_wait=settings.hrrn_wait,
        engine_mode=settings.engine_mode, max_model_len=settings.max_model_len,
    )


class Scheduler:
    def __init__(self, r: redis.Redis, celery: TaskSender, settings: SchedulerSettings,
                 instance_id: str) -> None:
        self.r, self.celery, self.settings, self.instance_id = r, celery, settings, instance_id
        self.predicted = streams.StreamReader(r, streams.PREDICTED, keys.GROUP_SCHEDULER,
                                              instance_id)
        self.completed = streams.StreamReader(r, streams.COMPLETED, keys.GROUP_SCHEDULER,
                                              instance_id)
        self.config = policy_config(settings)
        self.pool: dict[str, PredictedRequest] = {}
        # The same requests as `pool`, kept sorted by planned length for the policy.
        self.sorted_pool = policy.pool_for(self.config)
        self.inflight: dict[int, dict[str, Batch]] = {}
        # Continuous mode: KV tokens each in-flight request may hold (input + its run's cap).
        self.inflight_kv: dict[int, dict[str, int]] = {}
        self.estimators = PerGpuEstimators()
        self.decode_curve = load_decode_curve(settings)
        # Orphan detection (recovery.py): when each GPU's heartbeat was last seen, when this
        # scheduler took the lead (set at its first check), and when it last checked.
        self.last_beat_seen: dict[int, float] = {}
        self.leading_since: float | None = None
        self.last_reclaim_check = float("-inf")
        self.last_beats: dict[int, WorkerHeartbeat] = {}
        # Service given to each tenant (virtual token counters): the next batch is formed from
        # the least-served tenant's requests when several wait.
        self.fair = fairness.VirtualCounters()

    # --- leadership -------------------------------------------------------------------------
    def hold_leadership(self) -> bool:
        """Take or renew the leader lock; only the leader reads streams or dispatches."""
        ttl_ms = int(self.settings.leader_ttl_s * 1000)
        if self.r.set(keys.SCHEDULER_LEADER, self.instance_id, nx=True, px=ttl_ms):
            log.info("scheduler %s leads", self.instance_id)
            self.rebuild()
            return True
        return bool(self.r.eval(_RENEW_LEADERSHIP, 1, keys.SCHEDULER_LEADER, self.instance_id,
                                ttl_ms))

    def rebuild(self) -> None:
        """Reload the waiting pool and in-flight batches a previous leader left in Redis, and take
        over stream entries it read but never acknowledged."""
        self.predicted.claim_all_pending()
        self.completed.claim_all_pending()
        self.leading_since = None
        self.pool.clear()
        self.sorted_pool = policy.pool_for(self.config)
        self.estimators = PerGpuEstimators()
        for raw in self.r.lrange(keys.BATCH_RECORDS, 0, -1):
            try:
                record = BatchRecord.parse(raw)
            except ValueError as exc:  # a record of another version only teaches less
                log.warning("skipping an unreadable batch record: %s", exc)
                continue
            if record.size > 0:  # every member cancelled: no service time to learn from
                self.estimators.observe(record.gpu, ServiceRecord.from_batch_record(record))
        ids = self.r.zrange(keys.SCHEDULER_WAITING, 0, -1)
        payloads = self.r.mget([keys.request_payload(i) for i in ids]) if ids else []
        for request_id, payload in zip(ids, payloads, strict=True):
            if payload is None:  # expired or already dispatched: nothing left to schedule
                self.r.zrem(keys.SCHEDULER_WAITING, request_id)
                continue
            try:
                self.pool[request_id] = PredictedRequest.parse(payload)
            except ValueError as exc:  # another schema version, or corrupt: fail it, visibly
                log.error("waiting request %s unreadable: %s", request_id, exc)
                pipe = self.r.pipeline(transaction=True)
                state.record_failed(pipe, request_id, time.time(),
                                    f"scheduler could not read the waiting request: {exc}")
                pipe.zrem(keys.SCHEDULER_WAITING, request_id)
                pipe.delete(keys.request_payload(request_id))
                pipe.execute()
        self.sorted_pool.add_many([to_waiting(p) for p in self.pool.values()])
        self.inflight = {
            gpu: {bid: Batch.model_validate_json(b)
                  for bid, b in self.r.hgetall(keys.gpu_inflight(gpu)).items()}
            for gpu in state.known_gpus(self.r, self.settings.gpus)
        }
        # Until their results arrive, count every member of an in-flight batch as holding KV.
        # A batch item does not record its admission's reservation; its prompt + predicted upper
        # bound is that reservation except for the oracle's (true length).
        self.inflight_kv = {
            gpu: {i.request_id: i.input_tokens + min(i.upper_tokens, i.max_tokens)
                  for b in batches.values() for i in b.items}
            for gpu, batches in self.inflight.items()
        }
        log.info("rebuilt: %d waiting, %d in flight", len(self.pool),
                 sum(len(b) for b in self.inflight.values()))

    # --- inputs -----------------------------------------------------------------------------
    def ingest(self, block_ms: int) -> int:
        entries = self.predicted.read(256, block_ms)
        if not entries:
            return 0
        current = state.statuses(self.r, [p.request.request_id for _, p in entries])
        pipe = self.r.pipeline(transaction=True)
        for _, p in entries:
            rid = p.request.request_id
            if rid in self.pool:  # a replayed entry: already waiting
                continue
            if (status := current.get(rid)) is not None and status.is_final:
                continue  # cancelled while it was predicted: nothing to schedule
            self.pool[rid] = p
            self.sorted_pool.add(to_waiting(p))
            pipe.set(keys.request_payload(rid), p.model_dump_json(), ex=keys.REQUEST_TTL_S)
            pipe.zadd(keys.SCHEDULER_WAITING, {rid: p.request.queued_at})
        self.predicted.ack(pipe, [eid for eid, _ in entries])
        pipe.execute()
        return len(entries)

    def observe_completions(self) -> int:
        entries = self.completed.read(256, block_ms=1)
        if not entries:
            return 0
        pipe = self.r.pipeline(transaction=True)
        for _, event in entries:
            if event.result is not None:
                self.inflight_kv.get(event.result.gpu, {}).pop(event.result.request_id, None)
            if event.batch is not None:
                self.inflight.get(event.batch.gpu, {}).pop(event.batch.batch_id, None)
                pipe.hdel(keys.gpu_inflight(event.batch.gpu), event.batch.batch_id)
                pipe.hdel(keys.gpu_running(event.batch.gpu), event.batch.batch_id)
                pipe.hincrby(keys.METRICS, "batches_completed", 1)
                if event.batch.size > 0:  # every member cancelled: no service to learn from
                    pipe.rpush(keys.BATCH_RECORDS, event.batch.model_dump_json())
                    pipe.ltrim(keys.BATCH_RECORDS, -keys.BATCH_RECORDS_MAXLEN, -1)
                    self.estimators.observe(event.batch.gpu,
                                            ServiceRecord.from_batch_record(event.batch))
        self.completed.ack(pipe, [eid for eid, _ in entries])
        pipe.execute()
        return len(entries)

    def live_gpus(self) -> dict[int, WorkerHeartbeat]:
        """The GPUs whose worker beats now, on whichever node: the GPUs nodes registered, read
        at every call, so a node that joins is planned for at its first heartbeat."""
        gpus = state.known_gpus(self.r, self.settings.gpus)
        raw = self.r.mget([keys.worker_heartbeat(g) for g in gpus])
        self.last_beats = {g: WorkerHeartbeat.model_validate_json(b)
                           for g, b in zip(gpus, raw, strict=True) if b}
        return self.last_beats

    # --- decisions --------------------------------------------------------------------------
    def decide(self, now: float) -> list[Batch]:
        """Batches to send now: `planning.plan` over the live GPUs (the simulator calls the same
        function), formed into Batch messages. plan removes them from the sorted pool."""
        if not self.pool:
            return []
        cap = self.concurrency_cap()
        gpus = [planning.GpuState(gpu=gpu, kv_budget_tokens=beat.kv_budget_tokens,
                                  inflight_batches=len(self.inflight.get(gpu, {})),
                                  inflight_kv_tokens=sum(self.inflight_kv.get(gpu, {}).values()),
                                  inflight_requests=len(self.inflight_kv.get(gpu, {})),
                                  max_running_requests=cap)
                for gpu, beat in sorted(self.live_gpus().items())]
        tenants = {p.request.tenant for p in self.pool.values()}
        in_flight = self.in_flight_by_tenant()
        staging = fairness.staging_depth(self.settings.staged_batches_per_gpu,
                                         len(tenants | set(in_flight)),
                                         self.settings.fair_share)
        if self.settings.fair_share and len(tenants) > 1:
            return [self._form(d, now) for d in self._plan_fair(gpus, now, staging, in_flight)]
        dispatches = planning.plan(self.config, self.sorted_pool, gpus, now,
                                   self.estimators.pooled, staging, self.estimators.warm())
        for d in dispatches:  # one tenant waits: its counter still counts its service
            self._charge(d)
        return [self._form(d, now) for d in dispatches]

    def _charge(self, dispatch: planning.Dispatch) -> None:
        """Count a dispatch's tokens (prompt + predicted) against its members' tenants."""
        for w in dispatch.members:
            req = self.pool[w.request_id]
            self.fair.charge(req.request.tenant,
                             req.request.input_tokens + req.prediction.predicted_tokens,
                             req.request.tenant_weight)

    def in_flight_by_tenant(self) -> Counter[str]:
        """Requests each tenant has in dispatched batches (tenants with none are absent)."""
        return Counter(item.request.tenant for batches in self.inflight.values()
                       for batch in batches.values() for item in batch.items)

    def _plan_fair(self, gpus: list[planning.GpuState], now: float, staging: int,
                   in_flight: Mapping[str, int]) -> list[planning.Dispatch]:
        """Several tenants wait: one dispatch at a time, each planned over the requests of the
        least-served tenant (fairness.py) with the GPUs as the dispatches so far left them; a
        tenant none of whose requests can go now is passed over, so no GPU idles for
        fairness."""
        self.fair.forget_idle({p.request.tenant for p in self.pool.values()}, in_flight)
        by_gpu = {g.gpu: g for g in gpus}
        dispatches: list[planning.Dispatch] = []
        taken: set[str] = set()
        passed_over: set[str] = set()
        while True:
            tenant = self.fair.choose({p.request.tenant for rid, p in self.pool.items()
                                       if rid not in taken} - passed_over)
            if tenant is None:
                return dispatches
            own = policy.pool_for(self.config, [to_waiting(p) for rid, p in self.pool.items()
                                                if rid not in taken
                                                and p.request.tenant == tenant])
            planned = planning.plan(self.config, own, list(by_gpu.values()), now,
                                    self.estimators.pooled, staging, self.estimators.warm())
            if not planned:
                passed_over.add(tenant)
                continue
            d = planned[0]
            ids = [w.request_id for w in d.members]
            self.sorted_pool.remove(ids)
            taken.update(ids)
            self._charge(d)
            dispatches.append(d)
            g = by_gpu[d.gpu]
            by_gpu[d.gpu] = dataclasses.replace(
                g, inflight_batches=g.inflight_batches + 1,
                inflight_kv_tokens=g.inflight_kv_tokens + sum(d.held_kv_tokens),
                inflight_requests=g.inflight_requests + len(d.members))

    def concurrency_cap(self) -> int | None:
        """Continuous mode: the most requests a GPU should run at once (settings, else the
        decode curve read at the waiting pool's typical context); None in static mode."""
        if self.settings.engine_mode != "continuous":
            return None
        if self.settings.max_running_requests is not None:
            return self.settings.max_running_requests
        if self.decode_curve is None:
            return None
        context = capacity.typical_context(self.sorted_pool.input_tokens,
                                           self.sorted_pool.predicted_tokens,
                                           default=self.settings.max_model_len // 4)
        return capacity.saturation_concurrency(self.decode_curve, context,
                                               self.settings.throughput_share)

    def _form(self, dispatch: planning.Dispatch, now: float) -> Batch:
        """The Batch message for a dispatch; its members leave the pool and count as holding
        their planned KV on the GPU until their results arrive."""
        items = [self._item(self.pool.pop(w.request_id), cap, priority)
                 for w, cap, priority in zip(dispatch.members, dispatch.token_caps,
                                             dispatch.engine_priorities, strict=True)]
        batch = Batch(batch_id=uuid.uuid4().hex, gpu=dispatch.gpu,
                      node=self.last_beats[dispatch.gpu].node, policy=self.settings.policy,
                      items=items, estimated_service_s=dispatch.estimated_service_s,
                      formed_at=now)
        self.inflight.setdefault(dispatch.gpu, {})[batch.batch_id] = batch
        kv = self.inflight_kv.setdefault(dispatch.gpu, {})
        for item, held in zip(items, dispatch.held_kv_tokens, strict=True):
            kv[item.request_id] = held
        return batch

    @staticmethod
    def _item(p: PredictedRequest, cap: int, engine_priority: int | None) -> BatchItem:
        """A batch item capped at the planned token cap: a run that reaches it short of the
        request's max_tokens comes back as a continuation."""
        req = p.request
        return BatchItem(request=req, max_tokens=cap,
                         predicted_tokens=p.prediction.predicted_tokens,
                         upper_tokens=p.prediction.upper_tokens,
                         engine_priority=engine_priority)

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
        send_batch(self.celery, batch)
        log.info("batch %s -> gpu %d on %s: %d requests", batch.batch_id[:8], batch.gpu,
                 batch.node, len(batch.items))

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
                pipe.hdel(keys.gpu_running(gpu), batch_id)
                pipe.execute()
                self._forget(gpu, batch)
                for item in batch.items:
                    metrics.finished(RequestStatus.FAILED, item.request.tenant, item.request.app_id)

    def _forget(self, gpu: int, batch: Batch) -> None:
        """The batch is no longer in flight (failed, rerun or planned again): its members stop
        holding KV on the GPU."""
        self.inflight.get(gpu, {}).pop(batch.batch_id, None)
        for item in batch.items:
            self.inflight_kv.get(gpu, {}).pop(item.request_id, None)

    # --- recovery -----------------------------------------------------------------------------
    def reclaim_orphans(self, now: float) -> int:
        """Rerun the open requests of batches whose worker died mid-batch (recovery.py decides
        which); at most every `reclaim_interval_s`. Returns how many batches were reclaimed."""
        s = self.settings
        if now - self.last_reclaim_check < s.reclaim_interval_s:
            return 0
        self.last_reclaim_check = now
        if self.leading_since is None:
            self.leading_since = now
        beats = self.live_gpus()
        for gpu in beats:
            self.last_beat_seen[gpu] = now
        reclaimed = 0
        for gpu, batches in self.inflight.items():
            if not batches:
                continue
            beat = beats.get(gpu)
            # A heartbeat without a worker id (an older worker) says only that someone beats.
            liveness = recovery.GpuLiveness(
                live_worker_id=(beat.worker_id or None) if beat is not None else None,
                live_worker_started_at=beat.worker_started_at if beat is not None else 0.0,
                last_beat_seen_at=self.last_beat_seen.get(gpu))
            raw_claims = self.r.hgetall(keys.gpu_running(gpu))
            claims = {}
            for batch_id, raw in raw_claims.items():
                try:
                    claims[batch_id] = BatchClaim.parse(raw)
                except ValueError as exc:  # another version: its batch ends at batch_timeout_s
                    log.warning("unreadable claim on batch %s: %s", batch_id, exc)
            for batch_id in recovery.orphaned_batches(claims, set(batches), liveness, now,
                                                      s.orphan_after_s, self.leading_since):
                reclaimed += self._rerun(gpu, batches[batch_id], raw_claims[batch_id],
                                         claims[batch_id].worker_id, now)
            for batch_id in recovery.stranded_batches(set(raw_claims), set(batches), liveness,
                                                      now, s.orphan_after_s, self.leading_since):
                reclaimed += self._replan(gpu, batches[batch_id], now)
        return reclaimed

    def _replan(self, gpu: int, batch: Batch, now: float) -> bool:
        """Take a batch no worker started off its silent GPU and send its requests back through
        the predictor to be planned onto live GPUs. They never ran, so this is no rerun (their
        rerun count stays). Holds only if no worker claimed the batch meanwhile."""
        running_key = keys.gpu_running(gpu)
        ids = [i.request_id for i in batch.items]
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(running_key, *[keys.request(i) for i in ids])
                if pipe.hexists(running_key, batch.batch_id):
                    return False
                current = state.statuses(self.r, ids)
                pipe.multi()
                pipe.hdel(keys.gpu_inflight(gpu), batch.batch_id)
                moved = 0
                for item in batch.items:
                    if current[item.request_id] != RequestStatus.SCHEDULED:
                        continue  # cancelled meanwhile
                    state.record_transition(
                        pipe, item.request_id, RequestStatus.REQUEUED, now,
                        requeue_reason=f"gpu {gpu} on node {batch.node} went silent before "
                                       "starting its batch")
                    streams.publish(pipe, streams.INCOMING, item.request)
                    moved += 1
                pipe.hincrby(keys.METRICS, "batches_replanned", 1)
                pipe.execute()
            except redis.WatchError:
                return False
        metrics.REQUEST_RERUNS.labels(cause="stranded").inc(moved)
        self._forget(gpu, batch)
        log.warning("batch %s on gpu %d (node %s) never started and its GPU is silent: %d "
                    "requests planned again", batch.batch_id[:8], gpu, batch.node, moved)
        return True

    def _rerun(self, gpu: int, batch: Batch, raw_claim: str, runner: str, now: float) -> bool:
        """Take `batch` out of flight and send its open members back through the predictor, in
        one transaction that holds only if no worker wrote to the batch or its requests since
        they were read (a result that lands meanwhile wins; the next check tries again)."""
        running_key = keys.gpu_running(gpu)
        ids = [i.request_id for i in batch.items]
        with self.r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(running_key, *[keys.request(i) for i in ids])
                if pipe.hget(running_key, batch.batch_id) != raw_claim:
                    return False
                current = state.statuses(self.r, ids)
                pipe.multi()
                pipe.hdel(keys.gpu_inflight(gpu), batch.batch_id)
                pipe.hdel(running_key, batch.batch_id)
                rerun, failed_apps = 0, list[tuple[str, str]]()
                for item in batch.items:
                    # Scheduled or running in this batch: anything else was finished or
                    # requeued as a continuation by the worker before it died.
                    if current[item.request_id] not in (RequestStatus.SCHEDULED,
                                                        RequestStatus.RUNNING):
                        continue
                    req = item.request
                    if req.reruns >= self.settings.max_reruns:
                        state.record_failed(pipe, req.request_id, now,
                                            f"its worker died while running it {req.reruns + 1} "
                                            f"times (max_reruns={self.settings.max_reruns})")
                        failed_apps.append((req.tenant, req.app_id))
                        continue
                    state.record_rerun(pipe, req.request_id, now, req.reruns + 1,
                                       f"worker {runner} died mid-batch")
                    streams.publish(pipe, streams.INCOMING,
                                    req.model_copy(update={"reruns": req.reruns + 1}))
                    rerun += 1
                pipe.hincrby(keys.METRICS, "batches_reclaimed", 1)
                pipe.execute()
            except redis.WatchError:
                return False
        metrics.REQUEST_RERUNS.labels(cause="worker").inc(rerun)
        for tenant, app in failed_apps:
            metrics.finished(RequestStatus.FAILED, tenant, app)
        failed = len(failed_apps)
        self._forget(gpu, batch)
        log.warning("batch %s on gpu %d died with worker %s: %d requests rerun, %d failed",
                    batch.batch_id[:8], gpu, runner, rerun, failed)
        return True

    def tick(self, clock: Callable[[], float], block_ms: int = 20) -> None:
        self.ingest(block_ms)
        self.observe_completions()
        now = clock()  # read after ingesting, so no batch is stamped before its requests arrived
        self.reclaim_orphans(now)
        self.fail_stuck_batches(now)
        for batch in self.decide(now):
            self.dispatch(batch, now)
        self.export_gauges()

    def export_gauges(self) -> None:
        """Prometheus gauges of what this leader holds (a standby reports nothing held)."""
        metrics.WAITING_REQUESTS.set(len(self.pool))
        for gpu in sorted(set(self.inflight) | set(self.last_beats)):
            held = self.inflight_kv.get(gpu, {})
            metrics.INFLIGHT_REQUESTS.labels(str(gpu)).set(
                sum(len(b.items) for b in self.inflight.get(gpu, {}).values()))
            metrics.KV_RESERVED_TOKENS.labels(str(gpu)).set(sum(held.values()))
        for gpu, beat in self.last_beats.items():
            metrics.KV_BUDGET_TOKENS.labels(str(gpu)).set(beat.kv_budget_tokens)

    def export_standby_gauges(self) -> None:
        metrics.WAITING_REQUESTS.set(0)
        for gpu in sorted(set(self.inflight) | set(self.last_beats)):
            metrics.INFLIGHT_REQUESTS.labels(str(gpu)).set(0)
            metrics.KV_RESERVED_TOKENS.labels(str(gpu)).set(0)

    def run(self, stop: threading.Event) -> None:
        last_lock = 0.0
        leading = False
        outage = RedisOutage("scheduler")
        while not stop.is_set():
            try:
                now = time.time()
                down = outage.down_since is not None
                # The leader renews every third of the TTL; a standby tries at every pass.
                if not leading or down or now - last_lock > self.settings.leader_ttl_s / 3:
                    leading, last_lock = self.hold_leadership(), now
                    metrics.SCHEDULER_LEADING.set(1 if leading else 0)
                    if leading and down:
                        # Memory may be ahead of or behind Redis after an outage (a step cut
                        # short, the last second of writes lost): resync as a new leader does.
                        self.rebuild()
                    outage.recovered()
                if not leading:
                    self.export_standby_gauges()
                    # A standby: try for the lock often enough to take over soon after it
                    # expires (within a tenth of its TTL).
                    stop.wait(min(1.0, self.settings.leader_ttl_s / 10))
                    continue
                self.tick(time.time, block_ms=int(self.settings.tick_s * 1000))
            except REDIS_DOWN as exc:
                outage.failed(exc, stop)
        if leading and self.r.get(keys.SCHEDULER_LEADER) == self.instance_id:
            self.r.delete(keys.SCHEDULER_LEADER)


def main() -> int:
    stop = start_service()
    settings = SchedulerSettings()
    metrics.serve(settings.metrics_port, settings.metrics_host)
    r = connect(settings.redis_url, settings.redis_connect_timeout_s)
    Scheduler(r, make_celery(settings.redis_url, settings.broker_visibility_timeout_s), settings,
              instance_id=instance_id_for(os.getpid())).run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
