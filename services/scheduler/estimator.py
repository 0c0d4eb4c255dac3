"""Serving-time estimator: how long a static batch will take, from the batches already served.

A batch is described by three features: its size, its longest input (prefill) and its longest
predicted output (decode steps, since every slot is held until the longest member finishes).

- Cold start (fewer than `k` records): an analytic cost model,
      seconds = prefill_s_per_token * size * max_input
              + max_predicted * (decode_step_base_s + decode_step_per_seq_s * size),
  with defaults measured-ish for SmolLM2-135M on a 2-core CPU, and `fit_cost_model` to refit its
  constants from records by non-negative least squares.
- Warm: k-nearest neighbours over the latest `max_records` records. The neighbours vote on the
  *correction factor* measured / cost_model(record), which is then applied to the query's
  cost-model time. Why not average neighbours' seconds directly: plain kNN cannot extrapolate, so a
  batch longer than any seen would be estimated as fast as the longest seen, its response ratio
  inflated, and HRRN would favour it. A correction factor is smooth in the features, so the
  neighbours' evidence transfers to a query some distance away, and on a repeated point the
  estimate is exactly the measured value. Neighbours are weighted by inverse distance; exact
  matches (distance 0) are averaged alone.
- Features are log1p-scaled (10 vs 20 tokens differ as much as 100 vs 200) and standardised by
  the records' spread, and looked up in a KD-tree rebuilt lazily after new records: a decision
  asks for hundreds of estimates at once (`estimate_many`), an observation is one array write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls
from scipy.spatial import cKDTree

from shared.schemas import BatchRecord

FloatArray = npt.NDArray[np.float64]
ArrayLike = npt.ArrayLike

# Below this a distance counts as the same point (features are standardised, so this is tiny).
_EXACT_DISTANCE = 1e-9
# An estimate is never below this: HRRN divides by it.
MIN_SERVICE_S = 1e-6


@dataclass(frozen=True)
class CostModel:
    """Analytic batch time: padded prefill of the batch, then one decode step per output token."""

    prefill_s_per_token: float = 1.0 / 2000.0
    # 35 tok/s for one sequence (28.6 ms a step) and 200 tok/s aggregate at 8 sequences (40 ms a
    # step) give base + 1 * per_seq = 28.6 ms and base + 8 * per_seq = 40 ms.
    decode_step_base_s: float = 0.0269
    decode_step_per_seq_s: float = 0.00163

    def __post_init__(self) -> None:
        assert self.prefill_s_per_token >= 0 and self.decode_step_base_s >= 0, "negative cost"
        assert self.decode_step_per_seq_s >= 0, "negative cost"

    def seconds(self, size: ArrayLike, max_input_tokens: ArrayLike,
                max_predicted_tokens: ArrayLike) -> FloatArray:
        size_a = np.asarray(size, dtype=np.float64)
        input_a = np.asarray(max_input_tokens, dtype=np.float64)
        predicted_a = np.asarray(max_predicted_tokens, dtype=np.float64)
        prefill = self.prefill_s_per_token * size_a * input_a
        decode = predicted_a * (self.decode_step_base_s + self.decode_step_per_seq_s * size_a)
        return np.asarray(prefill + decode, dtype=np.float64)


DEFAULT_COST_MODEL = CostModel()


@dataclass(frozen=True)
class ServiceRecord:
    """One served batch: its features and how long it took."""

    size: int
    max_input_tokens: int
    max_tokens: int  # the batch's longest predicted (or generated) output, the caller's choice
    measured_s: float

    def __post_init__(self) -> None:
        assert self.size >= 1, "a batch has at least one request"
        assert self.max_input_tokens >= 0 and self.max_tokens >= 0, "negative token count"
        assert self.measured_s >= 0, "negative duration"

    @classmethod
    def from_batch_record(cls, record: BatchRecord,
                          length: Literal["predicted", "generated"] = "predicted") -> ServiceRecord:
        """Default `predicted`: decisions query with predicted lengths, so learning time given the
        prediction also learns the predictor's bias; `generated` learns the engine alone."""
        max_tokens = (record.max_predicted_tokens if length == "predicted"
                      else record.max_generated_tokens)
        return cls(size=record.size, max_input_tokens=record.max_input_tokens,
                   max_tokens=max_tokens, measured_s=record.measured_s)


class BatchTimeEstimator(Protocol):
    """What a policy needs of an estimator (the simulator may pass its own)."""

    def estimate(self, size: int, max_input_tokens: int, max_predicted_tokens: int) -> float: ...

    def estimate_many(self, size: ArrayLike, max_input_tokens: ArrayLike,
                      max_predicted_tokens: ArrayLike) -> FloatArray: ...


def fit_cost_model(records: Sequence[ServiceRecord] | FloatArray) -> CostModel:
    """Fit the cost model's three constants by non-negative least squares (no intercept).

    `records` is a list of ServiceRecord or an (n, 4) array of size, max_input, max_tokens,
    measured_s. Non-negative because a negative cost would make long batches look free.
    """
    table = _as_table(records)
    assert len(table) >= 3, "need at least three records to fit three constants"
    size, max_input, max_tokens, measured = table.T
    design = np.column_stack([size * max_input, max_tokens, max_tokens * size])
    # Scale columns to unit norm so that the solver is not dominated by the largest column.
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(design / scale, measured)
    prefill, base, per_seq = (float(c) for c in np.asarray(coef, dtype=np.float64) / scale)
    return CostModel(prefill_s_per_token=prefill, decode_step_base_s=base,
                     decode_step_per_seq_s=per_seq)


class ServiceTimeEstimator:
    """kNN over the latest `max_records` batches, analytic until it has `k` of them."""

    def __init__(self, k: int = 5, max_records: int = 2000,
                 cost_model: CostModel = DEFAULT_COST_MODEL) -> None:
        assert k >= 1 and max_records >= k, "need k >= 1 and room for k records"
        self.k, self.max_records, self.cost_model = k, max_records, cost_model
        # A ring buffer of (size, max_input, max_tokens, measured_s): bounded memory, O(1) observe.
        self._table = np.zeros((max_records, 4), dtype=np.float64)
        self._count = 0  # records held, <= max_records
        self._next = 0  # where the next record goes
        self._index: _KnnIndex | None = None  # rebuilt lazily after observe

    def __len__(self) -> int:
        return self._count

    def observe(self, record: ServiceRecord) -> None:
        self._table[self._next] = (record.size, record.max_input_tokens, record.max_tokens,
                                   record.measured_s)
        self._next = (self._next + 1) % self.max_records
        self._count = min(self._count + 1, self.max_records)
        self._index = None

    def records(self) -> FloatArray:
        """The records held, as an (n, 4) array (oldest first is not guaranteed)."""
        return self._table[: self._count].copy()

    def refit_cost_model(self) -> CostModel:
        """Refit the cold-start / correction baseline from the records held (call it rarely)."""
        self.cost_model = fit_cost_model(self._table[: self._count])
        self._index = None
        return self.cost_model

    def estimate(self, size: int, max_input_tokens: int, max_predicted_tokens: int) -> float:
        return float(self.estimate_many([size], [max_input_tokens], [max_predicted_tokens])[0])

    def estimate_many(self, size: ArrayLike, max_input_tokens: ArrayLike,
                      max_predicted_tokens: ArrayLike) -> FloatArray:
        baseline = self.cost_model.seconds(size, max_input_tokens, max_predicted_tokens)
        if self._count < self.k:
            return np.maximum(baseline, MIN_SERVICE_S)
        if self._index is None:
            self._index = _KnnIndex(self._table[: self._count], self.cost_model)
        query = np.column_stack([np.asarray(a, dtype=np.float64).ravel() for a in
                                 (size, max_input_tokens, max_predicted_tokens)])
        correction = self._index.correction(query, self.k)
        return np.maximum(baseline.ravel() * correction, MIN_SERVICE_S)


class _KnnIndex:
    """A KD-tree over standardised log features, voting on measured / cost-model time."""

    def __init__(self, table: FloatArray, cost_model: CostModel) -> None:
        features = np.log1p(table[:, :3])
        self.mean = features.mean(axis=0)
        spread = features.std(axis=0)
        self.spread = np.where(spread > 0, spread, 1.0)
        self.tree = cKDTree((features - self.mean) / self.spread)
        modelled = np.maximum(cost_model.seconds(table[:, 0], table[:, 1], table[:, 2]),
                              MIN_SERVICE_S)
        self.ratio = table[:, 3] / modelled

    def correction(self, query: FloatArray, k: int) -> FloatArray:
        points = (np.log1p(query) - self.mean) / self.spread
        dist_any, idx_any = self.tree.query(points, k=k)
        dist = np.asarray(dist_any, dtype=np.float64).reshape(len(query), k)
        idx = np.asarray(idx_any, dtype=np.int64).reshape(len(query), k)
        ratios = self.ratio[idx]
        exact = dist < _EXACT_DISTANCE
        weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64),
                           1.0 / np.maximum(dist, _EXACT_DISTANCE))
        return np.asarray((weights * ratios).sum(axis=1) / weights.sum(axis=1), dtype=np.float64)


def _as_table(records: Sequence[ServiceRecord] | FloatArray) -> FloatArray:
    if isinstance(records, np.ndarray):
        return np.asarray(records, dtype=np.float64).reshape(-1, 4)
    return np.array([(r.size, r.max_input_tokens, r.max_tokens, r.measured_s) for r in records],
                    dtype=np.float64).reshape(-1, 4)

