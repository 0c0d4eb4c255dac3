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
from shared import keys, state, streams
from shared.schemas import FinishReason, RequestResult, TextDelta
from shared.settings import IngressSettings

pytestmark = pytest.mark.integration


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256)
    with TestClient(create_app(settings)) as c:
        yield c


def complete_next(r: redis.Redis, text: str, finish_reason: FinishReason = "stop",
                  pieces: Sequence[tuple[int, int, str]] = (),
                  until: threading.Event | None = None) -> threading.Thread:
    """Completes the next queued request with `text`, after writing `pieces` (run, offset,
    text) to its text stream as a worker streaming it would. Gives up when `until` is set (a
    test whose request was refused: the thread must not answer the next test's)."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (until and until.is_set()):
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
    # No max_tokens: the room the prompt leaves in the 256-token context (vLLM's default, not
    # OpenAI's legacy 16).
    assert queued.max_tokens == 256 - queued.input_tokens and queued.instruction == ""
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


@pytest.fixture()
def quick_client(redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    """A chat that nothing answers gives up within a second (a 504, not a hang)."""
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               chat_timeout_s=1.0)
    with TestClient(create_app(settings)) as c:
        yield c


PLAIN_CHAT = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
COMPLETION = {"model": "qa", "prompt": "The sky is", "max_tokens": 8}


@pytest.mark.parametrize(("path", "patch", "param"), [
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 5}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"seed": 7}, "seed"),
    ("/v1/chat/completions", {"stop": "\n"}, "stop"),
    ("/v1/chat/completions", {"stop": ["END", "STOP"]}, "stop"),
    ("/v1/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/chat/completions", {"presence_penalty": -1}, "presence_penalty"),
    ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("/v1/chat/completions", {"n": 2}, "n"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"service_tier": "priority"}, "service_tier"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"suffix": " and so on."}, "suffix"),
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/completions", {"n": 2}, "n"),
    ("/v1/completions", {"seed": 1}, "seed"),
    ("/v1/completions", {"stop": ["."]}, "stop"),
])
def test_an_openai_field_asking_for_what_is_not_served_is_a_422_naming_it(
        quick_client: TestClient, redis_client: redis.Redis, path: str,
        patch: dict[str, object], param: str) -> None:
    base = PLAIN_CHAT if path == "/v1/chat/completions" else COMPLETION
    resp = quick_client.post(path, json={**base, **patch})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/chat/completions", '"temperature": NaN', "temperature"),
    ("/v1/chat/completions", '"top_p": Infinity', "top_p"),
    ("/v1/chat/completions", '"frequency_penalty": NaN', "frequency_penalty"),
    ("/v1/chat/completions", '"presence_penalty": -Infinity', "presence_penalty"),
    ("/v1/chat/completions", '"frequency_penalty": 2.5', "frequency_penalty"),
    ("/v1/chat/completions", '"logit_bias": {"50256": NaN}', "logit_bias"),
    ("/v1/chat/completions", '"logit_bias": {"50256": 101}', "logit_bias"),
    ("/v1/chat/completions", '"logit_bias": {"word": 1}', "logit_bias"),
    ("/v1/chat/completions", '"max_completion_tokens": 1e400', "max_completion_tokens"),
    ("/v1/chat/completions", '"top_logprobs": 21', "top_logprobs"),
    ("/v1/chat/completions", '"seed": NaN', "seed"),
    ("/v1/chat/completions", '"seed": "abc"', "seed"),
    ("/v1/chat/completions", '"stop": ["a", "b", "c", "d", "e"]', "stop"),
    ("/v1/chat/completions", '"logprobs": "sometimes"', "logprobs"),
    ("/v1/chat/completions", '"service_tier": "fastest"', "service_tier"),
    ("/v1/chat/completions", '"response_format": {"type": "xml"}', "response_format"),
    ("/v1/chat/completions", '"metadata": {"k": 1}', "metadata"),
    ("/v1/chat/completions", '"store": "maybe"', "store"),
    ("/v1/chat/completions", '"n": 0', "n"),
    ("/v1/completions", '"best_of": 0', "best_of"),
    ("/v1/completions", '"logprobs": 6', "logprobs"),
    ("/v1/completions", '"echo": "sometimes"', "echo"),
    ("/v1/completions", '"presence_penalty": NaN', "presence_penalty"),
])
def test_an_openai_field_out_of_range_or_not_finite_is_a_422_naming_it(
        quick_client: TestClient, redis_client: redis.Redis, path: str, raw: str,
        param: str) -> None:
    start = ('{"model": "qa", "messages": [{"role": "user", "content": "hi"}]'
             if path == "/v1/chat/completions" else '{"model": "qa", "prompt": "The sky is"')
    resp = quick_client.post(path, content=f"{start}, {raw}}}".encode(),
                             headers={"content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert (error["param"] or "").split(".")[0] == param, error
    assert redis_client.dbsize() == 0


def test_openai_fields_that_change_nothing_are_accepted_and_unknown_ones_ignored(
        client: TestClient, redis_client: redis.Redis) -> None:
    harmless = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                "logprobs": False, "top_logprobs": 0, "response_format": {"type": "text"},
                "tool_choice": "none", "parallel_tool_calls": True, "store": False,
                "metadata": {"team": "search"}, "service_tier": "auto", "stop": [],
                "modalities": ["text"], "prompt_cache_key": "k1", "safety_identifier": "u-1",
                "stream_options": {"include_usage": False}, "n": 1,
                "prediction": {"type": "content", "content": "Paris"},
                "top_k": 5}  # vLLM's, not OpenAI's: ignored, as vLLM's server ignores unknowns
    status, text = answered(client, redis_client, "/v1/chat/completions",
                            {**PLAIN_CHAT, **harmless})
    assert status == 200, text
    redis_client.delete(keys.STREAM_INCOMING)  # complete_next answers the stream's first entry
    status, text = answered(client, redis_client, "/v1/completions", {
        **COMPLETION, "echo": False, "best_of": 1, "suffix": "", "logprobs": None, "user": "al"})
    assert status == 200, text


def answered(client: TestClient, r: redis.Redis, path: str, body: dict[str, object]
             ) -> tuple[int, str]:
    """The status and text of the answer to `body`, its request (if queued) completed by a
    stand-in worker."""
    done = threading.Event()
    worker = complete_next(r, "An answer.", until=done)
    try:
        resp = client.post(path, json=body)
        return resp.status_code, resp.text
    finally:
        done.set()
        worker.join(5)


def test_a_chat_without_max_tokens_gets_the_room_its_prompt_leaves(
        client: TestClient, redis_client: redis.Redis) -> None:
    """A ~200-token prompt in a 256-token context: a fixed default (256) refused it with a
    422; it gets the room left, as vLLM's server gives it."""
    status, text = answered(client, redis_client, "/v1/chat/completions", {
        "model": "qa", "messages": [{"role": "user", "content": "word " * 200}]})
    assert status == 200, text
    ((_, queued),) = streams.read_range(redis_client, streams.INCOMING)
    assert queued.input_tokens > 128 and queued.max_tokens == 256 - queued.input_tokens
    # max_completion_tokens (or max_tokens) sent: that, checked against the context.
    resp = client.post("/v1/chat/completions", json={
        "model": "qa", "max_completion_tokens": 100,
        "messages": [{"role": "user", "content": "word " * 200}]})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "max_tokens"
