"""The concurrency cap: where the engine's measured decode throughput stops growing."""

from __future__ import annotations

import pytest

from services.scheduler.capacity import DecodeCurve, saturation_concurrency, typical_context
from shared.settings import REPO_ROOT

# Throughput that doubles up to batch 8, then grows slowly (a real engine's shape).
CURVE = DecodeCurve({100: {1: 10.0, 2: 20.0, 4: 40.0, 8: 80.0, 16: 90.0, 32: 95.0, 64: 100.0},
                     1000: {1: 10.0, 2: 18.0, 4: 30.0, 8: 40.0, 16: 41.0, 32: 41.5}})


def test_cap_is_the_smallest_concurrency_reaching_the_share() -> None:
    assert saturation_concurrency(CURVE, 100, share=0.8) == 8  # 80 >= 0.8 x 100
    assert saturation_concurrency(CURVE, 100, share=0.05) == 1
    # Between measured sizes: interpolated on log2(batch), inside the bracket.
    between = saturation_concurrency(CURVE, 100, share=0.85)
    assert 8 < between < 16
    assert saturation_concurrency(CURVE, 100, share=1.0) == 64


def test_cap_grows_with_the_share_and_shrinks_with_the_context() -> None:
    shares = [0.5, 0.7, 0.9, 0.95, 0.97, 0.99, 1.0]
    caps = [saturation_concurrency(CURVE, 100, s) for s in shares]
    assert caps == sorted(caps)
    # A long context saturates the engine at a smaller batch.
    assert saturation_concurrency(CURVE, 1000, 0.95) < saturation_concurrency(CURVE, 100, 0.95)


def test_context_between_measured_ones_is_interpolated() -> None:
    row = CURVE.at_context(550)
    assert set(row) == {1, 2, 4, 8, 16, 32}  # only the batch sizes both contexts measured
    assert row[8] == pytest.approx(60.0)
    assert CURVE.at_context(10) == CURVE.points[100]  # outside the range: the nearest
    assert CURVE.at_context(5000) == CURVE.points[1000]


def test_typical_context_is_the_median_prompt_plus_half_the_run() -> None:
    assert typical_context([100, 200, 300], [50, 50, 1000], default=7) == 225.0
    assert typical_context([], [], default=7) == 7.0


def test_the_committed_cpu_profile_gives_a_cap_below_its_largest_batch() -> None:
    """The default cap (share 0.97) holds requests back on this machine's engine: otherwise
    continuous Magnus would have nothing to order."""
    curve = DecodeCurve.load(REPO_ROOT / "results" / "engine_profile_cpu.json")
    cap = saturation_concurrency(curve, 250, share=0.97)
    assert 8 <= cap < max(max(row) for row in curve.points.values())


def test_a_serving_curve_is_one_context_of_measured_concurrencies() -> None:
    serving = {"context_tokens": 123.6, "points": [
        {"concurrency": 8, "output_tokens_per_s": 120.0},
        {"concurrency": 16, "output_tokens_per_s": 170.0},
        {"concurrency": 32, "output_tokens_per_s": 198.0},
        {"concurrency": 64, "output_tokens_per_s": 200.0},
    ]}
    curve = DecodeCurve.from_serving(serving)
    assert dict(curve.points) == {124: {8: 120.0, 16: 170.0, 32: 198.0, 64: 200.0}}
    # the same row at any context: the curve was measured on the workload's own mix
    assert curve.at_context(40) == curve.at_context(900)
    # 97% of 200 = 194 lies between 16 (170) and 32 (198): 24/28 of the way on log2
    assert 16 < saturation_concurrency(curve, 124, 0.97) <= 32
    assert 8 < saturation_concurrency(curve, 124, 0.8) < 16  # 160: between 8 (120) and 16
