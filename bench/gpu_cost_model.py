"""GPU engine cost models fitted to the H200 step times in data/gpu_profile_h200/ (measured on one
NVIDIA H200 with a Llama-3-8B configuration, random bf16 weights; see that folder's README).

Two engines, the same laws as bench/cost_model.py (decode step = a + b x batch + c x context;
prefill = p0 x chunks + p1 x tokens), fitted by the same relative-error non-negative least squares:

- `graphs` (vLLM class): decode steps captured in CUDA graphs (`gpu_graphs_h200.json`, batch 1-512 x
  context 512-8192 per sequence; context in the law is the sum over sequences, B x (L + 1)) and
  batch-1 prefill of 512-8192 tokens (the 32k-token point is left out: vLLM prefills in chunks of
  `chunk_tokens`, and attention makes a 32k chunk slower per token than any chunk it runs).
- `eager` (the paper's HuggingFace static engine): eager decode steps and whole-batch prefills of
  the `grid` in `gpu_profile_h200.json` (batch 1-256 x prompt 128-2048). Eager decode is launch
  bound (flat near 38 ms until KV traffic dominates), which a linear law can only approximate: the
  fit's errors are reported with it, not hidden.

Modelled, not measured: the simulator's GPU runs use these laws; nothing here ran vLLM on a GPU.
Assumed engine limits (vLLM's defaults on a large GPU, `--max-num-batched-tokens` 8192 per step)
are arguments.

    python -m bench.gpu_cost_model            # fit both, print, write results/cost_model_h200.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bench.cost_model import CostModelFit, EngineCostModel, _nnls, quality

REPO_ROOT = Path(__file__).resolve().parent.parent
PROFILE_DIR = REPO_ROOT / "data" / "gpu_profile_h200"
DEFAULT_OUT = REPO_ROOT / "results" / "cost_model_h200.json"
GPU_CHUNK_TOKENS = 8192
GpuEngine = Literal["graphs", "eager"]


def fit_graphs(profile: Mapping[str, Any], chunk_tokens: int = GPU_CHUNK_TOKENS) -> CostModelFit:
    """The vLLM-class engine from the CUDA-graph decode points and batch-1 prefills."""
    decode = [d for d in profile["decode"] if d.get("graph_ms") is not None]
    batch = np.array([d["B"] for d in decode], dtype=np.float64)
    context = np.array([d["B"] * (d["L"] + 1) for d in decode], dtype=np.float64)
    step = np.array([d["graph_ms"] for d in decode], dtype=np.float64) / 1000
    prefill = [p for p in profile["prefill"] if p["T"] <= chunk_tokens]
    tokens = np.array([p["T"] for p in prefill], dtype=np.float64)
    prefill_s = np.array([p["ms"] for p in prefill], dtype=np.float64) / 1000
    return _fit(batch, context, step, tokens, prefill_s, chunk_tokens)


def fit_eager(profile: Mapping[str, Any], chunk_tokens: int = 1 << 20) -> CostModelFit:
    """The HF eager static engine: a batch prefills whole (one chunk), then decodes."""
    grid = [g for g in profile["grid"] if g.get("decode_ms_median") is not None
            and g.get("prefill_ms") is not None and not g.get("prefill_extrapolated", False)]
    batch = np.array([g["B"] for g in grid], dtype=np.float64)
    context = np.array([g["B"] * g["L"] for g in grid], dtype=np.float64)
    step = np.array([g["decode_ms_median"] for g in grid], dtype=np.float64) / 1000
    tokens = np.array([g["B"] * g["L"] for g in grid], dtype=np.float64)
    prefill_s = np.array([g["prefill_ms"] for g in grid], dtype=np.float64) / 1000
    return _fit(batch, context, step, tokens, prefill_s, chunk_tokens)


def _fit(batch: np.ndarray, context: np.ndarray, step: np.ndarray, tokens: np.ndarray,
         prefill_s: np.ndarray, chunk_tokens: int) -> CostModelFit:
    assert len(step) >= 3 and len(prefill_s) >= 2, "too few points to fit"
    a, b, c = _nnls(np.column_stack([np.ones_like(batch), batch, context]), step)
    chunks = np.maximum(1.0, np.ceil(tokens / chunk_tokens))
    p0, p1 = _nnls(np.column_stack([chunks, tokens]), prefill_s)
    model = EngineCostModel(step_base_s=a, step_per_seq_s=b, step_per_context_token_s=c,
                            prefill_step_s=p0, prefill_per_token_s=p1, chunk_tokens=chunk_tokens)
    step_pred = np.array([model.step_time(x, y) for x, y in zip(batch, context, strict=True)])
    prefill_pred = np.array([model.prefill_time(int(t)) for t in tokens])
    return CostModelFit(model, quality(step, step_pred), quality(prefill_s, prefill_pred))


def load_profiles(profile_dir: Path = PROFILE_DIR) -> dict[GpuEngine, CostModelFit]:
    graphs = json.loads((profile_dir / "gpu_graphs_h200.json").read_text())
    eager = json.loads((profile_dir / "gpu_profile_h200.json").read_text())
    return {"graphs": fit_graphs(graphs), "eager": fit_eager(eager)}


def load_gpu_model(engine: GpuEngine, path: Path = DEFAULT_OUT) -> EngineCostModel:
    """A fitted GPU engine from the committed results (refit with `main` when the data change)."""
    return EngineCostModel.from_dict(json.loads(path.read_text())[engine]["model"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", type=Path, default=PROFILE_DIR)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    fits = load_profiles(args.profiles)
    print("| engine | decode ms = a + b B + c context | decode max err | prefill ms/token | "
          "prefill max err |")
    print("|---|---|---|---|---|")
    for name, fit in fits.items():
        m = fit.model
        print(f"| {name} | {m.step_base_s * 1e3:.2f} + {m.step_per_seq_s * 1e3:.4f} B + "
              f"{m.step_per_context_token_s * 1e3:.7f} ctx | "
              f"{fit.decode.max_relative_error:.0%} | {m.prefill_per_token_s * 1e3:.4f} | "
              f"{fit.prefill.max_relative_error:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({k: v.as_dict() for k, v in fits.items()}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
