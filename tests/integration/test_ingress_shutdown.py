"""Ingress shutting down (SIGTERM to its process, as the launcher, compose and Kubernetes stop
it): an open stream and a waiting chat are told that their requests go on and where their
answers will be, and the requests are not cancelled. Ingress runs as its own process, as
deployed; nothing else of the stack runs, so the requests stay queued."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from offline.launcher import free_port
from offline.model import SMOLLM2_DIR
from shared import keys, state
from shared.settings import REPO_ROOT, child_environment

pytestmark = pytest.mark.integration

GRACE_S = 3


@pytest.fixture()
def ingress(redis_url: str, redis_client: redis.Redis, tmp_path: Path
            ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    log = (tmp_path / "ingress.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ingress.app"], cwd=REPO_ROOT, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
        env=child_environment({
            "MAGNUS_REDIS_URL": redis_url, "MAGNUS_HOST": "127.0.0.1", "MAGNUS_PORT": str(port),
            "MAGNUS_MODEL_DIR": str(SMOLLM2_DIR), "MAGNUS_MAX_MODEL_LEN": "256",
            # Bounded, should a stream not be told of the shutdown: it would end at this.
            "MAGNUS_CHAT_TIMEOUT_S": "30", "MAGNUS_GRACEFUL_SHUTDOWN_S": str(GRACE_S),
            "PYTHONUNBUFFERED": "1"}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "ingress.log").read_text()
            assert time.monotonic() < deadline, "ingress did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        log.close()


def wait_queued(r: redis.Redis, count: int) -> list[str]:
    """The ids of the first `count` requests once they are queued."""
    deadline = time.monotonic() + 30
    while (n := state.open_requests(r)) < count:
        assert time.monotonic() < deadline, f"{n} requests queued"
        time.sleep(0.05)
    ids: list[str] = list(r.zrange(keys.OPEN_REQUESTS, 0, -1))
    return ids


def test_on_sigterm_open_streams_and_waiting_chats_are_told_and_not_cancelled(
        ingress: tuple[subprocess.Popen[bytes], str], redis_client: redis.Redis) -> None:
    proc, url = ingress
    chat = {"model": "qa", "max_tokens": 8,
            "messages": [{"role": "user", "content": "What is 2+2?"}]}
    waited: dict[str, httpx.Response] = {}

    def wait_for_answer() -> None:
        waited["response"] = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)

    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{url}/v1/chat/completions", json={**chat, "stream": True}) as resp:
        assert resp.status_code == 200
        streamed_id = resp.headers["x-request-id"]
        waiting = threading.Thread(target=wait_for_answer, daemon=True)
        waiting.start()
        ids = wait_queued(redis_client, 2)
        time.sleep(0.3)  # both routes in their loops
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines = [line for line in resp.iter_lines() if line]
    waiting.join(30)
    proc.wait(timeout=GRACE_S + 10)
    exited_s = time.monotonic() - stopped_at

    # The stream: an error event naming the request and where its answer will be, then [DONE].
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutdown" and error["type"] == "server_error", error
    assert streamed_id in error["message"]
    assert f"GET /v1/requests/{streamed_id}" in error["message"]
    # The waiting chat: a 503 with Retry-After saying the same.
    answer = waited["response"]
    assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
    body = answer.json()["error"]
    assert body["code"] == "shutdown" and "continues" in body["message"]
    # Neither request was cancelled: both stay open, pollable by id, for a worker to answer.
    assert set(ids) == {streamed_id, body["message"].split("request ")[1].split()[0]}
    for request_id in ids:
        assert redis_client.hget(keys.request(request_id), "status") == "queued"
    assert state.open_requests(redis_client) == 2
    assert exited_s < GRACE_S + 5, f"ingress took {exited_s:.1f} s to exit"
