"""Baselines and metrics on tiny synthetic data; store helpers of the predictor service."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offline.predictor.baselines import (
    LinearBaseline,
    MeanBaseline,
    PairwiseRanker,
    calibrated_upper,
    clamp_arrays,
    fit_forest,
    long_output_rows,
    metrics,
    noise_floor,
    within_app_tau,
)
from services.predictor.main import learnable, sample_from_store


def test_mean_baselines() -> None:
    apps = ["a", "a", "b"]
    y = np.array([10.0, 30.0, 100.0])
    per_app = MeanBaseline.fit(apps, y, per_app=True)
    glob = MeanBaseline.fit(apps, y, per_app=False)
    np.testing.assert_allclose(per_app.predict(["a", "b", "new"]), [20, 100, 140 / 3])
    np.testing.assert_allclose(glob.predict(["a", "new"]), [140 / 3, 140 / 3])


def test_linear_baseline_recovers_a_line_and_falls_back() -> None:
    x = np.arange(10, 30, dtype=np.int64)
    apps = ["lin"] * len(x) + ["few"] * 2
    y = np.concatenate([3.0 * x + 7, [50.0, 70.0]])
    base = LinearBaseline.fit(apps, np.concatenate([x, [1, 2]]), y, min_samples_per_app=8)
    pred = base.predict(["lin", "few", "unknown"], np.array([100, 5, 5], dtype=np.int64))
    assert pred[0] == pytest.approx(307)
    assert pred[1] == pytest.approx(60)  # too few rows for a line: its mean
    assert pred[2] == pytest.approx(float(np.mean(y)))  # unseen: the global mean


def test_forest_fits_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)).astype(np.float32)
    y = np.where(x[:, 0] > 0, 300.0, 20.0)
    forest = fit_forest(x, y, threads=1)
    pred = forest.predict(np.array([[2, 0, 0], [-2, 0, 0]], dtype=np.float32))
    assert pred[0] > 250 and pred[1] < 70


def test_calibrated_upper_covers() -> None:
    rng = np.random.default_rng(1)
    y = rng.lognormal(4, 0.8, 4000)
    point = np.full(4000, float(np.median(y)))
    upper = calibrated_upper(point[2000:], point[:2000], y[:2000])
    assert 0.86 <= np.mean(y[2000:] <= upper) <= 0.94


def test_metrics_by_hand() -> None:
    y = np.array([10.0, 100.0, 512.0, 40.0])
    point = np.array([20.0, 200.0, 300.0, 40.0])
    upper = np.array([30.0, 90.0, 512.0, 60.0])
    m = metrics(y, point, upper, np.array([False, False, True, False]))
    assert m.n == 4
    assert m.mae == pytest.approx((10 + 100 + 212 + 0) / 4)
    assert m.median_ae == pytest.approx(55)
    assert m.acc50 == pytest.approx(0.5)
    assert m.p90_coverage == pytest.approx(0.75)
    assert m.kendall_tau == pytest.approx(1.0)  # same order: 10 < 40 < 100 < 512
    assert m.mean_pred_capped == 300 and m.mean_pred_uncapped == pytest.approx(260 / 3)
    assert metrics(np.array([]), np.array([]), np.array([]), np.array([], bool)).n == 0


def test_clamp_arrays() -> None:
    p, u = clamp_arrays(np.array([0.2, 900.0, np.nan]), np.array([0.1, 1000.0, np.nan]),
                        np.array([512, 512, 8]))
    np.testing.assert_array_equal(p, [1, 512, 1])
    np.testing.assert_array_equal(u, [1, 512, 8])


def test_learnable_results() -> None:
    assert learnable("stop", 30, 256)
    assert learnable("length", 256, 256)  # ran to the request's own cap: that is its length
    assert not learnable("length", 100, 256)  # stopped by a scheduler cap: only a lower bound
    assert not learnable("length", 100, None)


def test_store_entries_old_and_new() -> None:
    old = sample_from_store(json.dumps({"app_id": "a", "input_tokens": 5,
                                        "generated_tokens": 9}), 3)
    assert (old.app_id, old.input_tokens, old.generated_tokens) == ("a", 5, 9)
    assert old.request_id == "store:3" and old.input == ""
    new = sample_from_store(json.dumps({
        "request_id": "r1", "app_id": "a", "user_id": "u", "instruction": "i", "input": "x",
        "input_tokens": 5, "generated_tokens": 9, "max_tokens": 64, "hit_cap": True}), 0)
    assert (new.request_id, new.instruction, new.input, new.hit_cap) == ("r1", "i", "x", True)


def test_within_app_tau_ranks_inside_apps_only() -> None:
    apps = ["a"] * 4 + ["b"] * 4 + ["c"] * 2  # c: too few rows to rank, left out
    y = np.array([1, 2, 3, 4, 10, 20, 30, 40, 5, 6], dtype=float)
    # Perfect order inside a, reversed inside b: weighted mean 0. Across the mix it is positive.
    point = np.array([1, 2, 3, 4, 40, 30, 20, 10, 6, 5], dtype=float)
    assert within_app_tau(apps, point, y) == pytest.approx(0.0)
    assert within_app_tau(apps, y, y) == pytest.approx(1.0)
    # A per-app constant (what a per-app mean gives) ranks nothing inside apps.
    const = np.array([2.5] * 4 + [25.0] * 4 + [5.5] * 2)
    assert within_app_tau(apps, const, y) == pytest.approx(0.0)
    m = metrics(y, const, const + 100, np.zeros(10, bool), apps, long_output_rows(apps, y, 20))
    assert m.kendall_tau > 0.5 and m.kendall_tau_within == pytest.approx(0.0)
    assert m.n_long == 4 and m.p90_coverage_long == 1.0


def test_long_output_rows_by_the_apps_true_mean() -> None:
    apps = ["a", "a", "b", "b"]
    y = np.array([100.0, 400.0, 150.0, 160.0])
    assert long_output_rows(apps, y, threshold=200).tolist() == [True, True, False, False]


def test_noise_floor_is_the_mean_of_the_resamples() -> None:
    has, pred = noise_floor({"r1": [10, 20, 30, 40], "r3": [5]}, ["r1", "r2", "r3"])
    assert has.tolist() == [True, False, True]
    np.testing.assert_allclose(pred, [25.0, 5.0])


def test_pairwise_ranker_learns_the_order_and_maps_it_to_lengths() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(600, 3)).astype(np.float32)
    y = np.round(np.expm1(1 + 4 * x[:, 0])).astype(float)  # length grows with feature 0
    ids = [f"r{i}" for i in range(600)]
    ranker = PairwiseRanker.fit(x[:500], y[:500], ids[:500], x[500:], y[500:], threads=1)
    pred = ranker.predict(x[500:])
    m = metrics(y[500:], pred, pred, np.zeros(100, bool))
    assert m.kendall_tau > 0.8
    # The isotonic map returns lengths on the target's scale, not raw scores.
    assert np.median(np.abs(pred - y[500:]) / y[500:]) < 0.3
