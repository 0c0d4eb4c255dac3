"""Fair shares in the live scheduler loop (real Redis, a recorded Celery): with two tenants
waiting, batches alternate between them by the service each was given, not by who flooded the
queue first; with fair sharing off, one pool in the policy's order."""

from __future__ import annotations

import time

import pytest
import redis

from services.scheduler.main import Scheduler
from shared import keys, streams
from shared.schemas import Batch, PredictedRequest
from shared.settings import SchedulerSettings
from tests.conftest import RecordingCelery
from tests.factories import heartbeat, predicted_request

pytestmark = pytest.mark.integration


def of_tenant(p: PredictedRequest, tenant: str, weight: float = 1.0) -> PredictedRequest:
    req = p.request.model_copy(update={"tenant": tenant, "tenant_weight": weight})
    return p.model_copy(update={"request": req})


def batches_sent(redis_client: redis.Redis, celery: RecordingCelery, fair: bool,
                 heavy_weight: float = 1.0, light: int = 4, ticks: int = 7) -> list[set[str]]:
    """The heavy tenant queues 24 requests, then the light one `light`; one GPU takes a batch
    of 4 at a time (each finishes before the next tick); every request costs the same. The
    tenants of each batch sent, in order."""
    settings = SchedulerSettings(redis_url="unused", batch_size=4, gpus=1, policy="fcfs-fixed",
                                 fair_share=fair, staged_batches_per_gpu=0)
    scheduler = Scheduler(redis_client, celery, settings, instance_id="fair-test")
    assert scheduler.hold_leadership()
    for i in range(24):
        streams.publish(redis_client, streams.PREDICTED,
                        of_tenant(predicted_request(i, input_tokens=20, queued_at=100.0 + i),
                                  "heavy", heavy_weight))
    for i in range(24, 24 + light):
        streams.publish(redis_client, streams.PREDICTED,
                        of_tenant(predicted_request(i, input_tokens=20, queued_at=200.0 + i),
                                  "light"))
    tenants_per_batch: list[set[str]] = []
    for _ in range(ticks):
        redis_client.set(keys.worker_heartbeat(0), heartbeat(0, 4_096).model_dump_json(),
                         ex=keys.HEARTBEAT_TTL_S)
        before = len(celery.sent)
        scheduler.tick(time.time, block_ms=10)
        for _, args, _ in celery.sent[before:]:
            batch = Batch.model_validate_json(args[0])
            tenants_per_batch.append({i.request.tenant for i in batch.items})
            # The batch finishes at once: the GPU is free for the next tick.
            scheduler.inflight[0].pop(batch.batch_id)
            scheduler.inflight_kv[0].clear()
    return tenants_per_batch


def test_the_light_tenant_is_served_within_two_batches_despite_the_flood(
        redis_client: redis.Redis, recording_celery: RecordingCelery) -> None:
    sent = batches_sent(redis_client, recording_celery, fair=True)
    assert all(len(tenants) == 1 for tenants in sent)  # a batch is one tenant's
    order = [next(iter(t)) for t in sent]
    assert "light" in order[:2], order  # not after the heavy tenant's 6 batches
    assert order.count("light") == 1 and len(order) == 7


def test_without_fair_sharing_the_flood_goes_first(
        redis_client: redis.Redis, recording_celery: RecordingCelery) -> None:
    sent = batches_sent(redis_client, recording_celery, fair=False)
    order = [t for tenants in sent for t in sorted(tenants)]
    assert order[:6] == ["heavy"] * 6, order  # first come first served: the flood first


@pytest.mark.parametrize(("heavy_weight", "heavy_batches"), [(1.0, 5), (3.0, 6)])
def test_while_both_wait_batches_follow_the_weights(
        redis_client: redis.Redis, recording_celery: RecordingCelery, heavy_weight: float,
        heavy_batches: int) -> None:
    # The light tenant has 3 batches' worth waiting: of the first 8 batches, equal weights give
    # the heavy tenant 5 (alternating until the light one runs out), weight 3 against 1 gives
    # it 6.
    sent = batches_sent(redis_client, recording_celery, fair=True, heavy_weight=heavy_weight,
                        light=12, ticks=8)
    order = [next(iter(t)) for t in sent]
    assert order.count("heavy") == heavy_batches, order


def test_with_two_tenants_active_nothing_is_staged_behind_a_running_batch(
        redis_client: redis.Redis, recording_celery: RecordingCelery) -> None:
    """Static engine, one staged batch allowed: while only the heavy tenant is active it stages
    its next batch behind the running one; once the light tenant has a request in flight, the
    GPU is not committed ahead (the next batch is chosen when it frees)."""
    settings = SchedulerSettings(redis_url="unused", batch_size=4, gpus=1, policy="fcfs-fixed",
                                 staged_batches_per_gpu=1)
    scheduler = Scheduler(redis_client, recording_celery, settings, instance_id="stage-test")
    assert scheduler.hold_leadership()
    for i in range(16):
        streams.publish(redis_client, streams.PREDICTED,
                        of_tenant(predicted_request(i, input_tokens=20, queued_at=100.0 + i),
                                  "heavy"))

    def tick() -> list[Batch]:
        redis_client.set(keys.worker_heartbeat(0), heartbeat(0, 4_096).model_dump_json(),
                         ex=keys.HEARTBEAT_TTL_S)
        before = len(recording_celery.sent)
        scheduler.tick(time.time, block_ms=10)
        return [Batch.model_validate_json(args[0]) for _, args, _ in recording_celery.sent[before:]]

    first = tick()
    assert len(first) == 2  # one running, one staged: one tenant active
    scheduler.inflight[0].pop(first[0].batch_id)
    scheduler.inflight_kv[0].clear()
    # The light tenant's request arrives while the staged heavy batch runs: with two tenants
    # active nothing more is staged, so it waits for that batch alone and goes next.
    streams.publish(redis_client, streams.PREDICTED,
                    of_tenant(predicted_request(99, input_tokens=20, queued_at=300.0), "light"))
    assert tick() == []
    scheduler.inflight[0].pop(first[1].batch_id)
    scheduler.inflight_kv[0].clear()
    light = tick()
    assert [{i.request.tenant for i in b.items} for b in light] == [{"light"}]
    assert tick() == []  # the light one in flight: no heavy batch staged behind it
    scheduler.inflight[0].pop(light[0].batch_id)
    scheduler.inflight_kv[0].clear()
    # The light tenant is gone: the heavy one runs and stages again.
    assert len(tick()) == 2
