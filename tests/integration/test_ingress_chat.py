"""The OpenAI-compatible endpoint against real Redis and the real tokenizer, with a stand-in for
the rest of the stack that completes each queued request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from shared import state, streams
from shared.schemas import FinishReason, RequestResult
from shared.settings import IngressSettings

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256)
    with TestClient(create_app(settings)) as c:
        yield c


def complete_next(r: redis.Redis, text: str,
                  finish_reason: FinishReason = "stop") -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entries = streams.read_range(r, streams.INCOMING)
            if entries:
                req = entries[0][1]
                now = time.time()
                state.record_result(r, RequestResult(
                    request_id=req.request_id, batch_id="b", gpu=0, text=text,
                    input_tokens=req.input_tokens, generated_tokens=2,
                    finish_reason=finish_reason,
                    error="boom" if finish_reason == "error" else None,
                    started_at=now, finished_at=now))
                return
            time.sleep(0.02)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_chat_completion_waits_for_the_answer(client: TestClient,
                                              redis_client: redis.Redis) -> None:
    worker = complete_next(redis_client, "Paris.")
    resp = client.post("/v1/chat/completions", json={
        "model": "qa", "max_tokens": 8, "user": "alice",
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": "Capital of France?"}]})
    worker.join(5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert body["usage"]["completion_tokens"] == 2 and body["model"] == "qa"
    ((_, queued),) = streams.read_range(redis_client, streams.INCOMING)
    assert (queued.app_id, queued.user_id, queued.instruction) == ("qa", "alice",
                                                                   "Answer briefly.")


def test_chat_completion_errors(client: TestClient, redis_client: redis.Redis) -> None:
    resp = client.post("/v1/chat/completions", json={
        "model": "qa", "messages": [{"role": "system", "content": "x"}]})
    assert resp.status_code == 422 and resp.json()["message"].startswith("messages")
    worker = complete_next(redis_client, "", finish_reason="error")
    resp = client.post("/v1/chat/completions", json={
        "model": "qa", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    worker.join(5)
    assert resp.status_code == 502 and "failed: boom" in resp.json()["message"]


def test_delete_cancels_a_request_not_yet_final_and_leaves_a_final_one(
        client: TestClient, redis_client: redis.Redis) -> None:
    body = {"app_id": "qa", "input": "What is 2+2?", "max_tokens": 8}
    rid = client.post("/v1/requests", json=body).json()["request_id"]
    resp = client.delete(f"/v1/requests/{rid}")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    assert client.get(f"/v1/requests/{rid}").json()["status"] == "cancelled"
    assert client.delete(f"/v1/requests/{rid}").status_code == 200  # idempotent
    assert state.open_requests(redis_client) == 0

    done = client.post("/v1/requests", json=body).json()["request_id"]
    now = time.time()
    state.record_result(redis_client, RequestResult(
        request_id=done, batch_id="b", gpu=0, text="4", input_tokens=5, generated_tokens=1,
        finish_reason="stop", started_at=now, finished_at=now))
    resp = client.delete(f"/v1/requests/{done}")
    assert resp.status_code == 409 and "already completed" in resp.json()["message"]
    assert client.delete("/v1/requests/req-nobody").status_code == 404
