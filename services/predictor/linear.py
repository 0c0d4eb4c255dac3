"""The first length predictor: per-app linear regression on input tokens, with fallbacks.

Pure: fitted from observed (app, input tokens, generated tokens) samples, no I/O. Cold start walks
down a ladder and reports which rung answered: per-app linear fit -> per-app mean -> global mean ->
configured default.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from shared.schemas import PredictorSource

# Upper bound = point estimate + this quantile of the absolute residuals, for memory admission.
UPPER_QUANTILE = 0.9


@dataclass(frozen=True)
class LengthSample:
    app_id: str
    input_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class AppFit:
    n: int
    mean: float
    slope: float
    intercept: float
    residual_upper: float
    linear: bool


@dataclass(frozen=True)
class LinearLengthModel:
    version: str
    apps: dict[str, AppFit]
    global_mean: float | None
    global_residual_upper: float
    default_tokens: int

    @classmethod
    def fit(cls, samples: Iterable[LengthSample], version: str, min_samples_per_app: int,
            default_tokens: int) -> LinearLengthModel:
        by_app: dict[str, list[LengthSample]] = defaultdict(list)
        for s in samples:
            by_app[s.app_id].append(s)
        apps: dict[str, AppFit] = {}
        all_y: list[float] = []
        for app_id, rows in by_app.items():
            x = np.array([r.input_tokens for r in rows], dtype=float)
            y = np.array([r.generated_tokens for r in rows], dtype=float)
            all_y.extend(y.tolist())
            # A line needs enough points and some spread in x; otherwise the app's mean is safer.
            linear = len(rows) >= min_samples_per_app and float(np.ptp(x)) > 0
            slope, intercept = (np.polyfit(x, y, 1) if linear else (0.0, float(y.mean())))
            residuals = np.abs(y - (slope * x + intercept))
            apps[app_id] = AppFit(
                n=len(rows), mean=float(y.mean()), slope=float(slope), intercept=float(intercept),
                residual_upper=float(np.quantile(residuals, UPPER_QUANTILE)), linear=linear,
            )
        if all_y:
            ys = np.array(all_y)
            global_mean: float | None = float(ys.mean())
            global_upper = float(np.quantile(np.abs(ys - ys.mean()), UPPER_QUANTILE))
        else:
            global_mean, global_upper = None, float(default_tokens)
        return cls(version, apps, global_mean, global_upper, default_tokens)

    def predict(self, app_id: str, input_tokens: int, max_tokens: int
                ) -> tuple[int, int, PredictorSource]:
        """(predicted tokens, upper bound, which rung answered), both clamped to [1, max_tokens]."""
        fit = self.apps.get(app_id)
        if fit is not None and fit.linear:
            point, spread, source = fit.slope * input_tokens + fit.intercept, fit.residual_upper, \
                PredictorSource.MODEL
        elif fit is not None:
            point, spread, source = fit.mean, fit.residual_upper, PredictorSource.APP_MEAN
        elif self.global_mean is not None:
            point, spread, source = self.global_mean, self.global_residual_upper, \
                PredictorSource.GLOBAL_MEAN
        else:
            point, spread, source = float(self.default_tokens), 0.0, PredictorSource.DEFAULT
        predicted = int(min(max(round(point), 1), max_tokens))
        upper = int(min(max(round(point + spread), predicted), max_tokens))
        return predicted, upper, source
