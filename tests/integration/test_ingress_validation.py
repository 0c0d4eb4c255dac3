"""Ingress against real Redis and the serving model's real tokenizer: bad input never reaches
Redis."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from unittest.mock import ANY

import pytest
import redis
from fastapi.testclient import TestClient

from offline.launcher import free_port
from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from services.ingress.openai_api import OPENAI_PATHS
from shared import keys, state, streams
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


@pytest.mark.parametrize(("words", "expected"), [
    # A prompt that leaves less than max_tokens_limit (128) in the 256-token context gets the
    # room left (a fixed default of 256 refused it); a short one gets the limit.
    (200, lambda input_tokens: 256 - input_tokens),
    (3, lambda input_tokens: 128),
])
def test_max_tokens_left_out_is_the_room_the_prompt_leaves_in_the_context(
        client: TestClient, redis_client: redis.Redis, words: int,
        expected: Callable[[int], int]) -> None:
    body = {key: value for key, value in GOOD.items() if key != "max_tokens"}
    resp = client.post("/v1/requests", json={**body, "input": "word " * words})
    assert resp.status_code == 202, resp.text
    view = client.get(f"/v1/requests/{resp.json()['request_id']}").json()
    assert view["max_tokens"] == expected(view["input_tokens"])
    assert view["input_tokens"] + view["max_tokens"] <= 256
    ((_, queued),) = streams.read_range(redis_client, streams.INCOMING)
    assert queued.max_tokens == view["max_tokens"]
    # Sent, it is still checked against the context.
    resp = client.post("/v1/requests", json={**body, "input": "word " * words, "max_tokens": 128})
    assert (resp.status_code == 422) == (words == 200), resp.text


# --- body size: refused before parsing ----------------------------------------------------------
BODY_LIMIT = 64 * 1024


def body_limited_settings(redis_url: str) -> IngressSettings:
    return IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                           max_input_chars=5000, max_body_bytes=BODY_LIMIT)


@pytest.fixture()
def live_url(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[str, int]]:
    """Ingress under a real uvicorn on a free port (in a thread), so a body really streams in
    over a socket."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(body_limited_settings(redis_url)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, object]]:
    """Status and JSON body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/chat/completions"])
def test_a_body_declared_over_the_limit_is_413_before_a_byte_is_read(
        live_url: tuple[str, int], redis_client: redis.Redis, path: str) -> None:
    with socket.create_connection(live_url, timeout=10) as sock:
        # 50 MB announced, none sent: the answer cannot have waited for the body.
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode())
        status, body = read_response(sock)
    assert status == 413
    assert_names_the_body(path, body)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/completions"])
def test_a_chunked_body_is_cut_off_with_a_413_once_past_the_limit(
        live_url: tuple[str, int], redis_client: redis.Redis, path: str) -> None:
    import select

    piece = b"x" * 16 * 1024
    sent = 0
    with socket.create_connection(live_url, timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        # Never the last chunk: an answer can only come from counting the pieces.
        deadline = time.monotonic() + 30
        while not select.select([sock], [], [], 0.05)[0]:
            assert time.monotonic() < deadline, f"{sent} bytes sent and no answer"
            try:
                sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status, body = read_response(sock)
    assert status == 413 and sent > BODY_LIMIT
    assert_names_the_body(path, body)
    assert redis_client.dbsize() == 0


def assert_names_the_body(path: str, body: dict[str, object]) -> None:
    """FastAPI's shape on Magnus's routes, OpenAI's on OpenAI's; both name `body`."""
    if path not in OPENAI_PATHS:
        assert str(body["message"]).startswith("body:"), body
        assert body["detail"] == [{"loc": ["body"], "msg": ANY, "type": "value_error"}]
    else:
        assert body["error"] == {"message": ANY, "type": "invalid_request_error",
                                 "param": "body", "code": None}, body


@pytest.mark.parametrize("path", ["/v1/requests", "/v1/predict", "/v1/chat/completions"])
def test_a_body_over_the_limit_is_413_naming_the_body_and_one_at_it_is_read(
        redis_url: str, redis_client: redis.Redis, path: str) -> None:
    with TestClient(create_app(body_limited_settings(redis_url))) as client:
        # Not JSON: parsed, it would be a 422; over the limit, it is never parsed.
        resp = client.post(path, content=b"{" * (BODY_LIMIT + 1),
                           headers={"content-type": "application/json"})
        assert resp.status_code == 413, resp.text
        assert_names_the_body(path, resp.json())
        resp = client.post(path, content=b"{" * BODY_LIMIT,
                           headers={"content-type": "application/json"})
        assert resp.status_code == 422, resp.text
    assert redis_client.dbsize() == 0


def test_a_body_limit_below_what_the_longest_input_needs_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        IngressSettings(max_input_chars=100_000, max_body_bytes=1024 * 1024)
