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
- Features are log1p-scaled (10 vs 20 tokens differ as much as 100 vs 200), each divided by the
  log1p of a fixed typical range, and looked up in a KD-tree rebuilt every 32 new records (the
  newest are searched by brute force meanwhile): a decision asks for hundreds of estimates at once
  (`estimate_many`, ~0.1-0.2 ms for 250), an observation is a few array writes.
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
                 cost_model: CostModel = DEFAULT_COST_MODEL,
                 feature_ranges: tuple[int, int, int] = (256, 2048, 2048)) -> None:
        """`feature_ranges`: typical largest batch size, input and output length; log1p of each
        feature is divided by log1p of its range so that all three weigh alike in distances.
        Fixed rather than taken from the data so that an index stays valid as records arrive."""
        assert k >= 1 and max_records >= k, "need k >= 1 and room for k records"
        assert min(feature_ranges) >= 1, "feature ranges must be positive"
        self.k, self.max_records, self.cost_model = k, max_records, cost_model
        self._scale = np.log1p(np.asarray(feature_ranges, dtype=np.float64))
        # Ring buffers (bounded memory, O(1) observe): raw rows (size, max_input, max_tokens,
        # measured_s), their scaled features, and measured / cost-model time.
        self._table = np.zeros((max_records, 4), dtype=np.float64)
        self._features = np.zeros((max_records, 3), dtype=np.float64)
        self._ratio = np.zeros(max_records, dtype=np.float64)
        self._count = 0  # records held, <= max_records
        self._next = 0  # the slot the next record goes to
        self._tree: _Tree | None = None  # over the slots held when built; None: build on demand
        self._since_build = 0  # records observed since the tree was built: its "tail"

    def __len__(self) -> int:
        return self._count

    def observe(self, record: ServiceRecord) -> None:
        row = (record.size, record.max_input_tokens, record.max_tokens)
        slot = self._next
        self._table[slot] = (*row, record.measured_s)
        self._features[slot] = np.log1p(row) / self._scale
        modelled = float(self.cost_model.seconds(*row))
        self._ratio[slot] = record.measured_s / max(modelled, MIN_SERVICE_S)
        self._next = (slot + 1) % self.max_records
        self._count = min(self._count + 1, self.max_records)
        self._since_build += 1

    def records(self) -> FloatArray:
        """The records held, as an (n, 4) array (oldest first is not guaranteed)."""
        return self._table[: self._count].copy()

    def refit_cost_model(self) -> CostModel:
        """Refit the cold-start / correction baseline from the records held (call it rarely)."""
        self.cost_model = fit_cost_model(self._table[: self._count])
        held = self._table[: self._count]
        modelled = self.cost_model.seconds(held[:, 0], held[:, 1], held[:, 2])
        self._ratio[: self._count] = held[:, 3] / np.maximum(modelled, MIN_SERVICE_S)
        return self.cost_model

    def estimate(self, size: int, max_input_tokens: int, max_predicted_tokens: int) -> float:
        return float(self.estimate_many([size], [max_input_tokens], [max_predicted_tokens])[0])

    def estimate_many(self, size: ArrayLike, max_input_tokens: ArrayLike,
                      max_predicted_tokens: ArrayLike) -> FloatArray:
        baseline = np.ravel(self.cost_model.seconds(size, max_input_tokens, max_predicted_tokens))
        if self._count < self.k:
            return np.maximum(baseline, MIN_SERVICE_S)
        query = np.column_stack([np.asarray(a, dtype=np.float64).ravel() for a in
                                 (size, max_input_tokens, max_predicted_tokens)])
        return np.maximum(baseline * self._correction(np.log1p(query) / self._scale),
                          MIN_SERVICE_S)

    def _correction(self, points: FloatArray) -> FloatArray:
        """Inverse-distance-weighted mean of the k nearest records' ratios (exact matches alone).

        The tree is rebuilt only every `_REBUILD_AFTER` records (a build is ~0.2 ms at 2,000);
        records since then (the tail) are searched by brute force, and the tree's entries in the
        slots they overwrote are masked, so the answer is what a fresh tree would give.
        """
        if self._tree is None or self._since_build > _REBUILD_AFTER:
            self._tree = _Tree(self._features[: self._count])
            self._since_build = 0
        k, tail = self.k, self._since_build
        tail_slots = (self._next - tail + np.arange(tail)) % self.max_records
        dist, slots = self._tree.query(points, min(k, self._tree.size))
        if tail:
            stale = np.isin(slots, tail_slots)
            if stale.any():
                # Some neighbours were overwritten since the build: look further for those rows
                # only (k + tail neighbours hold at least k live ones).
                rows = np.flatnonzero(stale.any(axis=1))
                wide = min(k + tail, self._tree.size)
                far_dist, far_slots = self._tree.query(points[rows], wide)
                far_dist = np.where(np.isin(far_slots, tail_slots), np.inf, far_dist)
                dist = np.hstack([dist, np.full((len(dist), wide - dist.shape[1]), np.inf)])
                slots = np.hstack([slots, np.zeros((len(slots), wide - slots.shape[1]),
                                                   dtype=np.int64)])
                dist[rows], slots[rows] = far_dist, far_slots
                dist = np.where(np.isin(slots, tail_slots), np.inf, dist)
            tail_dist = np.sqrt(((points[:, None, :] - self._features[tail_slots][None]) ** 2)
                                .sum(axis=2))
            dist = np.hstack([dist, tail_dist])
            slots = np.hstack([slots, np.broadcast_to(tail_slots, tail_dist.shape)])
        if dist.shape[1] > k:
            nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
            dist = np.take_along_axis(dist, nearest, axis=1)
            slots = np.take_along_axis(slots, nearest, axis=1)
        exact = dist < _EXACT_DISTANCE
        weights = np.where(exact.any(axis=1, keepdims=True), exact.astype(np.float64),
                           1.0 / np.maximum(dist, _EXACT_DISTANCE))
        ratios = self._ratio[slots]
        return np.asarray((weights * ratios).sum(axis=1) / weights.sum(axis=1), dtype=np.float64)


# Rebuild the KD-tree after this many new records; until then they are searched by brute force.
_REBUILD_AFTER = 32


class _Tree:
    """A KD-tree over scaled features; an entry's index is its ring-buffer slot."""

    def __init__(self, features: FloatArray) -> None:
        self.size = len(features)
        # Unbalanced, uncompacted: about half the build time, and queries are as fast at this size.
        self.tree = cKDTree(features, balanced_tree=False, compact_nodes=False)

    def query(self, points: FloatArray, k: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        dist, idx = self.tree.query(points, k=k)
        return (np.asarray(dist, dtype=np.float64).reshape(len(points), k),
                np.asarray(idx, dtype=np.int64).reshape(len(points), k))


def _as_table(records: Sequence[ServiceRecord] | FloatArray) -> FloatArray:
    if isinstance(records, np.ndarray):
        return np.asarray(records, dtype=np.float64).reshape(-1, 4)
    return np.array([(r.size, r.max_input_tokens, r.max_tokens, r.measured_s) for r in records],
                    dtype=np.float64).reshape(-1, 4)



class PerGpuEstimators:
    """The cluster's estimator and one per GPU: GPUs of different nodes may differ in speed
    (an H100 beside an older card), so a decision for a GPU uses that GPU's own batches once it
    has `min_records` of them, and every GPU's batches until then (a new node starts from what
    the cluster knows, not from the cold-start model)."""

    def __init__(self, min_records: int = 20) -> None:
        assert min_records >= 1, "a GPU's own estimate needs records"
        self.min_records = min_records
        self.pooled = ServiceTimeEstimator()
        self.by_gpu: dict[int, ServiceTimeEstimator] = {}

    def observe(self, gpu: int, record: ServiceRecord) -> None:
        self.pooled.observe(record)
        self.by_gpu.setdefault(gpu, ServiceTimeEstimator()).observe(record)

    def for_gpu(self, gpu: int) -> BatchTimeEstimator:
        own = self.by_gpu.get(gpu)
        return own if own is not None and len(own) >= self.min_records else self.pooled

    def warm(self) -> dict[int, BatchTimeEstimator]:
        """GPU -> its own estimator, for the GPUs that have enough records of their own."""
        return {g: e for g, e in self.by_gpu.items() if len(e) >= self.min_records}
