"""Scheduler leadership and recovery against real Redis: one leader at a time, a standby takes
over when the leader dies, rebuilds the waiting pool, and nothing is lost or dispatched twice."""

from __future__ import annotations

import time

import pytest
import redis

from services.scheduler.main import Scheduler
from shared import keys, streams
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
    from shared.schemas import Batch

    return [item.request_id for item in Batch.model_validate_json(batch_json).items]
