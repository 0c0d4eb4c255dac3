"""The status page's data over real Redis: what the services write (open requests, batches in
flight, heartbeats, results on the completed stream) read back by ingress's /status/data."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from shared import keys, state, streams
from shared.schemas import (
    Batch,
    BatchItem,
    CompletedEvent,
    QueuedRequest,
    RequestResult,
    RequestStatus,
)
from shared.settings import IngressSettings
from tests.factories import heartbeat

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               gpus=2, status_refresh_s=1.5)
    with TestClient(create_app(settings)) as c:
        yield c


def submit(client: TestClient, app_id: str) -> str:
    resp = client.post("/v1/requests", json={"app_id": app_id, "input": "Fix: he go home.",
                                             "max_tokens": 16})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def test_status_data_reads_queue_batches_heartbeats_and_results(
        client: TestClient, redis_client: redis.Redis) -> None:
    page = client.get("/status")
    assert page.status_code == 200 and 'data-refresh-ms="1500"' in page.text
    ids = [submit(client, app) for app in ("grammar", "grammar", "chat")]
    now = time.time()
    # The first runs on GPU 1 in a batch, the second finishes with a result, the third waits.
    req = queued_request(redis_client, ids[0])
    state.record_transition(redis_client, ids[0], RequestStatus.RUNNING, now)
    batch = Batch(batch_id="b1", gpu=1, policy="magnus", estimated_service_s=1.0, formed_at=now,
                  items=[BatchItem(request=req, max_tokens=16, predicted_tokens=9,
                                   upper_tokens=16)])
    redis_client.hset(keys.gpu_inflight(1), "b1", batch.model_dump_json())
    redis_client.set(keys.worker_heartbeat(1),
                     heartbeat(1, kv_budget_tokens=1000).model_dump_json())
    redis_client.hset(keys.request(ids[1]), "predicted_tokens", 12)
    result = RequestResult(request_id=ids[1], batch_id="b0", gpu=0, text="He goes home.",
                           input_tokens=20, generated_tokens=10, finish_reason="stop",
                           started_at=now - 2, first_token_at=now - 1.5, finished_at=now - 1)
    pipe = redis_client.pipeline(transaction=True)
    state.record_result(pipe, result)
    streams.publish(pipe, streams.COMPLETED, CompletedEvent(kind="request", result=result))
    pipe.execute()

    assert not client.get("/status/data").json()["predictor_ready"]
    redis_client.set(keys.PREDICTOR_HEARTBEAT, "4242", ex=keys.HEARTBEAT_TTL_S)
    data = client.get("/status/data").json()
    assert data["predictor_ready"]
    q = data["queue"]
    assert q["open"] == 2 and q["running"] == 1 and q["waiting"] == 1
    assert q["by_app"] == {"grammar": {"waiting": 0, "dispatched": 1},
                           "chat": {"waiting": 1, "dispatched": 0}}
    assert q["by_tenant"] == {"default": {"waiting": 1, "dispatched": 1}}
    gpu0, gpu1 = data["gpus"]
    assert not gpu0["alive"] and gpu0["batches"] == 0 and gpu0["node"] is None
    assert gpu1["alive"] and gpu1["batches"] == 1 and gpu1["requests"] == 1
    assert gpu1["node"] == "local"
    # A GPU another node registered shows too, with its node, before it ever beats.
    state.register_gpu(redis_client, 2, "node-b")
    redis_client.hset(keys.gpu_inflight(2), "b2", batch.model_copy(
        update={"batch_id": "b2", "gpu": 2, "node": "node-b"}).model_dump_json())
    gpus = client.get("/status/data").json()["gpus"]
    assert [(g["gpu"], g["node"], g["alive"]) for g in gpus][2] == (2, "node-b", False)
    assert gpu1["kv_reserved_tokens"] == req.input_tokens + 16
    assert gpu1["kv_budget_tokens"] == 1000
    window = data["window"]
    assert window["completed"] == 1 and window["generated_tokens"] == 10
    assert window["ttft_s"]["count"] == 1
    assert data["predictor"] == {"count": 1, "mean_abs_error_tokens": 2.0,
                                 "mean_signed_error_tokens": 2.0, "within_25pct": 1.0}
    assert sum(b["completed"] for b in data["buckets"]) == 1


def queued_request(r: redis.Redis, request_id: str) -> QueuedRequest:
    """The queued request ingress published on the incoming stream."""
    for _, message in streams.read_range(r, streams.INCOMING):
        if message.request_id == request_id:
            return message
    raise AssertionError(f"{request_id} was not published")
