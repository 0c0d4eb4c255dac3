"""Ingress against real Redis and the serving model's real tokenizer: bad input never reaches
Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from shared import keys, state
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


def test_metrics_count_accepted_requests(client: TestClient, redis_client: redis.Redis) -> None:
    # The predictor keeps its model version beside the counters: a label, not a 500.
    redis_client.hset(keys.METRICS, "predictor:model_version", "xgb-v3")
    client.post("/v1/requests", json=GOOD)
    resp = client.get("/v1/metrics")
    assert resp.status_code == 200
    body = resp.json()
    assert body["counters"]["requests_accepted"] == 1 and body["incoming_stream"] == 1
    assert body["labels"] == {"predictor:model_version": "xgb-v3"}
    assert body["open_requests"] == 1


def test_backpressure_counts_everything_accepted_and_not_final(
    client: TestClient, redis_client: redis.Redis,
) -> None:
    # Nothing reads the incoming stream here (no predictor): the two accepted requests are still
    # open, and the third is refused with a Retry-After.
    first = client.post("/v1/requests", json=GOOD).json()["request_id"]
    assert client.post("/v1/requests", json=GOOD).status_code == 202
    resp = client.post("/v1/requests", json=GOOD)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
    assert redis_client.xlen(keys.STREAM_INCOMING) == 2
    # A request reaching a final state frees its place.
    pipe = redis_client.pipeline()
    state.record_failed(pipe, first, 1.0, "test")
    pipe.execute()
    assert client.post("/v1/requests", json=GOOD).status_code == 202


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"app_id": "qa", "input": "hi", "temperature": NaN}', "temperature"),
        (b'{"app_id": "qa", "input": "hi", "temperature": Infinity}', "temperature"),
        (b'{"app_id": "qa", "input": "hi", "top_p": 1e400}', "top_p"),
        (b'{"app_id": "qa", "input": "hi", "max_tokens": 1e400}', "max_tokens"),
        (b'{"app_id": "qa", "input": "\\ud800"}', "input"),
        (b'{"app_id": "qa", "input": "hi", "user_id": "\\udfff"}', "user_id"),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_are_422_not_500(
    client: TestClient, redis_client: redis.Redis, raw: bytes, field: str,
) -> None:
    resp = client.post("/v1/requests", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["message"].startswith(field)
    assert redis_client.dbsize() == 0


def test_an_error_echoes_only_an_excerpt_of_a_huge_value(client: TestClient) -> None:
    resp = client.post("/v1/requests", json={**GOOD, "max_tokens": "x" * 100_000})
    assert resp.status_code == 422
    assert len(resp.content) < 2_000
    (detail,) = resp.json()["detail"]
    assert detail["input"].endswith("(100002 chars)")


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"messages": [{"role": "user", "content": ""}]}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 100}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": ""}, "model"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
         "messages"),
        ({"stream": "sometimes"}, "stream"),
    ],
)
def test_bad_chat_requests_are_422_naming_the_field_in_openais_error_shape(
    client: TestClient, redis_client: redis.Redis, patch: dict[str, object], field: str,
) -> None:
    body = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], **patch}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["message"].startswith(field) and error["param"].startswith(field), error
    assert error["type"] == "invalid_request_error"
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(
    ("patch", "field"),
    [({"prompt": ""}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"n": 3}, "n"),
     ({"max_tokens": 0}, "max_tokens"), ({"prompt": 7}, "prompt")],
)
def test_bad_completion_requests_are_422_naming_the_field(
    client: TestClient, redis_client: redis.Redis, patch: dict[str, object], field: str,
) -> None:
    resp = client.post("/v1/completions", json={"model": "qa", "prompt": "hi", **patch})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"].startswith(field), resp.text
    assert redis_client.dbsize() == 0


def test_redis_down_is_503_with_retry_after_and_no_address(redis_url: str) -> None:
    from offline.launcher import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = IngressSettings(redis_url=dead, model_dir=SMOLLM2_DIR, max_model_len=256,
                               retry_after_s=3)
    app = create_app(settings, redis_factory=lambda s: redis.Redis.from_url(
        s.redis_url, decode_responses=True, socket_connect_timeout=0.5))
    with TestClient(app) as c:
        resp = c.post("/v1/requests", json=GOOD)
        assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
        health = c.get("/healthz")
    assert health.status_code == 503
    for text in (resp.text, health.text):
        assert "127.0.0.1" not in text and dead.rsplit(":", 1)[1] not in text
