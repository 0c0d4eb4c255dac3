"""Baselines the predictor is judged against, and the metrics of the comparison.

Global mean, per-app mean, per-app linear in input tokens (linear.py), and the Magnus paper's own
recipe: a random forest over the same features as the xgboost model. Each gives a point estimate;
every upper bound is calibrated on the validation rows the same way as the model's
(`calibrate_log_offset`), so coverage compares like with like. Pure: arrays in, arrays out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.stats import kendalltau
from sklearn.ensemble import RandomForestRegressor

from services.predictor.features import F32Array, FloatArray, IntArray
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


def clamp_arrays(point: FloatArray, upper: FloatArray, max_tokens: IntArray
                 ) -> tuple[FloatArray, FloatArray]:
    """The serving clamp, vectorised: point and upper in [1, max_tokens], upper >= point."""
    cap = np.maximum(np.asarray(max_tokens, np.float64), 1.0)
    p = np.clip(np.round(np.nan_to_num(point, nan=1.0)), 1.0, cap).astype(np.float64)
    u = np.clip(np.round(np.nan_to_num(upper, nan=np.inf, posinf=np.inf)), p, cap)
    return p, u.astype(np.float64)


def metrics(y: FloatArray, point: FloatArray, upper: FloatArray,
            capped: npt.NDArray[np.bool_]) -> Metrics:
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
    )
