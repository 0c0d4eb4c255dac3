"""The learned predictor on tiny synthetic data: fit, clamping, the cold-start ladder,
continuations, calibration and the artifact round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.predictor.features import EmbedderConfig
from services.predictor.linear import LengthSample
from services.predictor.model import (
    FittedModel,
    LengthPredictor,
    ModelConfig,
    calibrate_bins,
    calibrate_log_offset,
    clamp,
    fallback_ladder,
    load_artifact,
    remaining_given,
    save_artifact,
)
from services.predictor.pipeline import Caches, embed_examples, fit_projections, labeled
from services.predictor.rows import PredictRow
from shared.schemas import PredictorSource
from tests.conftest import FakeEmbedder
from tests.factories import examples

TINY = ModelConfig(app_dims=4, user_dims=4, n_estimators=60, max_depth=3, threads=1,
                   early_stopping_rounds=10)


def fit_tiny(config: ModelConfig = TINY) -> FittedModel:
    from services.predictor.model import fit_model

    emb, caches = FakeEmbedder(), Caches.new()
    train, val = examples(40, seed=0), examples(10, seed=1, prefix="v")
    app_raw, user_raw = embed_examples(train, emb, caches)
    app_proj, user_proj = fit_projections(train, app_raw, user_raw, config)
    tr = labeled(train, app_raw, user_raw, app_proj, user_proj)
    va = labeled(val, *embed_examples(val, emb, caches), app_proj, user_proj)
    return fit_model(tr, va, app_proj, user_proj, emb.config, config)


@pytest.fixture(scope="module")
def tiny_model() -> FittedModel:
    return fit_tiny()


def row(app: str, max_tokens: int = 512, so_far: int = 0, text: str = "x") -> PredictRow:
    return PredictRow(app, f"{app}:u0", f"do {app}", text, 50, max_tokens, so_far)


def test_model_learns_app_lengths(tiny_model: FittedModel) -> None:
    p = LengthPredictor(tiny_model, fallback_ladder([], 128), FakeEmbedder())
    (long_p, long_u, src), (short_p, short_u, _) = p.predict_batch([row("long"), row("short")])
    assert src is PredictorSource.MODEL
    assert 200 <= long_p <= 400 and 10 <= short_p <= 40
    assert long_u >= long_p and short_u >= short_p
    assert p.version == tiny_model.version and tiny_model.version.startswith("xgb-n80-")


def test_version_is_deterministic() -> None:
    assert fit_tiny().version == fit_tiny().version


def test_outputs_clamped_to_max_tokens(tiny_model: FittedModel) -> None:
    p = LengthPredictor(tiny_model, fallback_ladder([], 128), FakeEmbedder())
    for pred, upper, _ in p.predict_batch([row("long", max_tokens=5), row("short", 1)]):
        assert 1 <= pred <= upper
    assert p.predict_batch([row("long", max_tokens=5)])[0][:2] == (5, 5)
    assert p.predict_batch([]) == []


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True,
       allow_infinity=True), st.integers(-5, 5000))
def test_clamp_property(point: float, upper: float, max_tokens: int) -> None:
    p, u = clamp(point, upper, max_tokens)
    assert 1 <= p <= u <= max(1, max_tokens)


def test_cold_start_ladder() -> None:
    empty = LengthPredictor(None, fallback_ladder([], 77))
    assert empty.predict_batch([row("a")]) == [(77, 77, PredictorSource.DEFAULT)]
    assert empty.version == "ladder-n0"
    samples = [LengthSample("a", 10, 100), LengthSample("a", 20, 200), LengthSample("b", 5, 30)]
    ladder = LengthPredictor(None, fallback_ladder(samples, 77))
    (pa, ua, sa), (pc, _, sc) = ladder.predict_batch([row("a"), row("c")])
    assert (pa, sa) == (150, PredictorSource.APP_MEAN) and ua >= pa
    assert (pc, sc) == (110, PredictorSource.GLOBAL_MEAN)
    assert ladder.predict_batch([row("a", max_tokens=40)])[0][:2] == (40, 40)
    assert ladder.version == "ladder-n3"


def test_model_needs_matching_embedder(tiny_model: FittedModel) -> None:
    with pytest.raises(ValueError):
        LengthPredictor(tiny_model, fallback_ladder([], 1))
    other = FakeEmbedder(EmbedderConfig(max_seq_length=7))
    with pytest.raises(ValueError):
        LengthPredictor(tiny_model, fallback_ladder([], 1), other)


def test_continuation_predicts_the_remaining_length(tiny_model: FittedModel) -> None:
    p = LengthPredictor(tiny_model, fallback_ladder([], 128), FakeEmbedder())
    total = p.predict_batch([row("long")])[0][0]
    rest, rest_upper, _ = p.predict_batch([row("long", so_far=total + 50)])[0]
    assert 1 <= rest <= rest_upper <= 512 - (total + 50)
    # Nearly all of max_tokens already generated: at most what is left.
    assert p.predict_batch([row("long", so_far=510)])[0][:2] == (2, 2)


def test_remaining_grows_with_what_was_already_generated() -> None:
    a, _ = remaining_given(100, 250, 120)
    b, _ = remaining_given(100, 250, 400)
    assert 1 <= a < b
    far_p, far_u = remaining_given(10, 11, 10_000)  # deep in the tail: finite and positive
    assert 1 <= far_p <= far_u < float("inf")


def test_calibration_hits_the_quantile() -> None:
    rng = np.random.default_rng(3)
    y = rng.lognormal(4, 1, 2000)
    raw_upper = np.full(2000, 50.0)  # a bad raw bound: about half of y above it
    offset = calibrate_log_offset(y[:1000], raw_upper[:1000], 0.9)
    upper = np.expm1(np.log1p(raw_upper[1000:]) + offset)
    assert 0.86 <= np.mean(y[1000:] <= upper) <= 0.94
    assert calibrate_log_offset(np.array([]), np.array([]), 0.9) == 0.0


def test_per_bin_calibration_covers_long_predictions_as_often_as_short_ones() -> None:
    # Spread grows with the point estimate: one shift for all rows over-covers the short ones
    # and under-covers the long ones; one shift per bin of the point estimate covers each.
    rng = np.random.default_rng(5)
    point = rng.uniform(10, 400, 4000)
    y = np.expm1(np.log1p(point) + rng.normal(0, 1, 4000) * (point / 200))
    config = ModelConfig(calibration_bins=5)
    edges, offsets = calibrate_bins(point[:2000], point[:2000], y[:2000], config)
    assert len(edges) == 4 and len(offsets) == 5 and list(offsets) == sorted(offsets)
    test_p, test_y = point[2000:], y[2000:]
    one = calibrate_log_offset(y[:2000], point[:2000], 0.9)
    binned = np.asarray(offsets)[np.searchsorted(edges, test_p, side="right")]
    longest = test_p >= edges[-1]
    assert np.mean(test_y[longest] <= np.expm1(np.log1p(test_p[longest]) + one)) < 0.85
    assert 0.85 <= np.mean(test_y[longest] <= np.expm1(np.log1p(test_p[longest])
                                                      + binned[longest])) <= 0.95
    # Too few held-out rows for every bin: one shift, as before.
    assert calibrate_bins(point[:100], point[:100], y[:100], config) == ((), ())


def test_holdout_coverage_recorded(tiny_model: FittedModel) -> None:
    assert 0.85 <= tiny_model.holdout_coverage <= 1.0


def test_artifact_round_trip(tiny_model: FittedModel, tmp_path: Path) -> None:
    path = save_artifact(tiny_model, tmp_path / "m" / "predictor.npz")
    loaded = load_artifact(path)
    assert loaded.version == tiny_model.version
    assert loaded.config == tiny_model.config and loaded.embedder == tiny_model.embedder
    rows = [row("long"), row("short"), row("unseen-app", text="hello")]
    a = LengthPredictor(tiny_model, fallback_ladder([], 1), FakeEmbedder()).predict_batch(rows)
    b = LengthPredictor(loaded, fallback_ladder([], 1), FakeEmbedder()).predict_batch(rows)
    assert a == b
    assert len(loaded.base_train) == len(tiny_model.base_train)
    np.testing.assert_array_equal(loaded.base_train.generated, tiny_model.base_train.generated)
    assert list(loaded.app_history.groups) == list(tiny_model.app_history.groups)


def test_artifact_refuses_other_formats(tiny_model: FittedModel, tmp_path: Path) -> None:
    import json

    path = save_artifact(tiny_model, tmp_path / "p.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format"] = 999
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError):
        load_artifact(tmp_path / "bad.npz")


def test_absolute_objective_and_user_history_fit() -> None:
    m = fit_tiny(replace(TINY, objective="absolute", user_history=True))
    assert m.user_history is not None
    p = LengthPredictor(m, fallback_ladder([], 1), FakeEmbedder())
    (long_p, _, _), (short_p, _, _) = p.predict_batch([row("long"), row("short")])
    assert long_p > 3 * short_p


def test_a_continuation_deep_in_the_tail_still_gets_a_run_of_half_its_tokens_so_far() -> None:
    # A narrow prediction (median 10, p90 11) outrun by far: without the floor, 1-token runs.
    for so_far in (40, 300, 10_000):
        _, upper = remaining_given(10, 11, so_far)
        assert upper >= so_far / 2
    # Runs needed to reach 512 tokens from a first run of 11: geometric, not one per token.
    generated, runs = 11, 1
    while generated < 512:
        generated += int(remaining_given(10, 11, generated)[1])
        runs += 1
    assert runs <= 12


def test_an_artifact_from_before_the_embedder_window_embeds_by_the_head(
        tiny_model: FittedModel, tmp_path: Path) -> None:
    import json

    path = save_artifact(tiny_model, tmp_path / "p.npz")
    assert load_artifact(path).embedder == tiny_model.embedder
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    del meta["embedder"]["window"]
    del meta["calibration_edges"], meta["calibration_offsets"]
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **arrays)
    # It was trained on inputs cut to their head: serving must cut them the same way; and it
    # was calibrated with one shift for every row.
    old = load_artifact(tmp_path / "old.npz")
    assert old.embedder.window == "head"
    assert old.calibration_edges == () and old.calibration_offsets == ()
