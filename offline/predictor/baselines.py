"""Baselines the predictor is judged against, and the metrics of the comparison.

Global mean, per-app mean, per-app linear in input tokens (linear.py), the Magnus paper's own
recipe (a random forest over the same features as the xgboost model), a pairwise ranker (xgboost
trained on the order, not the length), and the noise floor (each prompt's own mean length over
resamples of the serving model: what knowing the prompt perfectly would give). Each gives a point
estimate; every upper bound is calibrated on the validation rows the same way as the model's
(`calibrate_log_offset`), so coverage compares like with like. Pure: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xgboost as xgb
from scipy.stats import kendalltau
from sklearn.ensemble import RandomForestRegressor
from sklearn.isotonic import IsotonicRegression

from services.predictor.features import F32Array, FloatArray, IntArray, fold_of
from services.predictor.linear import LengthSample, LinearLengthModel
from services.predictor.model import calibrate_log_offset, fallback_ladder


@dataclass(frozen=True)
class MeanBaseline:
    """Global mean, or per-app mean falling back to the global mean for an app never seen."""

    global_mean: float
    app_means: dict[str, float]

    @classmethod
    def fit(cls, app_ids: Sequence[str], y: FloatArray, per_app: bool) -> MeanBaseline:
        ladder = fallback_ladder([LengthSample(a, 0, int(v)) for a, v in zip(app_ids, y,
                                                                            strict=True)], 1)
        means = {a: f.mean for a, f in ladder.apps.items()} if per_app else {}
        return cls(float(np.mean(y)), means)

    def predict(self, app_ids: Sequence[str]) -> FloatArray:
        return np.array([self.app_means.get(a, self.global_mean) for a in app_ids])


@dataclass(frozen=True)
class LinearBaseline:
    model: LinearLengthModel

    @classmethod
    def fit(cls, app_ids: Sequence[str], input_tokens: IntArray, y: FloatArray,
            min_samples_per_app: int = 8) -> LinearBaseline:
        samples = [LengthSample(a, int(x), int(v))
                   for a, x, v in zip(app_ids, input_tokens, y, strict=True)]
        return cls(LinearLengthModel.fit(samples, "linear", min_samples_per_app, 1))

    def predict(self, app_ids: Sequence[str], input_tokens: IntArray) -> FloatArray:
        m = self.model
        out = []
        for a, x in zip(app_ids, input_tokens, strict=True):
            fit = m.apps.get(a)
            if fit is not None and fit.linear:
                out.append(fit.slope * float(x) + fit.intercept)
            elif fit is not None:
                out.append(fit.mean)
            else:
                out.append(m.global_mean if m.global_mean is not None else 1.0)
        return np.array(out, dtype=np.float64)


def fit_forest(x: F32Array, y: FloatArray, seed: int = 0, threads: int = 2
               ) -> RandomForestRegressor:
    """The paper's predictor: a random forest regressor on the raw length."""
    forest = RandomForestRegressor(n_estimators=200, min_samples_leaf=2, max_features=0.33,
                                   n_jobs=threads, random_state=seed)
    forest.fit(x, y)
    return forest


@dataclass(frozen=True)
class PairwiseRanker:
    """xgboost trained for the order, not the length: `rank:pairwise` on the same features, with
    query groups of about `group` training rows drawn at random across apps (the mix a scheduler
    sorts), labels the log length in steps of 1/8 (about 13%). Its scores become lengths through
    an isotonic (monotone) map fitted on the training rows, so ranking is untouched and MAE can
    be compared."""

    booster: xgb.Booster
    score_to_log: IsotonicRegression

    @classmethod
    def fit(cls, x: F32Array, y: FloatArray, request_ids: Sequence[str], hx: F32Array,
            hy: FloatArray, group: int = 64, threads: int = 2, seed: int = 0) -> PairwiseRanker:
        n_groups = max(1, len(y) // group)
        qid = np.array([fold_of(f"{r}:rank", n_groups) for r in request_ids], dtype=np.int64)
        order = np.argsort(qid, kind="stable")
        label = np.round(np.log1p(np.asarray(y, np.float64)) * 8).astype(np.int64)
        dtrain = xgb.DMatrix(x[order], label=label[order], qid=qid[order])
        hlabel = np.round(np.log1p(np.asarray(hy, np.float64)) * 8).astype(np.int64)
        dhold = xgb.DMatrix(hx, label=hlabel, qid=np.zeros(len(hy), np.int64))
        params = {"objective": "rank:pairwise", "eval_metric": "ndcg", "eta": 0.05,
                  "max_depth": 6, "min_child_weight": 3.0, "subsample": 0.8,
                  "colsample_bytree": 0.8, "tree_method": "hist", "nthread": threads,
                  "seed": seed, "lambdarank_pair_method": "mean",
                  "lambdarank_num_pair_per_sample": 8, "ndcg_exp_gain": False}
        booster = xgb.train(params, dtrain, 600, evals=[(dhold, "hold")],
                            early_stopping_rounds=50, verbose_eval=False)
        booster = booster[: booster.best_iteration + 1]
        iso = IsotonicRegression(out_of_bounds="clip")
        iso.fit(np.asarray(booster.inplace_predict(x), np.float64), np.log1p(y))
        return cls(booster, iso)

    def predict(self, x: F32Array) -> FloatArray:
        scores = np.asarray(self.booster.inplace_predict(x), np.float64)
        return np.asarray(np.expm1(self.score_to_log.predict(scores)), np.float64)


def noise_floor(resamples: Mapping[str, Sequence[int]], request_ids: Sequence[str],
                statistic: str = "mean") -> tuple[npt.NDArray[np.bool_], FloatArray]:
    """Rows that were resampled, and for them the mean (or median: the MAE-optimal answer) of
    the resampled lengths: the prediction of a model that knew each prompt's length distribution
    (estimated from the resamples), scored on the profile's own independent sample."""
    reduce = np.median if statistic == "median" else np.mean
    has = np.array([r in resamples and len(resamples[r]) > 0 for r in request_ids], dtype=bool)
    pred = np.array([float(reduce(resamples[r])) for r, h in zip(request_ids, has, strict=True)
                     if h], dtype=np.float64)
    return has, pred


def app_mean_oracle(app_ids: Sequence[str], y: FloatArray) -> FloatArray:
    """Each row's app's true mean length over the rows scored (it sees the answers): the best
    any predictor that knows only the app can rank the mix; it ranks nothing within apps."""
    ids = np.asarray(app_ids, dtype=np.str_)
    out = np.empty(len(ids), dtype=np.float64)
    for app in np.unique(ids):
        sel = ids == app
        out[sel] = float(np.mean(y[sel]))
    return out


def calibrated_upper(point: FloatArray, val_point: FloatArray, val_y: FloatArray,
                     quantile: float = 0.9) -> FloatArray:
    offset = calibrate_log_offset(val_y, val_point, quantile)
    return np.asarray(np.expm1(np.log1p(np.maximum(point, 0.0)) + offset), dtype=np.float64)


# --- metrics -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metrics:
    n: int
    mae: float
    median_ae: float
    kendall_tau: float
    acc50: float
    p90_coverage: float
    mean_pred_capped: float  # mean point estimate where the output ran to the cap
    mean_pred_uncapped: float
    cap_share: float
    # Kendall tau within each app (apps with >= WITHIN_MIN_ROWS rows), averaged weighted by rows;
    # an app whose predictions are all equal ranks nothing and counts 0.
    kendall_tau_within: float = float("nan")
    # p90 coverage on the rows of long-output apps (see `long_output_rows`).
    p90_coverage_long: float = float("nan")
    n_long: int = 0


WITHIN_MIN_ROWS = 4
# An app is "long-output" when its true mean length in the evaluated split is at least this.
LONG_APP_MEAN_TOKENS = 200.0


def within_app_tau(app_ids: Sequence[str], point: FloatArray, y: FloatArray,
                   min_rows: int = WITHIN_MIN_ROWS) -> float:
    ids = np.asarray(app_ids, dtype=np.str_)
    taus, weights = [], []
    for app in np.unique(ids):
        sel = ids == app
        if sel.sum() < min_rows:
            continue
        tau = 0.0
        if np.ptp(point[sel]) > 0 and np.ptp(y[sel]) > 0:
            tau = float(kendalltau(point[sel], y[sel]).statistic)
        taus.append(0.0 if tau != tau else tau)
        weights.append(int(sel.sum()))
    return float(np.average(taus, weights=weights)) if taus else float("nan")


def long_output_rows(app_ids: Sequence[str], y: FloatArray,
                     threshold: float = LONG_APP_MEAN_TOKENS) -> npt.NDArray[np.bool_]:
    ids = np.asarray(app_ids, dtype=np.str_)
    out = np.zeros(len(ids), dtype=bool)
    for app in np.unique(ids):
        sel = ids == app
        out[sel] = float(np.mean(y[sel])) >= threshold
    return out


def clamp_arrays(point: FloatArray, upper: FloatArray, max_tokens: IntArray
                 ) -> tuple[FloatArray, FloatArray]:
    """The serving clamp, vectorised: point and upper in [1, max_tokens], upper >= point."""
    cap = np.maximum(np.asarray(max_tokens, np.float64), 1.0)
    p = np.clip(np.round(np.nan_to_num(point, nan=1.0)), 1.0, cap).astype(np.float64)
    u = np.clip(np.round(np.nan_to_num(upper, nan=np.inf, posinf=np.inf)), p, cap)
    return p, u.astype(np.float64)


def metrics(y: FloatArray, point: FloatArray, upper: FloatArray,
            capped: npt.NDArray[np.bool_], app_ids: Sequence[str] | None = None,
            long_rows: npt.NDArray[np.bool_] | None = None) -> Metrics:
    n = len(y)
    if n == 0:
        nan = float("nan")
        return Metrics(0, nan, nan, nan, nan, nan, nan, nan, nan)
    err = np.abs(point - y)
    tau = float(kendalltau(point, y).statistic) if n > 1 and np.ptp(point) > 0 else float("nan")
    cap = np.asarray(capped, bool)
    return Metrics(
        n=n, mae=float(err.mean()), median_ae=float(np.median(err)), kendall_tau=tau,
        acc50=float(np.mean(err <= 50)), p90_coverage=float(np.mean(y <= upper)),
        mean_pred_capped=float(point[cap].mean()) if cap.any() else float("nan"),
        mean_pred_uncapped=float(point[~cap].mean()) if (~cap).any() else float("nan"),
        cap_share=float(cap.mean()),
        kendall_tau_within=within_app_tau(app_ids, point, y) if app_ids is not None
        else float("nan"),
        p90_coverage_long=float(np.mean(y[long_rows] <= upper[long_rows]))
        if long_rows is not None and long_rows.any() else float("nan"),
        n_long=int(long_rows.sum()) if long_rows is not None else 0,
    )
