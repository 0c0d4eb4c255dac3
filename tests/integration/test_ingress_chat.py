"""The OpenAI-compatible endpoint against real Redis and the real tokenizer, with a stand-in for
the rest of the stack that completes each queued request."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from shared import state, streams
from shared.schemas import FinishReason, RequestResult, TextDelta
from shared.settings import IngressSettings

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256)
    with TestClient(create_app(settings)) as c:
        yield c


def complete_next(r: redis.Redis, text: str, finish_reason: FinishReason = "stop",
                  pieces: Sequence[tuple[int, int, str]] = ()) -> threading.Thread:
    """Completes the next queued request with `text`, after writing `pieces` (run, offset,
    text) to its text stream as a worker streaming it would."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            entries = streams.read_range(r, streams.INCOMING)
            if entries:
                req = entries[0][1]
                if pieces:
                    pipe = r.pipeline()
                    streams.append_text(pipe, req.request_id, [
                        TextDelta(run=run_, offset=offset, text=piece, at=time.time())
                        for run_, offset, piece in pieces])
                    pipe.execute()
                    time.sleep(0.3)  # the route forwards them before the result arrives
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
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "messages"
    worker = complete_next(redis_client, "", finish_reason="error")
    resp = client.post("/v1/chat/completions", json={
        "model": "qa", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    worker.join(5)
    assert resp.status_code == 502 and "failed: boom" in resp.json()["error"]["message"]


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


def read_events(client: TestClient, path: str, body: dict[str, object]) -> list[object]:
    """The server-sent events of a streamed answer, decoded (`[DONE]` kept as a string)."""
    import json

    with client.stream("POST", path, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


CHAT = {"model": "qa", "max_tokens": 8, "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]}


def test_a_streamed_chat_sends_the_pieces_then_the_finish_and_usage(
        client: TestClient, redis_client: redis.Redis) -> None:
    worker = complete_next(redis_client, "Paris.", pieces=[(0, 0, "Par"), (0, 3, "is.")])
    events = read_events(client, "/v1/chat/completions",
                         {**CHAT, "stream_options": {"include_usage": True}})
    worker.join(5)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    # Nothing before the first text (clients time the first token by the first chunk).
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Par"}
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [t for t in texts if t] == ["Par", "is."]  # each piece as it came, none twice
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    ((_, queued),) = streams.read_range(redis_client, streams.INCOMING)
    assert queued.stream and queued.input == "Capital of France?"


def test_a_streamed_answer_fills_a_missing_piece_from_the_result(
        client: TestClient, redis_client: redis.Redis) -> None:
    worker = complete_next(redis_client, "Paris.", pieces=[(0, 0, "Par"), (0, 4, "s.")])
    events = read_events(client, "/v1/completions",
                         {"model": "qa", "prompt": "Capital of France?", "stream": True})
    worker.join(5)
    texts = [e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"]]
    assert "".join(texts) == "Paris." and events[-1] == "[DONE]"
    assert all(e["object"] == "text_completion" for e in events if isinstance(e, dict))


def test_a_rerun_that_answers_differently_ends_the_stream_with_an_error(
        client: TestClient, redis_client: redis.Redis) -> None:
    # The first run sent "Hel" and its engine died; the rerun wrote "Bye." from the start.
    worker = complete_next(redis_client, "Bye.", pieces=[(0, 0, "Hel"), (1, 0, "Bye.")])
    events = read_events(client, "/v1/chat/completions", CHAT)
    worker.join(5)
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "rerun", events
    assert "GET /v1/requests/req-" in errors[0]["message"]


def test_a_rerun_that_replays_the_same_start_is_not_sent_twice(
        client: TestClient, redis_client: redis.Redis) -> None:
    worker = complete_next(redis_client, "Hello.",
                           pieces=[(0, 0, "Hel"), (1, 0, "He"), (1, 2, "llo.")])
    events = read_events(client, "/v1/chat/completions", CHAT)
    worker.join(5)
    texts = [e["choices"][0]["delta"].get("content") for e in events
             if isinstance(e, dict) and e.get("choices")]
    assert "".join(t for t in texts if t) == "Hello."


def test_completions_and_models(client: TestClient, redis_client: redis.Redis) -> None:
    worker = complete_next(redis_client, " blue.")
    resp = client.post("/v1/completions", json={"model": "qa", "prompt": "The sky is"})
    worker.join(5)
    body = resp.json()
    assert resp.status_code == 200 and body["object"] == "text_completion", body
    assert body["choices"][0]["text"] == " blue." and body["usage"]["completion_tokens"] == 2
    ((_, queued),) = streams.read_range(redis_client, streams.INCOMING)
    assert queued.max_tokens == 16 and queued.instruction == ""  # OpenAI's default
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
