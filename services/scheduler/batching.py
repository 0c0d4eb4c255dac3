"""Length-homogeneous adaptive batches, formed at decision time from everyone who waits.

The waiting pool is kept sorted by predicted length (`LengthSortedPool`), and is cut into
contiguous groups, greedily from the shortest: each group grows over its next-longer neighbours
while

(a) its KV demand fits the GPU's `kv_budget_tokens`:
    - static engine (a batch finishes before the next starts): size x (max input + max cap), where
      cap is the request's token cap for this run (its upper bound, see `run_token_cap`). This is
      the batch padded to its longest prompt and longest cap: exactly what a padded engine (the
      paper's HF setting, our simulator) holds, and an upper bound on what paged vLLM can hold at
      the batch's peak (there, sum of input + cap, which is <= the padded figure). Conservative on
      purpose: a static batch that overflows vLLM's cache is preempted and recomputed, which
      costs far more than a slightly smaller batch; and because groups are homogeneous in
      length, the padding on the output side is small.
    - continuous engine (requests leave as they finish): sum over members of input + cap.
(b) its wasted work stays bounded: waste = sum over members of (max predicted - own predicted),
    the decode steps a member's slot idles waiting for the longest. It is enforced per member:
    the longest member's prediction is at most (1 + max_waste_ratio) x the shortest's plus
    `waste_slack_tokens`. That implies the batch bound waste <= max_waste_ratio x useful +
    waste_slack_tokens x size (useful = sum of predicted), and also that no single member idles
    more than max_waste_ratio x its own length (+ slack). Why per member rather than only the
    total: it is monotone in the group's length, so the longest admissible group from every start
    can be found with one vectorised binary search instead of a Python loop over 10,000
    requests; and it protects each short request, not just the average. The slack lets very
    short requests (1..16 tokens) share a batch, where a per-batch fixed cost (prefill, HTTP,
    engine ramp-up) outweighs a few idle steps. Input padding is not counted as waste: vLLM runs
    prefill without padding.
(c) it has at most `max_batch_size` members (the engine's max_num_seqs; more would queue inside
    the engine anyway).

A request whose own demand exceeds the budget is still a group of one: it is never dropped
silently. It must fit the model's context (`input_tokens < max_model_len`, asserted; ingress
refuses longer prompts), and its cap is cut to the context left, so input + cap <= max_model_len,
and vLLM refuses to start with a cache smaller than one max_model_len sequence, so such a batch
can run.

Cost: keeping the pool sorted makes each decision O(n log max_batch_size) in numpy, no Python loop
over requests. The loop must keep one `LengthSortedPool` across decisions: `add` on arrival,
`remove` on dispatch (both O(n) memmoves, microseconds at 10,000); passing any other sequence sorts
it on each call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # policy imports this module; only the type is needed here
    from services.scheduler.policy import WaitingRequest

EngineMode = Literal["static", "continuous"]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_SortKey = tuple[int, float, str]
_ArrayT = TypeVar("_ArrayT", bound=np.ndarray[Any, Any])
_T = TypeVar("_T")


def run_token_cap(request: WaitingRequest, *, max_model_len: int | None = None,
                  oracle: bool = False) -> int:
    """The most tokens this run may generate: the predicted upper bound (the true length for the
    oracle), never above max_tokens nor the context left after the prompt, at least 1."""
    upper = request.upper_tokens
    if oracle and request.true_output_tokens is not None:
        upper = request.true_output_tokens
    cap = min(upper, request.max_tokens)
    if max_model_len is not None:
        assert request.input_tokens < max_model_len, (
            f"request {request.request_id}: prompt of {request.input_tokens} tokens does not fit "
            f"the model context {max_model_len}")
        cap = min(cap, max_model_len - request.input_tokens)
    return max(1, cap)


def effective_predicted(request: WaitingRequest, cap: int, *, oracle: bool = False) -> int:
    """The length the policy plans with: the prediction (true length for the oracle), within
    the run's cap, since the run cannot generate more than its cap."""
    predicted = request.predicted_tokens
    if oracle and request.true_output_tokens is not None:
        predicted = request.true_output_tokens
    return max(1, min(predicted, cap))


class LengthSortedPool(Sequence["WaitingRequest"]):
    """The waiting pool sorted by (planned length, queued_at, request_id), with numpy columns.

    Columns hold what batching reads: planned (predicted) tokens, input tokens, token cap and
    queued_at, each already adjusted for the oracle and the model context, so a decision does no
    per-request Python work.
    """

    def __init__(self, requests: Iterable[WaitingRequest] = (), *, max_model_len: int,
                 oracle: bool = False) -> None:
        self.max_model_len, self.oracle = max_model_len, oracle
        self._requests: list[WaitingRequest] = []
        self._keys: list[_SortKey] = []
        self._key_of: dict[str, _SortKey] = {}
        self._predicted: IntArray = np.zeros(0, dtype=np.int64)
        self._input: IntArray = np.zeros(0, dtype=np.int64)
        self._cap: IntArray = np.zeros(0, dtype=np.int64)
        self._queued_at: FloatArray = np.zeros(0, dtype=np.float64)
        self.add_many(requests)

    # --- Sequence -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._requests)

    @overload
    def __getitem__(self, index: int) -> WaitingRequest: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[WaitingRequest]: ...

    def __getitem__(self, index: int | slice) -> WaitingRequest | Sequence[WaitingRequest]:
        return self._requests[index]

    def __iter__(self) -> Iterator[WaitingRequest]:
        return iter(self._requests)

    def has(self, request_id: str) -> bool:
        return request_id in self._key_of

    def matches(self, *, max_model_len: int, oracle: bool) -> bool:
        """Whether this pool was built for these settings (else the policy rebuilds one)."""
        return self.max_model_len == max_model_len and self.oracle == oracle

    # --- columns (read-only views) --------------------------------------------------------
    @property
    def predicted_tokens(self) -> IntArray:
        return _read_only(self._predicted)

    @property
    def input_tokens(self) -> IntArray:
        return _read_only(self._input)

    @property
    def cap_tokens(self) -> IntArray:
        return _read_only(self._cap)

    @property
    def queued_at(self) -> FloatArray:
        return _read_only(self._queued_at)

    # --- changes --------------------------------------------------------------------------
    def add(self, request: WaitingRequest) -> None:
        self.add_many([request])

    def add_many(self, requests: Iterable[WaitingRequest]) -> None:
        rows = sorted((self._row(r) for r in requests), key=lambda row: row[0])
        if not rows:
            return
        for key, request, _ in rows:
            assert request.request_id not in self._key_of, f"{request.request_id} queued twice"
            self._key_of[request.request_id] = key
        # Positions in the old order, as np.insert wants them; arrivals are sorted, so those that
        # share a position keep their order. O(n + m log n), no re-sort of the pool.
        positions = [bisect_left(self._keys, key) for key, _, _ in rows]
        values = np.array([v for _, _, v in rows], dtype=np.float64)
        self._predicted = np.insert(self._predicted, positions, values[:, 0].astype(np.int64))
        self._input = np.insert(self._input, positions, values[:, 1].astype(np.int64))
        self._cap = np.insert(self._cap, positions, values[:, 2].astype(np.int64))
        self._queued_at = np.insert(self._queued_at, positions, values[:, 3])
        self._keys = _merged(self._keys, positions, [row[0] for row in rows])
        self._requests = _merged(self._requests, positions, [row[1] for row in rows])

    def remove(self, request_ids: Iterable[str]) -> list[WaitingRequest]:
        """Take these requests out (dispatched, cancelled); unknown ids are ignored."""
        positions = sorted(bisect_left(self._keys, self._key_of.pop(rid))
                           for rid in set(request_ids) if rid in self._key_of)
        if not positions:
            return []
        removed = [self._requests[p] for p in positions]
        if positions[-1] - positions[0] + 1 == len(positions):  # contiguous: one slice
            del self._requests[positions[0]: positions[-1] + 1]
            del self._keys[positions[0]: positions[-1] + 1]
        else:
            for p in reversed(positions):
                del self._requests[p]
                del self._keys[p]
        self._predicted = np.delete(self._predicted, positions)
        self._input = np.delete(self._input, positions)
        self._cap = np.delete(self._cap, positions)
        self._queued_at = np.delete(self._queued_at, positions)
        return removed

    # --- internals ------------------------------------------------------------------------
    def _row(self, request: WaitingRequest) -> tuple[_SortKey, WaitingRequest,
                                                     tuple[int, int, int, float]]:
        cap = run_token_cap(request, max_model_len=self.max_model_len, oracle=self.oracle)
        predicted = effective_predicted(request, cap, oracle=self.oracle)
        key = (predicted, request.queued_at, request.request_id)
        return key, request, (predicted, request.input_tokens, cap, request.queued_at)


def _merged(old: list[_T], positions: list[int], new: list[_T]) -> list[_T]:
    """`old` with new[j] inserted before old[positions[j]] (positions ascending): slices, O(n)."""
    out: list[_T] = []
    previous = 0
    for position, item in zip(positions, new, strict=True):
        out.extend(old[previous:position])
        out.append(item)
        previous = position
    out.extend(old[previous:])
    return out


def _read_only(array: _ArrayT) -> _ArrayT:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class CandidateBatch:
    """One candidate batch: its members (shortest first) and what the policy plans for it."""

    members: tuple[WaitingRequest, ...]
    token_caps: tuple[int, ...]  # per member: the most tokens this run may generate
    max_input_tokens: int
    max_predicted_tokens: int
    max_upper_tokens: int  # the largest token cap: the upper bound used for KV demand
    kv_demand_tokens: int
    waste_tokens: int
    useful_tokens: int
    oldest_queued_at: float
    mean_queued_at: float

    @property
    def size(self) -> int:
        return len(self.members)


def kv_demand(size: IntArray, max_input: IntArray, max_cap: IntArray, sum_input_and_cap: IntArray,
              engine_mode: EngineMode) -> IntArray:
    """KV tokens a batch may hold at its peak (see the module docstring for why these)."""
    if engine_mode == "static":
        return np.asarray(size * (max_input + max_cap), dtype=np.int64)
    return np.asarray(sum_input_and_cap, dtype=np.int64)


class CandidateSet(Sequence[CandidateBatch]):
    """A partition of a pool into contiguous (in length) groups, held as columns, one entry per
    group in length order; `self[i]` materialises group i as a `CandidateBatch`."""

    def __init__(self, pool: LengthSortedPool, starts: IntArray, engine_mode: EngineMode) -> None:
        n = len(pool)
        self.pool, self.engine_mode = pool, engine_mode
        self.starts = starts
        self.ends = np.append(starts[1:], n).astype(np.int64) if n else starts.copy()
        self.size = self.ends - self.starts
        assert (n == 0 and len(starts) == 0) or (starts[0] == 0 and (self.size > 0).all()), (
            "groups must partition the pool")
        if n == 0:
            empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
            self.max_input_tokens = self.max_predicted_tokens = self.max_upper_tokens = empty_i
            self.kv_demand_tokens = self.useful_tokens = self.waste_tokens = empty_i
            self.oldest_queued_at = self.mean_queued_at = empty_f
            return
        predicted, inputs, caps = pool.predicted_tokens, pool.input_tokens, pool.cap_tokens
        queued_at = pool.queued_at
        self.max_input_tokens = np.maximum.reduceat(inputs, starts)
        self.max_upper_tokens = np.maximum.reduceat(caps, starts)
        # Sorted by predicted length, so the group's longest is its last member.
        self.max_predicted_tokens = predicted[self.ends - 1]
        self.useful_tokens = np.add.reduceat(predicted, starts)
        self.waste_tokens = self.size * self.max_predicted_tokens - self.useful_tokens
        sum_input_and_cap = np.add.reduceat(inputs + caps, starts)
        self.kv_demand_tokens = kv_demand(self.size, self.max_input_tokens, self.max_upper_tokens,
                                          sum_input_and_cap, engine_mode)
        self.oldest_queued_at = np.minimum.reduceat(queued_at, starts)
        self.mean_queued_at = np.add.reduceat(queued_at, starts) / self.size

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> CandidateBatch: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[CandidateBatch]: ...

    def __getitem__(self, index: int | slice) -> CandidateBatch | Sequence[CandidateBatch]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]
        start, end = int(self.starts[i]), int(self.ends[i])
        return CandidateBatch(
            members=tuple(self.pool[start:end]),
            token_caps=tuple(int(c) for c in self.pool.cap_tokens[start:end]),
            max_input_tokens=int(self.max_input_tokens[i]),
            max_predicted_tokens=int(self.max_predicted_tokens[i]),
            max_upper_tokens=int(self.max_upper_tokens[i]),
            kv_demand_tokens=int(self.kv_demand_tokens[i]),
            waste_tokens=int(self.waste_tokens[i]),
            useful_tokens=int(self.useful_tokens[i]),
            oldest_queued_at=float(self.oldest_queued_at[i]),
            mean_queued_at=float(self.mean_queued_at[i]))

    def over_budget(self, kv_budget_tokens: int) -> npt.NDArray[np.bool_]:
        return np.asarray(self.kv_demand_tokens > kv_budget_tokens)


def adaptive_batches(pool: LengthSortedPool, kv_budget_tokens: int, *,
                     engine_mode: EngineMode = "static", max_waste_ratio: float = 0.5,
                     waste_slack_tokens: int = 16, max_batch_size: int = 256) -> CandidateSet:
    """Magnus' batches: grow each group over longer neighbours within budget and waste bound."""
    assert kv_budget_tokens >= 1 and max_waste_ratio >= 0 and waste_slack_tokens >= 0
    assert max_batch_size >= 1
    n = len(pool)
    predicted = pool.predicted_tokens
    # The longest admissible member for a group starting at s: (1 + ratio) x pred[s] + slack.
    longest_allowed = np.floor((1.0 + max_waste_ratio) * predicted + waste_slack_tokens)
    waste_end = np.searchsorted(predicted, longest_allowed.astype(np.int64), side="right")
    limit = np.minimum(waste_end - np.arange(n), max_batch_size)
    candidates = _partition(pool, kv_budget_tokens, engine_mode, limit.astype(np.int64))
    slack = waste_slack_tokens * candidates.size
    assert (candidates.waste_tokens
            <= max_waste_ratio * candidates.useful_tokens + slack + 1e-6).all(), "waste bound"
    return candidates


def fixed_size_batches(pool: LengthSortedPool, batch_size: int, kv_budget_tokens: int, *,
                       engine_mode: EngineMode = "static") -> CandidateSet:
    """Ablation: length-sorted groups of `batch_size`, cut shorter where the budget requires."""
    assert batch_size >= 1 and kv_budget_tokens >= 1
    n = len(pool)
    limit = np.minimum(n - np.arange(n), batch_size).astype(np.int64)
    return _partition(pool, kv_budget_tokens, engine_mode, limit)


def _partition(pool: LengthSortedPool, kv_budget_tokens: int, engine_mode: EngineMode,
               limit: IntArray) -> CandidateSet:
    """Cut the pool greedily from the shortest: each group is the longest one from its start
    that respects `limit` (per start) and the KV budget, and at least one request."""
    n = len(pool)
    if n == 0:
        return CandidateSet(pool, np.zeros(0, dtype=np.int64), engine_mode)
    if engine_mode == "continuous":
        fits = _continuous_fit_lengths(pool.input_tokens + pool.cap_tokens, kv_budget_tokens)
    else:
        fits = _static_fit_lengths(pool.input_tokens, pool.cap_tokens, kv_budget_tokens, limit)
    lengths = np.maximum(np.minimum(fits, limit), 1)
    # Follow the chain of groups: one step per group, not per request.
    starts: list[int] = []
    start = 0
    while start < n:
        starts.append(start)
        start += int(lengths[start])
    candidates = CandidateSet(pool, np.array(starts, dtype=np.int64), engine_mode)
    over = candidates.over_budget(kv_budget_tokens)
    assert (candidates.size[over] == 1).all(), "only a lone request may exceed the KV budget"
    return candidates


def _continuous_fit_lengths(demand: IntArray, kv_budget_tokens: int) -> IntArray:
    """For every start s, the most consecutive requests whose summed demand fits the budget."""
    prefix = np.concatenate(([0], np.cumsum(demand)))
    last = np.searchsorted(prefix, prefix[:-1] + kv_budget_tokens, side="right") - 1
    return np.asarray(last - np.arange(len(demand)), dtype=np.int64)


def _static_fit_lengths(inputs: IntArray, caps: IntArray, kv_budget_tokens: int,
                        limit: IntArray) -> IntArray:
    """For every start s, the longest group [s, s + len) with len <= limit[s] and
    len x (max input + max cap) <= budget, found for all starts at once by binary lifting over a
    sparse table of range maxima (the condition is monotone in len)."""
    n = len(inputs)
    top = max(int(limit.max()), 1)
    if top * (int(inputs.max()) + int(caps.max())) <= kv_budget_tokens:
        return limit.copy()  # even the longest group of the largest requests fits: no search
    levels = top.bit_length()
    # int32 halves the memory traffic; used whenever no product can overflow it.
    largest_product = 2 * top * (int(inputs.max()) + int(caps.max()))
    dtype: type[np.signedinteger[Any]] = (
        np.int32 if max(largest_product, kv_budget_tokens) < 2**31 - 1 else np.int64)
    # table[b][:, i] = max of inputs / caps over [i, i + 2^b), where that range lies in the pool;
    # one spare column so that a lookup just past the end stays in bounds (its value is unused).
    base = np.empty((2, n + 1), dtype=dtype)
    base[0, :n], base[1, :n], base[:, n] = inputs, caps, 0
    table = [base]
    for b in range(1, levels):
        half, prev = 1 << (b - 1), table[-1]
        level = np.empty_like(prev)
        np.maximum(prev[:, : n + 1 - half], prev[:, half:], out=level[:, : n + 1 - half])
        level[:, n + 1 - half:] = prev[:, n + 1 - half:]
        table.append(level)
    position = np.arange(n, dtype=np.int64)  # s + length: where the next block would start
    length: npt.NDArray[np.signedinteger[Any]] = np.zeros(n, dtype=dtype)
    best = np.zeros((2, n), dtype=dtype)  # max input, max cap over [s, s + length)
    limit_d: npt.NDArray[np.signedinteger[Any]] = limit.astype(dtype)
    for b in reversed(range(levels)):
        step = 1 << b
        grown = length + step
        candidate = np.maximum(best, np.take(table[b], position, axis=1))
        ok = (grown <= limit_d) & (grown * (candidate[0] + candidate[1]) <= kv_budget_tokens)
        np.copyto(best, candidate, where=ok)
        length += ok.astype(dtype) * step
        position += ok * step
    return length.astype(np.int64)


def batch_of(members: Sequence[WaitingRequest], token_caps: Sequence[int],
             predicted_tokens: Sequence[int], engine_mode: EngineMode) -> CandidateBatch:
    """A `CandidateBatch` for an arbitrary member list (the FCFS baselines), in the given order."""
    assert members and len(members) == len(token_caps) == len(predicted_tokens)
    size = len(members)
    max_input = max(m.input_tokens for m in members)
    max_cap, max_predicted, useful = max(token_caps), max(predicted_tokens), sum(predicted_tokens)
    sum_input_and_cap = sum(m.input_tokens for m in members) + sum(token_caps)
    demand = kv_demand(np.array([size]), np.array([max_input]), np.array([max_cap]),
                       np.array([sum_input_and_cap]), engine_mode)
    return CandidateBatch(
        members=tuple(members), token_caps=tuple(token_caps), max_input_tokens=max_input,
        max_predicted_tokens=max_predicted, max_upper_tokens=max_cap,
        kv_demand_tokens=int(demand[0]), waste_tokens=size * max_predicted - useful,
        useful_tokens=useful, oldest_queued_at=min(m.queued_at for m in members),
        mean_queued_at=sum(m.queued_at for m in members) / size)
