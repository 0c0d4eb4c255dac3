"""The live scheduler loop decides only through `planning.plan` (the simulator's test is in
tests/unit/test_sched_planning.py): every batch it sends is a dispatch plan returned, with the
caps plan chose, to the GPU plan chose."""

from __future__ import annotations

import time

import pytest
import redis

from services.scheduler import planning
from services.scheduler.main import Scheduler
from shared import keys, streams
from shared.schemas import Batch
from shared.settings import SchedulerSettings
from tests.conftest import RecordingCelery
from tests.factories import heartbeat, predicted_request

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_the_loop_sends_exactly_what_plan_returns(
    redis_url: str, redis_client: redis.Redis, recording_celery: RecordingCelery,
    monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    planned: list[planning.Dispatch] = []
    real_plan = planning.plan

    def spy(*args: object, **kwargs: object) -> list[planning.Dispatch]:
        out = real_plan(*args, **kwargs)  # type: ignore[arg-type]
        planned.extend(out)
        return out

    monkeypatch.setattr(planning, "plan", spy)
    settings = SchedulerSettings(redis_url=redis_url, batch_size=4, gpus=2, engine_mode=mode,
                                 policy="fcfs-fixed" if mode == "static" else "magnus")
    scheduler = Scheduler(redis_client, recording_celery, settings, instance_id="plan-test")
    assert scheduler.hold_leadership()
    for i in range(12):
        streams.publish(redis_client, streams.PREDICTED, predicted_request(i))
    for gpu in (0, 1):
        redis_client.set(keys.worker_heartbeat(gpu), heartbeat(gpu, 4_096).model_dump_json(),
                         ex=keys.HEARTBEAT_TTL_S)
    scheduler.tick(time.time, block_ms=10)

    sent = [Batch.model_validate_json(args[0]) for _, args, _ in recording_celery.sent]
    assert planned and len(sent) == len(planned)
    for batch, dispatch, (_, _, queue) in zip(sent, planned, recording_celery.sent,
                                              strict=True):
        assert batch.gpu == dispatch.gpu and queue == keys.celery_queue(dispatch.gpu)
        assert [i.request_id for i in batch.items] == [w.request_id for w in dispatch.members]
        assert [i.max_tokens for i in batch.items] == list(dispatch.token_caps)
    if mode == "static":  # least loaded first: GPU 0, GPU 1, then GPU 0's staged batch
        assert [(b.gpu, len(b.items)) for b in sent] == [(0, 4), (1, 4), (0, 4)]
