"""The learned length predictor: xgboost over input length, compressed embeddings and history.

Two boosters: a point estimate (what the scheduler sorts and batches by) and an upper quantile (p90,
what memory admission reserves), the latter calibrated on held-out rows so that about 90% of real
lengths fall under it. `LengthPredictor` wraps a fitted model (or none) with the cold-start ladder
of `linear.py` and reports which one answered.

Pure: fitting and prediction take arrays and return arrays; no I/O and no clock. The artifact
functions at the bottom are the only file access, and read only local files (npz, no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import xgboost as xgb
from scipy.special import ndtr, ndtri

from services.predictor.features import (
    STAT_NAMES,
    AppNeighbours,
    Embedder,
    EmbedderConfig,
    EmbeddingCache,
    F32Array,
    FloatArray,
    HistoryTable,
    IntArray,
    Projection,
    assemble,
    estimate_prior_strength,
    fit_history,
    fold_of,
    out_of_fold_history,
)
from services.predictor.linear import LengthSample, LinearLengthModel
from services.predictor.rows import Example, PredictRow
from shared.schemas import PredictorSource

ARTIFACT_FORMAT = 1
# Apps with fewer training rows than this stand in for unseen apps when calibrating their bound.
SMALL_APP_ROWS = 50
MIN_CALIBRATION_ROWS = 30
Objective = Literal["log-squared", "absolute"]
Prediction3 = tuple[int, int, PredictorSource]


@dataclass(frozen=True)
class ModelConfig:
    app_dims: int = 16
    user_dims: int = 32
    user_history: bool = False
    n_folds: int = 5
    # Share of apps whose training rows see no app history (as an unseen app would): teaches the
    # trees to fall back on the instruction embedding instead of the history columns.
    app_dropout: float = 0.1
    # History of the most similar known apps (by instruction embedding); 0 turns it off.
    neighbours: int = 5
    objective: Objective = "log-squared"
    n_estimators: int = 600
    learning_rate: float = 0.05
    max_depth: int = 6
    min_child_weight: float = 3.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    early_stopping_rounds: int = 50
    quantile: float = 0.9
    # The upper bound's calibration shift is fitted per bin of the point estimate (Mondrian
    # split-conformal), so long predictions, whose spread is wider, are covered as often as
    # short ones; each bin needs MIN_CALIBRATION_ROWS held-out rows, else one shift for all.
    calibration_bins: int = 5
    # One thread: beside a busy engine two OpenMP threads on two cores fit 5x slower (measured).
    threads: int = 1
    seed: int = 0


# --- training sets ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LabeledSet:
    """Rows with compressed embeddings and observed lengths: what `fit_model` consumes.

    The artifact keeps its base training rows in this form, so an online retrain adds the new rows
    without embedding the base data again (the projections stay those of the artifact)."""

    request_ids: npt.NDArray[np.str_]
    app_ids: npt.NDArray[np.str_]
    user_ids: npt.NDArray[np.str_]
    input_tokens: IntArray
    generated: FloatArray
    capped: npt.NDArray[np.bool_]
    app_emb: F32Array
    user_emb: F32Array

    def __len__(self) -> int:
        return len(self.generated)

    @classmethod
    def empty(cls, app_dims: int, user_dims: int) -> LabeledSet:
        s = np.array([], dtype=np.str_)
        return cls(s, s, s, np.zeros(0, np.int64), np.zeros(0), np.zeros(0, bool),
                   np.zeros((0, app_dims), np.float32), np.zeros((0, user_dims), np.float32))

    @classmethod
    def build(cls, examples: Sequence[Example], app_emb: F32Array, user_emb: F32Array
              ) -> LabeledSet:
        return cls(
            np.array([e.request_id for e in examples], dtype=np.str_),
            np.array([e.app_id for e in examples], dtype=np.str_),
            np.array([e.user_id for e in examples], dtype=np.str_),
            np.array([e.input_tokens for e in examples], dtype=np.int64),
            np.array([e.generated_tokens for e in examples], dtype=np.float64),
            np.array([e.hit_cap for e in examples], dtype=bool),
            np.asarray(app_emb, np.float32), np.asarray(user_emb, np.float32),
        )

    def concat(self, other: LabeledSet) -> LabeledSet:
        return LabeledSet(*(np.concatenate([a, b]) for a, b in zip(
            self._arrays(), other._arrays(), strict=True)))

    def take(self, mask: npt.NDArray[np.bool_]) -> LabeledSet:
        return LabeledSet(*(a[mask] for a in self._arrays()))

    def _arrays(self) -> tuple[Any, ...]:
        return (self.request_ids, self.app_ids, self.user_ids, self.input_tokens, self.generated,
                self.capped, self.app_emb, self.user_emb)

    def samples(self) -> list[LengthSample]:
        return [LengthSample(str(a), int(x), int(y)) for a, x, y in
                zip(self.app_ids, self.input_tokens, self.generated, strict=True)]


def holdout_mask(request_ids: Sequence[str] | npt.NDArray[np.str_], share: float) -> \
        npt.NDArray[np.bool_]:
    """A stable hashed share of rows held out (for calibration and early stopping online)."""
    buckets = np.array([fold_of(str(r), 1000) for r in request_ids], dtype=np.int64)
    return np.asarray(buckets < round(share * 1000), dtype=bool)


# --- the fitted model ------------------------------------------------------------------------

@dataclass(frozen=True)
class FittedModel:
    version: str
    config: ModelConfig
    embedder: EmbedderConfig
    app_projection: Projection
    user_projection: Projection
    app_history: HistoryTable
    user_history: HistoryTable | None
    point: xgb.Booster
    upper: xgb.Booster
    upper_log_offset: float
    base_train: LabeledSet
    base_holdout: LabeledSet
    n_train: int
    holdout_coverage: float  # share of held-out lengths under the calibrated upper bound
    app_neighbours: AppNeighbours | None = None
    # Apps without history are less predictable: their upper bound gets its own calibration.
    upper_log_offset_unseen: float = 0.0
    holdout_coverage_unseen: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)
    # Per-bin shifts for apps with history (see ModelConfig.calibration_bins): bin i holds point
    # estimates in [edges[i-1], edges[i]). Empty: `upper_log_offset` for every row.
    calibration_edges: tuple[float, ...] = ()
    calibration_offsets: tuple[float, ...] = ()

    def seen_offsets(self, point: FloatArray) -> FloatArray:
        if not self.calibration_edges:
            return np.full(len(point), self.upper_log_offset)
        bins = np.searchsorted(np.asarray(self.calibration_edges), point, side="right")
        return np.asarray(self.calibration_offsets, dtype=np.float64)[bins]

    def features(self, app_emb: F32Array, user_emb: F32Array, app_ids: Sequence[str],
                 user_ids: Sequence[str], input_tokens: IntArray) -> F32Array:
        """The serving-time matrix: history from the full training tables."""
        user_stats = None if self.user_history is None else self.user_history.lookup(user_ids)
        nb = None if self.app_neighbours is None else \
            self.app_neighbours.features(app_ids, app_emb, self.config.neighbours)
        return assemble(input_tokens, self.app_history.lookup(app_ids), user_stats,
                        app_emb, user_emb, nb)

    def unseen(self, app_ids: Sequence[str]) -> npt.NDArray[np.bool_]:
        return np.array([str(a) not in self.app_history.groups for a in app_ids], dtype=bool)

    def predict_matrix(self, x: F32Array, unseen: npt.NDArray[np.bool_] | None = None
                       ) -> tuple[FloatArray, FloatArray]:
        """(point, upper) in tokens, unclamped. `unseen`: rows whose app has no history."""
        raw = np.asarray(self.point.inplace_predict(x), dtype=np.float64)
        point = np.expm1(raw) if self.config.objective == "log-squared" else raw
        upper_log = np.asarray(self.upper.inplace_predict(x), dtype=np.float64)
        offset = self.seen_offsets(point)
        if unseen is not None:
            offset[unseen] = self.upper_log_offset_unseen
        upper = np.expm1(upper_log + offset)
        return point, upper

    def predict_set(self, s: LabeledSet) -> tuple[FloatArray, FloatArray]:
        ids = list(s.app_ids)
        x = self.features(s.app_emb, s.user_emb, ids, list(s.user_ids), s.input_tokens)
        return self.predict_matrix(x, self.unseen(ids))


def _params(config: ModelConfig, objective: str, **extra: Any) -> dict[str, Any]:
    return {"objective": objective, "eta": config.learning_rate, "max_depth": config.max_depth,
            "min_child_weight": config.min_child_weight, "subsample": config.subsample,
            "colsample_bytree": config.colsample_bytree, "nthread": config.threads,
            "seed": config.seed, "tree_method": "hist", **extra}


def _train_booster(params: dict[str, Any], x: F32Array, y: FloatArray, hx: F32Array,
                   hy: FloatArray, config: ModelConfig) -> xgb.Booster:
    dtrain = xgb.DMatrix(x, label=y)
    if len(hy) >= 20:
        # Early stopping on held-out rows: small online stores would otherwise overfit.
        dhold = xgb.DMatrix(hx, label=hy)
        booster = xgb.train(params, dtrain, config.n_estimators, evals=[(dhold, "hold")],
                            early_stopping_rounds=config.early_stopping_rounds,
                            verbose_eval=False)
        # Keep only the trees up to the best round.
        return booster[: booster.best_iteration + 1]
    return xgb.train(params, dtrain, max(50, config.n_estimators // 4))


def calibrate_log_offset(y: FloatArray, upper: FloatArray, quantile: float) -> float:
    """Split-conformal shift (log space) that puts `quantile` of held-out lengths under the bound.

    Uses the finite-sample level ceil((n + 1) q) / n, so coverage on new rows is at least q on
    average; log space keeps the shift proportional (a short answer is not padded by the spread of
    long ones)."""
    if len(y) == 0:
        return 0.0
    gaps = np.log1p(np.asarray(y, np.float64)) - np.log1p(np.maximum(upper, 0.0))
    level = min(1.0, math.ceil((len(y) + 1) * quantile) / len(y))
    return float(np.quantile(gaps, level, method="higher"))


def training_matrix(train: LabeledSet, config: ModelConfig
                    ) -> tuple[F32Array, HistoryTable, HistoryTable | None,
                               AppNeighbours | None]:
    """The training matrix with out-of-fold history (see `out_of_fold_history`), and the full
    tables used at serving time."""
    app_ids = [str(a) for a in train.app_ids]
    folds = np.array([fold_of(str(r), config.n_folds) for r in train.request_ids], np.int64)
    k_app = estimate_prior_strength(app_ids, train.generated)
    app_table = fit_history(app_ids, train.generated, train.capped, k_app)
    app_stats = out_of_fold_history(app_ids, train.generated, train.capped, folds,
                                    config.n_folds, k_app)
    if config.app_dropout > 0:
        dropped = holdout_mask(np.array([f"app:{a}" for a in app_ids]), config.app_dropout)
        app_stats[dropped] = app_table.global_row
    user_table: HistoryTable | None = None
    user_stats: FloatArray | None = None
    if config.user_history:
        user_ids = [str(u) for u in train.user_ids]
        k_user = estimate_prior_strength(user_ids, train.generated)
        user_table = fit_history(user_ids, train.generated, train.capped, k_user)
        user_stats = out_of_fold_history(user_ids, train.generated, train.capped, folds,
                                         config.n_folds, k_user)
    neighbours: AppNeighbours | None = None
    nb_stats: FloatArray | None = None
    if config.neighbours > 0:
        neighbours = AppNeighbours.build(app_ids, train.app_emb, app_table)
        nb_stats = neighbours.features(app_ids, train.app_emb, config.neighbours)
    x = assemble(train.input_tokens, app_stats, user_stats, train.app_emb, train.user_emb,
                 nb_stats)
    return x, app_table, user_table, neighbours


def fit_model(train: LabeledSet, holdout: LabeledSet, app_projection: Projection,
              user_projection: Projection, embedder: EmbedderConfig, config: ModelConfig,
              version_prefix: str = "xgb", base_train: LabeledSet | None = None,
              base_holdout: LabeledSet | None = None) -> FittedModel:
    """Fit both boosters on `train`, stop early and calibrate the upper bound on `holdout`.

    `base_*` are what the artifact keeps for later online retrains (default: train / holdout)."""
    if len(train) == 0:
        raise ValueError("no training rows")
    x, app_table, user_table, neighbours = training_matrix(train, config)
    hold_ids = list(holdout.app_ids)
    user_hold = None if user_table is None else user_table.lookup(list(holdout.user_ids))
    nb_hold = None if neighbours is None else \
        neighbours.features(hold_ids, holdout.app_emb, config.neighbours)
    hx = assemble(holdout.input_tokens, app_table.lookup(hold_ids), user_hold,
                  holdout.app_emb, holdout.user_emb, nb_hold)
    # Held-out rows as if their app (and users) had never been seen: no history, only the
    # instruction, the input and similar apps; this calibrates the upper bound for unseen apps.
    # New apps resemble the long tail more than the few big apps, so the rows of small apps are
    # used when there are enough of them.
    small = np.array([app_table.count(a) < SMALL_APP_ROWS for a in hold_ids], dtype=bool)
    blind_rows = small if small.sum() >= MIN_CALIBRATION_ROWS else np.ones(len(holdout), bool)
    n_blind = int(blind_rows.sum())
    blind = np.tile(app_table.global_row, (n_blind, 1))
    blind_users = None if user_table is None else np.tile(user_table.global_row, (n_blind, 1))
    hx_unseen = assemble(holdout.input_tokens[blind_rows], blind, blind_users,
                         holdout.app_emb[blind_rows], holdout.user_emb[blind_rows],
                         None if nb_hold is None else nb_hold[blind_rows])
    y, hy = train.generated, holdout.generated
    if config.objective == "log-squared":
        point = _train_booster(_params(config, "reg:squarederror"), x, np.log1p(y), hx,
                               np.log1p(hy), config)
    else:
        point = _train_booster(_params(config, "reg:absoluteerror"), x, y, hx, hy, config)
    # Start the quantile booster from the median, not xgboost's own estimate (the target's 0.9
    # quantile): when over a tenth of the lengths sit at the cap, that estimate is the cap itself,
    # every leaf's residual quantile is 0 and the trees never move (1 tree after early stopping).
    upper = _train_booster(
        _params(config, "reg:quantileerror", quantile_alpha=config.quantile,
                base_score=float(np.median(np.log1p(y)))),
        x, np.log1p(y), hx, np.log1p(hy), config)
    digest = hashlib.sha1(bytes(point.save_raw("ubj")) + bytes(upper.save_raw("ubj")))
    draft = FittedModel(
        version="", config=config, embedder=embedder, app_projection=app_projection,
        user_projection=user_projection, app_history=app_table, user_history=user_table,
        point=point, upper=upper, upper_log_offset=0.0,
        base_train=train if base_train is None else base_train,
        base_holdout=holdout if base_holdout is None else base_holdout,
        n_train=len(train), holdout_coverage=float("nan"), app_neighbours=neighbours,
    )

    def calibrate(matrix: F32Array, target: FloatArray) -> tuple[float, float]:
        if not len(target):
            return 0.0, float("nan")
        _, raw_upper = draft.predict_matrix(matrix)
        offset = calibrate_log_offset(target, raw_upper, config.quantile)
        calibrated = np.round(np.expm1(np.log1p(raw_upper) + offset))
        return offset, float(np.mean(target <= calibrated))

    offset, coverage = calibrate(hx, hy)
    offset_unseen, coverage_unseen = calibrate(hx_unseen, hy[blind_rows])
    edges, offsets = calibrate_bins(*draft.predict_matrix(hx), hy, config)
    if edges:
        binned = replace(draft, calibration_edges=edges, calibration_offsets=offsets)
        _, upper_h = binned.predict_matrix(hx)
        coverage = float(np.mean(hy <= np.round(upper_h)))
    digest.update(repr((offset, offset_unseen, edges, offsets)).encode())
    version = f"{version_prefix}-n{len(train)}-{digest.hexdigest()[:8]}"
    return replace(draft, version=version, upper_log_offset=offset, holdout_coverage=coverage,
                   upper_log_offset_unseen=offset_unseen,
                   holdout_coverage_unseen=coverage_unseen, calibration_edges=edges,
                   calibration_offsets=offsets)


def calibrate_bins(point: FloatArray, upper: FloatArray, y: FloatArray, config: ModelConfig
                   ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mondrian split-conformal: the held-out rows split into `calibration_bins` bins of equal
    size by their (uncalibrated) point estimate, and one shift per bin, so each bin's coverage
    is about the quantile rather than only the average over all rows. ((), ()) when there are
    too few rows for every bin to have MIN_CALIBRATION_ROWS."""
    bins = config.calibration_bins
    if bins < 2 or len(y) < bins * MIN_CALIBRATION_ROWS:
        return (), ()
    edges = np.unique(np.quantile(point, np.arange(1, bins) / bins))
    which = np.searchsorted(edges, point, side="right")
    if min(int(np.sum(which == b)) for b in range(len(edges) + 1)) < MIN_CALIBRATION_ROWS:
        return (), ()
    offsets = tuple(calibrate_log_offset(y[which == b], upper[which == b], config.quantile)
                    for b in range(len(edges) + 1))
    return tuple(float(e) for e in edges), offsets


# --- the predictor -------------------------------------------------------------------------

def clamp(point: float, upper: float, max_tokens: int) -> tuple[int, int]:
    """Both within [1, max_tokens], and the upper bound never under the point estimate."""
    cap = max(1, int(max_tokens))
    p = min(max(round(point) if math.isfinite(point) else 1, 1), cap)
    u = min(max(round(upper) if math.isfinite(upper) else cap, p), cap)
    return int(p), int(u)


def remaining_given(point: float, upper: float, so_far: int, quantile: float = 0.9
                    ) -> tuple[float, float]:
    """(point, upper) of the tokens still to come for a request that has generated `so_far`
    tokens without finishing (a continuation after a misprediction).

    Reads the total length as log-normal with median `point` and `quantile` at `upper`, and takes
    the median and the same quantile of that distribution given length > so_far. So a request that
    outran its estimate is expected to run on by an amount that grows with the spread of the
    prediction, not to stop at once."""
    mu = math.log1p(max(point, 0.0))
    sigma = max((math.log1p(max(upper, point)) - mu) / float(ndtri(quantile)), 0.05)
    done = float(ndtr((math.log1p(so_far) - mu) / sigma))
    done = min(done, 1.0 - 1e-9)  # far in the tail: the quantile function would overflow

    def at(q: float) -> float:
        return max(math.expm1(mu + sigma * float(ndtri(done + q * (1.0 - done)))), so_far)

    # Far in the tail of a narrow prediction the conditional quantiles collapse onto `so_far`
    # and would give 1-token runs, a prefill per token. Floor the bound at half the tokens so far:
    # each run may then generate at least half of all before it, so any request needs
    # O(log max_tokens) runs. (The benchmark's simulator found one request continued 411 times.)
    return max(at(0.5) - so_far, 1.0), max(at(quantile) - so_far, so_far / 2, 1.0)


def finish(point: float, upper: float, row: PredictRow, quantile: float = 0.9
           ) -> tuple[int, int]:
    """A total-length prediction turned into what the scheduler needs: the remaining length for a
    continuation, clamped to the tokens the request may still generate."""
    if row.generated_so_far > 0:
        point, upper = remaining_given(point, upper, row.generated_so_far, quantile)
    return clamp(point, upper, row.max_tokens - row.generated_so_far)


def fallback_ladder(samples: Sequence[LengthSample], default_tokens: int,
                    version: str | None = None) -> LinearLengthModel:
    """linear.py's ladder without its linear rung: per-app mean -> global mean -> default."""
    return LinearLengthModel.fit(samples, version or f"ladder-n{len(samples)}",
                                 min_samples_per_app=sys.maxsize, default_tokens=default_tokens)


class LengthPredictor:
    """Predicts (point, upper, source) for a batch of requests.

    With a fitted model every request is answered by the model (an app it has never seen still has
    its instruction embedding and the global history). Without one, the ladder answers."""

    def __init__(self, model: FittedModel | None, ladder: LinearLengthModel,
                 embedder: Embedder | None = None, input_cache: EmbeddingCache | None = None,
                 app_cache: EmbeddingCache | None = None) -> None:
        if model is not None and embedder is None:
            raise ValueError("a fitted model needs an embedder")
        if model is not None and embedder is not None and embedder.config != model.embedder:
            raise ValueError(f"embedder {embedder.config} differs from the model's "
                             f"{model.embedder}: features would not match training")
        self.model, self.ladder, self.embedder = model, ladder, embedder
        self.input_cache = input_cache or EmbeddingCache(4096)
        self.app_cache = app_cache or EmbeddingCache(4096)
        self.version: str = model.version if model is not None else ladder.version

    def embed(self, rows: Sequence[PredictRow]) -> tuple[F32Array, F32Array]:
        """Raw (app, input) embeddings; distinct instructions and inputs are embedded once."""
        assert self.embedder is not None
        app = self.app_cache.embed(self.embedder, [r.instruction for r in rows])
        user = self.input_cache.embed(self.embedder, [r.input for r in rows])
        return app, user

    def predict_batch(self, rows: Sequence[PredictRow]) -> list[Prediction3]:
        if not rows:
            return []
        if self.model is None:
            return [self.ladder_predict(r) for r in rows]
        m = self.model
        app_raw, user_raw = self.embed(rows)
        x = m.features(m.app_projection.transform(app_raw), m.user_projection.transform(user_raw),
                       [r.app_id for r in rows], [r.user_id for r in rows],
                       np.array([r.input_tokens for r in rows], dtype=np.int64))
        point, upper = m.predict_matrix(x, m.unseen([r.app_id for r in rows]))
        out: list[Prediction3] = []
        for r, p, u in zip(rows, point, upper, strict=True):
            pi, ui = finish(float(p), float(u), r, m.config.quantile)
            out.append((pi, ui, PredictorSource.MODEL))
        return out

    def ladder_predict(self, row: PredictRow) -> Prediction3:
        """The cold-start ladder's answer (also the service's answer if the model fails)."""
        point, upper, source = self.ladder.predict(row.app_id, row.input_tokens, row.max_tokens)
        p, u = finish(float(point), float(upper), row)
        return p, u, source


# --- artifact ------------------------------------------------------------------------------

def _table_json(t: HistoryTable | None) -> dict[str, Any] | None:
    if t is None:
        return None
    return {"global": t.global_row.tolist(), "k": t.prior_strength,
            "groups": {k: v.tolist() for k, v in t.groups.items()}}


def _table_from(d: dict[str, Any] | None) -> HistoryTable | None:
    if d is None:
        return None
    return HistoryTable(np.array(d["global"], np.float64),
                        {k: np.array(v, np.float64) for k, v in d["groups"].items()},
                        float(d["k"]))


_SET_FIELDS = ("request_ids", "app_ids", "user_ids", "input_tokens", "generated", "capped",
               "app_emb", "user_emb")


def save_artifact(model: FittedModel, path: Path) -> Path:
    """One compressed .npz: arrays plus a JSON metadata string. Loads with allow_pickle=False."""
    meta = {
        "format": ARTIFACT_FORMAT, "version": model.version, "config": asdict(model.config),
        "embedder": asdict(model.embedder), "upper_log_offset": model.upper_log_offset,
        "upper_log_offset_unseen": model.upper_log_offset_unseen,
        "calibration_edges": list(model.calibration_edges),
        "calibration_offsets": list(model.calibration_offsets),
        "holdout_coverage_unseen": model.holdout_coverage_unseen,
        "n_train": model.n_train, "holdout_coverage": model.holdout_coverage,
        "app_history": _table_json(model.app_history),
        "user_history": _table_json(model.user_history), "stat_names": list(STAT_NAMES),
        "extra": model.extra,
    }
    arrays: dict[str, Any] = {
        "meta": np.array(json.dumps(meta)),
        "point": np.frombuffer(bytes(model.point.save_raw("ubj")), dtype=np.uint8),
        "upper": np.frombuffer(bytes(model.upper.save_raw("ubj")), dtype=np.uint8),
        "app_proj_mean": model.app_projection.mean,
        "app_proj_components": model.app_projection.components,
        "user_proj_mean": model.user_projection.mean,
        "user_proj_components": model.user_projection.components,
    }
    if model.app_neighbours is not None:
        arrays["nb_app_ids"] = model.app_neighbours.app_ids
        arrays["nb_emb"] = model.app_neighbours.emb
        arrays["nb_stats"] = model.app_neighbours.stats
    for prefix, s in (("train", model.base_train), ("hold", model.base_holdout)):
        for name in _SET_FIELDS:
            value = getattr(s, name)
            # Embeddings in half precision: the artifact halves and trees split far coarser.
            arrays[f"{prefix}_{name}"] = value.astype(np.float16) if name.endswith("_emb") \
                else value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)  # readers never see a half-written artifact
    return path


def _booster(raw: npt.NDArray[np.uint8], threads: int) -> xgb.Booster:
    b = xgb.Booster()
    b.load_model(bytearray(raw.tobytes()))
    b.set_param({"nthread": threads})
    return b


def load_artifact(path: Path, threads: int | None = None) -> FittedModel:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta["format"] != ARTIFACT_FORMAT:
            raise ValueError(f"{path}: artifact format {meta['format']}, expected "
                             f"{ARTIFACT_FORMAT}")
        config = ModelConfig(**meta["config"])
        if threads is not None:
            config = replace(config, threads=threads)
        sets = {}
        for prefix in ("train", "hold"):
            values = [z[f"{prefix}_{n}"] for n in _SET_FIELDS]
            values = [v.astype(np.float32) if n.endswith("_emb") else v
                      for n, v in zip(_SET_FIELDS, values, strict=True)]
            sets[prefix] = LabeledSet(*values)
        app_table = _table_from(meta["app_history"])
        assert app_table is not None
        neighbours = AppNeighbours(z["nb_app_ids"], z["nb_emb"], z["nb_stats"]) \
            if "nb_app_ids" in z.files else None
        return FittedModel(
            version=meta["version"], config=config,
            # Artifacts from before the embedder had a window embedded inputs by their head.
            embedder=EmbedderConfig(**{"window": "head", **meta["embedder"]}),
            app_projection=Projection(z["app_proj_mean"], z["app_proj_components"]),
            user_projection=Projection(z["user_proj_mean"], z["user_proj_components"]),
            app_history=app_table, user_history=_table_from(meta["user_history"]),
            point=_booster(z["point"], config.threads), upper=_booster(z["upper"], config.threads),
            upper_log_offset=float(meta["upper_log_offset"]), base_train=sets["train"],
            base_holdout=sets["hold"], n_train=int(meta["n_train"]),
            holdout_coverage=float(meta["holdout_coverage"]), app_neighbours=neighbours,
            upper_log_offset_unseen=float(meta["upper_log_offset_unseen"]),
            holdout_coverage_unseen=float(meta["holdout_coverage_unseen"]),
            # Artifacts from before per-bin calibration have one shift for every row.
            calibration_edges=tuple(float(e) for e in meta.get("calibration_edges", [])),
            calibration_offsets=tuple(float(o) for o in meta.get("calibration_offsets", [])),
            extra=dict(meta.get("extra", {})),
        )
