"""Baselines and metrics on tiny synthetic data; store helpers of the predictor service."""

from __future__ import annotations

import json

import numpy as np
import pytest

from offline.predictor.baselines import (
    LinearBaseline,
    MeanBaseline,
    calibrated_upper,
    clamp_arrays,
    fit_forest,
    metrics,
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
