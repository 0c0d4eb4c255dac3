"""Ingress against real Redis and the serving model's real tokenizer: bad input never reaches
Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from shared import keys
from shared.settings import IngressSettings

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               max_tokens_limit=128, max_input_chars=5000, max_pending_requests=2)
    with TestClient(create_app(settings)) as c:
        yield c


GOOD = {"app_id": "qa", "instruction": "Answer briefly.", "input": "What is 2+2?",
        "user_id": "u1", "max_tokens": 16}


@pytest.mark.parametrize(
    ("patch", "status", "field"),
    [
        ({"input": ""}, 422, "input"),
        ({"input": "   "}, 422, "input"),
        ({"max_tokens": 0}, 422, "max_tokens"),
        ({"max_tokens": 129}, 422, "max_tokens"),
        ({"max_tokens": "many"}, 422, "max_tokens"),
        ({"app_id": ""}, 422, "app_id"),
        ({"user_id": "has spaces"}, 422, "user_id"),
        ({"temperature": 5}, 422, "temperature"),
        ({"unexpected": True}, 422, "unexpected"),
        ({"input": "word " * 1100}, 413, "input"),  # over max_input_chars
        ({"input": "word " * 400}, 413, "input"),  # ~400 tokens > 256-token context
        ({"input": "word " * 200, "max_tokens": 100}, 422, "max_tokens"),  # prompt + max > ctx
    ],
)
def test_bad_input_is_refused_naming_the_field_and_leaves_redis_empty(
    client: TestClient, redis_client: redis.Redis, patch: dict[str, object], status: int,
    field: str,
) -> None:
    resp = client.post("/v1/requests", json={**GOOD, **patch})
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["message"].startswith(field), body
    assert any(field in map(str, e["loc"]) for e in body["detail"])
    assert redis_client.dbsize() == 0


def test_missing_field_and_malformed_json(client: TestClient, redis_client: redis.Redis) -> None:
    resp = client.post("/v1/requests", json={"input": "hi"})
    assert resp.status_code == 422 and resp.json()["message"].startswith("app_id")
    resp = client.post("/v1/requests", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert redis_client.dbsize() == 0


def test_accepted_request_is_queued_and_pollable(client: TestClient,
                                                 redis_client: redis.Redis) -> None:
    resp = client.post("/v1/requests", json=GOOD)
    assert resp.status_code == 202
    request_id = resp.json()["request_id"]
    assert redis_client.xlen(keys.STREAM_INCOMING) == 1
    view = client.get(f"/v1/requests/{request_id}").json()
    assert view["status"] == "queued" and view["input_tokens"] > 5
    assert set(view["timestamps"]) == {"queued"}


def test_unknown_id_is_404_and_health_is_ok(client: TestClient) -> None:
    assert client.get("/v1/requests/req-nope").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}


def test_metrics_count_accepted_requests(client: TestClient) -> None:
    client.post("/v1/requests", json=GOOD)
    body = client.get("/v1/metrics").json()
    assert body["counters"]["requests_accepted"] == 1 and body["incoming_stream"] == 1


def test_backpressure_answers_429(client: TestClient, redis_client: redis.Redis) -> None:
    redis_client.zadd(keys.SCHEDULER_WAITING, {"a": 1, "b": 2})  # pool at its limit of 2
    resp = client.post("/v1/requests", json=GOOD)
    assert resp.status_code == 429
    assert redis_client.xlen(keys.STREAM_INCOMING) == 0
