"""The engine cost model: its laws, its fit on synthetic profiles, its JSON round trip."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from bench.cost_model import (
    EngineCostModel,
    ProfilePoint,
    fit_engine_cost_model,
    load_fit,
    load_model,
    points_from_profile,
)

TRUE = EngineCostModel(step_base_s=0.021, step_per_seq_s=0.0017, step_per_context_token_s=3e-6,
                       prefill_step_s=0.015, prefill_per_token_s=4.5e-4, chunk_tokens=2048)


def synthetic_points(model: EngineCostModel, noise: float = 0.0,
                     seed: int = 0) -> list[ProfilePoint]:
    """Grid points an engine following `model` exactly would measure (times 1 +- noise)."""
    rng = random.Random(seed)

    def jitter() -> float:
        return 1 + rng.uniform(-noise, noise)

    points = []
    for length in (32, 256, 1024):
        for b in (1, 2, 4, 8, 16, 32, 64):
            if b * (length + 64) > 46_592:
                continue
            p = ProfilePoint(b, length, 64, 0.0, 0.0)
            points.append(ProfilePoint(
                b, length, 64, ttft_s=model.prefill_time(p.prefill_tokens) * jitter(),
                decode_step_s=model.step_time(b, p.mean_context_tokens) * jitter()))
    return points


def test_fit_recovers_synthetic_constants_exactly() -> None:
    fit = fit_engine_cost_model(synthetic_points(TRUE))
    m = fit.model
    for got, want in [(m.step_base_s, TRUE.step_base_s), (m.step_per_seq_s, TRUE.step_per_seq_s),
                      (m.step_per_context_token_s, TRUE.step_per_context_token_s),
                      (m.prefill_step_s, TRUE.prefill_step_s),
                      (m.prefill_per_token_s, TRUE.prefill_per_token_s)]:
        assert got == pytest.approx(want, rel=1e-6)
    assert fit.decode.r2 == pytest.approx(1.0) and fit.prefill.r2 == pytest.approx(1.0)
    assert fit.decode.mean_relative_error < 1e-6


def test_fit_with_noise_stays_close_and_reports_error() -> None:
    fit = fit_engine_cost_model(synthetic_points(TRUE, noise=0.05, seed=3))
    assert fit.model.step_per_seq_s == pytest.approx(TRUE.step_per_seq_s, rel=0.25)
    assert fit.model.prefill_per_token_s == pytest.approx(TRUE.prefill_per_token_s, rel=0.1)
    assert 0 < fit.decode.mean_relative_error < 0.05
    assert fit.decode.r2 > 0.95 and fit.prefill.r2 > 0.95


def test_fit_never_returns_negative_costs() -> None:
    # Step times that fall with batch size: an unconstrained fit would make b negative.
    points = [ProfilePoint(b, 32, 64, ttft_s=0.02 * b, decode_step_s=0.05 - 0.001 * b)
              for b in (1, 2, 4, 8, 16)]
    m = fit_engine_cost_model(points).model
    assert min(m.step_base_s, m.step_per_seq_s, m.step_per_context_token_s,
               m.prefill_step_s, m.prefill_per_token_s) >= 0


def test_laws() -> None:
    assert TRUE.step_time(8, 1000) == pytest.approx(0.021 + 8 * 0.0017 + 1000 * 3e-6)
    # 5000 tokens prefill in three chunks of <= 2048.
    assert TRUE.prefill_time(5000) == pytest.approx(3 * 0.015 + 5000 * 4.5e-4)
    assert TRUE.mixed_step_time(0, 0, 100) == pytest.approx(0.015 + 100 * 4.5e-4)
    assert TRUE.mixed_step_time(4, 400, 100) == pytest.approx(TRUE.step_time(4, 400)
                                                              + 100 * 4.5e-4)
    with pytest.raises(AssertionError):
        EngineCostModel(-1.0, 0.0, 0.0, 0.0, 0.0)


def test_profile_json_round_trip(tmp_path: Path) -> None:
    profile = {"engine": {"max_num_batched_tokens": 2048},
               "points": [{"batch_size": p.batch_size, "prompt_tokens": p.prompt_tokens,
                           "max_tokens": p.max_tokens, "ttft_s": p.ttft_s,
                           "decode_step_s": p.decode_step_s} for p in synthetic_points(TRUE)]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    assert len(points_from_profile(profile)) == len(profile["points"])
    fit = load_fit(path)
    saved = tmp_path / "model.json"
    fit.save(saved)
    again = load_model(saved)
    assert again == fit.model
    assert math.isclose(again.step_time(3, 300), fit.model.step_time(3, 300))
