"""Scheduler leadership and recovery against real Redis: one leader at a time, a standby takes
over when the leader dies, rebuilds the waiting pool, and nothing is lost or dispatched twice."""

from __future__ import annotations

import time

import pytest
import redis

from services.scheduler.main import Scheduler
from shared import keys, state, streams
from shared.schemas import Batch, BatchClaim, RequestResult, RequestStatus
from shared.settings import SchedulerSettings
from tests.conftest import RecordingCelery
from tests.factories import heartbeat, predicted_request

pytestmark = pytest.mark.integration


def _publish(r: redis.Redis, n: int) -> None:
    for i in range(n):
        streams.publish(r, streams.PREDICTED, predicted_request(i))


def _scheduler(redis_url: str, r: redis.Redis, celery: RecordingCelery, name: str) -> Scheduler:
    settings = SchedulerSettings(redis_url=redis_url, batch_size=8, leader_ttl_s=0.5)
    return Scheduler(r, celery, settings, instance_id=name)


def test_standby_takes_over_rebuilds_and_dispatches_each_request_once(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    first = _scheduler(redis_url, redis_client, recording_celery, "first")
    standby = _scheduler(redis_url, redis_client, recording_celery, "standby")
    assert first.hold_leadership()
    assert not standby.hold_leadership()  # one leader at a time

    _publish(redis_client, 5)
    first.ingest(block_ms=10)
    assert len(first.pool) == 5
    # The leader reads three more, then dies before acknowledging them (no GPU yet: no dispatch).
    for i in range(5, 8):
        streams.publish(redis_client, streams.PREDICTED, predicted_request(i))
    first.predicted.read(count=3, block_ms=10)
    assert recording_celery.sent == []

    time.sleep(0.7)  # the dead leader's lock expires
    assert standby.hold_leadership()
    assert len(standby.pool) == 5  # rebuilt from Redis
    standby.ingest(block_ms=10)  # and the unacknowledged entries are claimed, not lost
    assert sorted(standby.pool) == sorted(f"req-{i}" for i in range(8))

    redis_client.set(keys.worker_heartbeat(0), heartbeat(0).model_dump_json(),
                     ex=keys.HEARTBEAT_TTL_S)
    standby.tick(time.time, block_ms=10)
    standby.tick(time.time, block_ms=10)  # GPU 0 is busy: nothing more is sent
    dispatched = [rid for _, args, _ in recording_celery.sent for rid in _ids(args[0])]
    assert sorted(dispatched) == sorted(f"req-{i}" for i in range(8))
    assert len(dispatched) == len(set(dispatched))
    assert redis_client.zcard(keys.SCHEDULER_WAITING) == 0
    assert redis_client.hlen(keys.gpu_inflight(0)) == 1
    assert not first.hold_leadership()  # the old leader cannot come back and run them twice


def _ids(batch_json: str) -> list[str]:
    return [item.request_id for item in Batch.model_validate_json(batch_json).items]


# Worker processes and when they started: the old one, then its replacement.
WORKERS = {"worker-old": 1.0, "worker-new": 2.0}


def _beat(r: redis.Redis, worker_id: str) -> None:
    beat = heartbeat(0, worker_id=worker_id).model_copy(
        update={"worker_started_at": WORKERS[worker_id]})
    r.set(keys.worker_heartbeat(0), beat.model_dump_json(), ex=keys.HEARTBEAT_TTL_S)


def _claim(r: redis.Redis, batch: Batch, worker_id: str) -> bool:
    return state.claim_batch(r, 0, batch.batch_id, BatchClaim(
        worker_id=worker_id, worker_started_at=WORKERS[worker_id], claimed_at=time.time()))


def _dispatch_one_batch(redis_url: str, r: redis.Redis, celery: RecordingCelery,
                        max_reruns: int = 2) -> tuple[Scheduler, Batch]:
    settings = SchedulerSettings(redis_url=redis_url, batch_size=4, reclaim_interval_s=0.0,
                                 max_reruns=max_reruns)
    scheduler = Scheduler(r, celery, settings, instance_id="s")
    assert scheduler.hold_leadership()
    for i in range(4):
        p = predicted_request(i)
        state.record_queued(r, p.request)
        streams.publish(r, streams.PREDICTED, p)
    _beat(r, "worker-old")
    scheduler.tick(time.time, block_ms=10)
    (sent,) = celery.sent
    return scheduler, Batch.model_validate_json(sent[1][0])


def test_a_batch_whose_worker_died_mid_batch_is_rerun_once_and_never_twice(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    scheduler, batch = _dispatch_one_batch(redis_url, redis_client, recording_celery)
    assert _claim(redis_client, batch, "worker-old")
    assert not _claim(redis_client, batch, "worker-new")  # claimed once
    # One member finished before its worker was killed; the rest were running.
    done = batch.items[0].request_id
    state.record_result(redis_client, RequestResult(
        request_id=done, batch_id=batch.batch_id, gpu=0, text="ok", input_tokens=10,
        generated_tokens=3, finish_reason="stop", started_at=1.0, finished_at=2.0))
    assert scheduler.reclaim_orphans(time.time()) == 0  # the old worker still beats

    _beat(redis_client, "worker-new")  # the supervisor restarted it
    assert scheduler.reclaim_orphans(time.time()) == 1
    reruns = [m for _, m in streams.read_range(redis_client, streams.INCOMING)]
    assert sorted(q.request_id for q in reruns) == sorted(i.request_id for i in batch.items[1:])
    assert all(q.reruns == 1 for q in reruns)
    assert state.statuses(redis_client, [done])[done] is RequestStatus.COMPLETED
    rerun_id = batch.items[1].request_id
    assert state.statuses(redis_client, [rerun_id])[rerun_id] is RequestStatus.REQUEUED
    assert redis_client.hlen(keys.gpu_inflight(0)) == 0 == redis_client.hlen(keys.gpu_running(0))
    assert scheduler.inflight[0] == {} and scheduler.inflight_kv[0] == {}
    # Celery hands the old message out again (its late ack never came): the new worker skips it.
    assert not _claim(redis_client, batch, "worker-new")


def test_a_request_that_keeps_losing_its_worker_fails_with_the_reason(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    scheduler, batch = _dispatch_one_batch(redis_url, redis_client, recording_celery,
                                           max_reruns=0)
    assert _claim(redis_client, batch, "worker-old")
    _beat(redis_client, "worker-new")
    assert scheduler.reclaim_orphans(time.time()) == 1
    rid = batch.items[0].request_id
    assert state.statuses(redis_client, [rid])[rid] is RequestStatus.FAILED
    error = redis_client.hget(keys.request(rid), "error")
    assert error is not None and "worker died while running it 1 times" in error
    assert redis_client.zcard(keys.OPEN_REQUESTS) == 0


def test_a_started_batch_is_not_rerun_while_its_worker_beats(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    scheduler, batch = _dispatch_one_batch(redis_url, redis_client, recording_celery)
    assert _claim(redis_client, batch, "worker-old")
    for _ in range(3):
        _beat(redis_client, "worker-old")
        assert scheduler.reclaim_orphans(time.time() + 60) == 0
    assert redis_client.hlen(keys.gpu_inflight(0)) == 1


def test_a_batch_its_worker_gave_back_is_rerun_while_that_worker_lives(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    """A worker whose batch raised mid-run (Redis gone too long, a bug) gives it back."""
    scheduler, batch = _dispatch_one_batch(redis_url, redis_client, recording_celery)
    assert _claim(redis_client, batch, "worker-old")
    assert state.abandon_batch(redis_client, 0, batch.batch_id, "worker-old", time.time())
    assert scheduler.reclaim_orphans(time.time()) == 1  # worker-old still beats
    assert len(streams.read_range(redis_client, streams.INCOMING)) == len(batch.items)
    # Given back once out of flight: nothing to give.
    assert not state.abandon_batch(redis_client, 0, batch.batch_id, "worker-old", time.time())


def test_a_batch_whose_members_were_all_cancelled_does_not_stop_a_new_leader(
        redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery) -> None:
    """Found by restarting `make run` on its append-only file: a size-0 batch record (its only
    member cancelled while running) was kept, and every scheduler died rebuilding from it."""
    from shared.schemas import BatchRecord, CompletedEvent

    empty = BatchRecord(batch_id="b0", gpu=0, policy="magnus", size=0, max_input_tokens=0,
                        max_predicted_tokens=0, max_generated_tokens=0,
                        total_generated_tokens=0, estimated_service_s=1.0, measured_s=0.5,
                        started_at=1.0, finished_at=1.5)
    redis_client.rpush(keys.BATCH_RECORDS, empty.model_dump_json())  # as an older version kept
    settings = SchedulerSettings(redis_url=redis_url)
    first = Scheduler(redis_client, recording_celery, settings, instance_id="a")
    assert first.hold_leadership()  # rebuilt past it
    streams.publish(redis_client, streams.COMPLETED, CompletedEvent(kind="batch", batch=empty))
    first.observe_completions()
    assert redis_client.llen(keys.BATCH_RECORDS) == 1  # the new one is not kept


def test_a_silent_gpus_unstarted_batch_is_planned_onto_a_live_node_and_never_run_twice(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
) -> None:
    r = redis_client
    # Fixed batches of 4: eight requests make one batch per GPU.
    settings = SchedulerSettings(redis_url=redis_url, policy="fcfs-fixed", batch_size=4,
                                 reclaim_interval_s=0.0, orphan_after_s=5.0, gpus=1)
    scheduler = Scheduler(r, recording_celery, settings, instance_id="s")
    assert scheduler.hold_leadership()
    # Two nodes: node-a's GPU got id 0, node-b's id 1 (what `magnus node` allocates).
    assert state.allocate_gpu_id(r, "node-a", 0) == 0
    assert state.allocate_gpu_id(r, "node-b", 0) == 1
    beat_b = heartbeat(1, worker_id="wb").model_copy(update={"node": "node-b"})
    r.set(keys.worker_heartbeat(0), heartbeat(0, worker_id="wa").model_copy(
        update={"node": "node-a"}).model_dump_json(), ex=keys.HEARTBEAT_TTL_S)
    r.set(keys.worker_heartbeat(1), beat_b.model_dump_json(), ex=keys.HEARTBEAT_TTL_S)
    for i in range(8):
        p = predicted_request(i)
        state.record_queued(r, p.request)
        streams.publish(r, streams.PREDICTED, p)
    t0 = time.time()
    scheduler.tick(lambda: t0, block_ms=10)
    queues = sorted(queue for _, _, queue in recording_celery.sent)
    assert queues == ["node-a.gpu.0", "node-b.gpu.1"]  # each node's own queue
    on_a = next(Batch.model_validate_json(a[0]) for _, a, q in recording_celery.sent
                if q == "node-a.gpu.0")
    assert on_a.node == "node-a"

    r.delete(keys.worker_heartbeat(0))  # node-a is torn down before its worker took the batch
    assert scheduler.reclaim_orphans(t0 + 1.0) == 0  # within the grace
    assert scheduler.reclaim_orphans(t0 + 6.0) == 1
    moved = [m for _, m in streams.read_range(r, streams.INCOMING)]
    assert sorted(q.request_id for q in moved) == sorted(i.request_id for i in on_a.items)
    assert all(q.reruns == 0 for q in moved)  # never ran: not a rerun
    assert r.hlen(keys.gpu_inflight(0)) == 0
    # node-a comes back and its worker takes the stale message: the claim refuses it.
    assert not state.claim_batch(r, 0, on_a.batch_id, BatchClaim(
        worker_id="wa2", worker_started_at=t0 + 7, claimed_at=t0 + 7))
    # The moved requests, predicted again, go to node-b, the GPU that beats.
    recording_celery.sent.clear()
    for q in moved:
        streams.publish(r, streams.PREDICTED, predicted_request(int(q.request_id.split("-")[1])))
    r.hdel(keys.gpu_inflight(1), *r.hkeys(keys.gpu_inflight(1)))  # node-b finished its batch
    scheduler.rebuild()
    scheduler.tick(lambda: t0 + 7.0, block_ms=10)
    assert [q for _, _, q in recording_celery.sent] == ["node-b.gpu.1"]


def test_gpu_ids_are_unique_across_nodes_and_stable_for_a_node(redis_client: redis.Redis) -> None:
    r = redis_client
    assert [state.allocate_gpu_id(r, "a", d) for d in (0, 1)] == [0, 1]
    assert state.allocate_gpu_id(r, "b", 0) == 2
    assert state.allocate_gpu_id(r, "a", 1) == 1  # a restarted node gets its own ids back
    state.register_gpu(r, 1, "a")  # its worker confirms the id
    with pytest.raises(state.GpuIdTaken, match="belongs to a/0"):
        state.register_gpu(r, 0, "b")
    state.register_gpu(r, 7, "compose")  # an explicit id nobody holds is taken
    assert state.known_gpus(r, local_gpus=1) == [0, 1, 2, 7]
    r.hdel(keys.GPU_NODES, "0", "1", "2")  # freed ids are reused, lowest first
    assert state.allocate_gpu_id(r, "c", 0) == 0


def test_the_simulators_layout_is_what_nodes_joining_in_order_are_given(
        redis_client: redis.Redis) -> None:
    nodes = [("node0", 3), ("node1", 2)]
    allocated = [state.GpuSlot(state.allocate_gpu_id(redis_client, node, d), node, d)
                 for node, n in nodes for d in range(n)]
    assert allocated == state.cluster_layout(nodes)
