"""profile-engine without an engine: request parsing against a fake server, the per-point
arithmetic, the grid, and a synthetic engine's profile fitted back to its constants."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import pytest

from bench.cost_model import EngineCostModel, ProfilePoint, fit_engine_cost_model
from bench.engine_profile import (
    RequestTiming,
    grid,
    median_point,
    point_run,
    prompt_ids,
    timed_completion,
)

SYNTHETIC = EngineCostModel(step_base_s=0.03, step_per_seq_s=0.002, step_per_context_token_s=2e-6,
                            prefill_step_s=0.02, prefill_per_token_s=5e-4)


def test_timed_completion_sends_an_exact_prompt_and_reads_the_stream() -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        chunks: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "text": "" if i == 0 else "x"}]} for i in range(4)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}})
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body)

    async def go() -> RequestTiming:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler),
                                     base_url="http://engine") as http:
            return await timed_completion(http, "m", [11, 12, 13, 14, 15], 4)

    timing = asyncio.run(go())
    assert seen["prompt"] == [11, 12, 13, 14, 15] and seen["ignore_eos"] is True
    assert seen["max_tokens"] == 4 and seen["temperature"] == 0.0 and seen["stream"] is True
    assert timing.completion_tokens == 4
    assert timing.sent_at <= timing.first_token_at <= timing.finished_at


def test_prompts_have_the_requested_length_and_differ() -> None:
    rng = random.Random(0)
    a, b = prompt_ids(rng, 256), prompt_ids(rng, 256)
    assert len(a) == len(b) == 256 and a != b


def test_point_run_arithmetic() -> None:
    timings = [RequestTiming(0.0, 0.5, 0.5 + 63 * 0.04, 64),
               RequestTiming(0.0, 0.7, 0.7 + 63 * 0.06, 64)]
    run = point_run(timings, 0.0, 64)
    assert run.ttft_s == pytest.approx(0.7)
    assert run.mean_ttft_s == pytest.approx(0.6)
    assert run.decode_step_s == pytest.approx(0.05)
    entry = median_point(2, 32, 64, [run, run])
    assert entry["decode_step_s"] == pytest.approx(0.05) and len(entry["runs"]) == 2
    assert entry["decode_step_min_s"] == pytest.approx(0.05)


def test_grid_skips_points_over_the_kv_cache() -> None:
    keep, skipped = grid([1, 32, 64], [32, 1024], 64, kv_tokens=46_592)
    assert (64, 1024) in skipped and (32, 1024) in keep and (64, 32) in keep
    assert len(keep) + len(skipped) == 6


def synthetic_engine_timings(batch: int, length: int, steps: int) -> list[RequestTiming]:
    """What a client would see from an engine that follows SYNTHETIC exactly."""
    prefill = SYNTHETIC.prefill_time(batch * length)
    decode = sum(SYNTHETIC.step_time(batch, batch * (length + k)) for k in range(1, steps))
    return [RequestTiming(0.0, prefill, prefill + decode, steps) for _ in range(batch)]


def test_profile_of_a_synthetic_engine_fits_back_to_its_constants() -> None:
    keep, _ = grid([1, 2, 4, 8, 16, 32, 64], [32, 256, 1024], 64, kv_tokens=46_592)
    points = []
    for b, length in keep:
        entry = median_point(b, length, 64, [point_run(synthetic_engine_timings(b, length, 64),
                                                       0.0, 64)])
        points.append(ProfilePoint(b, length, 64, entry["ttft_s"], entry["decode_step_s"]))
    fit = fit_engine_cost_model(points)
    assert fit.model.step_per_seq_s == pytest.approx(SYNTHETIC.step_per_seq_s, rel=1e-3)
    assert fit.model.step_per_context_token_s == pytest.approx(
        SYNTHETIC.step_per_context_token_s, rel=1e-3)
    assert fit.model.prefill_per_token_s == pytest.approx(SYNTHETIC.prefill_per_token_s,
                                                          rel=1e-6)
    assert fit.decode.r2 > 0.9999 and fit.prefill.r2 > 0.9999
