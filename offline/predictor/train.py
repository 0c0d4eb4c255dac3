"""Build the predictor artifact from the committed workload and the profiled lengths.

    python -m offline.predictor.train [--profile PATH] [--out PATH]

Fits on the train split, selects the point objective and user history and calibrates the p90 on
the val split, and writes `.cache/predictor/predictor.npz`. When the artifact is under 2 MB it is
also written to `models/predictor/predictor.npz`, the copy that is committed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from offline.predictor.dataset import (
    by_split,
    default_profile_path,
    load_cache_file,
    load_examples,
    save_cache_file,
)
from services.predictor.features import EmbedderConfig, F32Array
from services.predictor.model import FittedModel, LabeledSet, ModelConfig, save_artifact
from services.predictor.pipeline import (
    Caches,
    Candidate,
    embed_examples,
    fit_projections,
    labeled,
    select_and_fit,
)
from services.predictor.rows import Example
from shared.settings import DEFAULT_CACHE_DIR, REPO_ROOT

log = logging.getLogger("magnus.predictor.train")
CACHE_ARTIFACT = DEFAULT_CACHE_DIR / "predictor" / "predictor.npz"
COMMITTED_ARTIFACT = REPO_ROOT / "models" / "predictor" / "predictor.npz"
COMMIT_LIMIT_BYTES = 2_000_000


@dataclass(frozen=True)
class Built:
    model: FittedModel
    candidates: list[Candidate]
    sets: dict[str, LabeledSet]  # by split, embeddings compressed with the model's projections
    examples: dict[str, list[Example]]
    embed_s: float
    fit_s: float
    cached_vectors: int  # input vectors found in the on-disk cache of earlier runs


def embedding_cache_file(config: EmbedderConfig) -> Path:
    window = "" if config.window == "head" else f"-{config.window}"
    return DEFAULT_CACHE_DIR / "predictor" / \
        f"embeddings-{config.model}-{config.max_seq_length}-{config.dtype}{window}.npz"


def build(examples: list[Example], embedder_config: EmbedderConfig | None = None,
          config: ModelConfig | None = None, use_disk_cache: bool = True,
          torch_threads: int = 1) -> Built:
    """Embed every split once (the offline commands keep vectors on disk between runs), fit the
    projections on train, then select and fit on train / val."""
    from services.predictor.features import SentenceEmbedder

    embedder_config = embedder_config or EmbedderConfig()
    config = config or ModelConfig()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    embedder = SentenceEmbedder(embedder_config)
    caches = Caches.new(input_capacity=10 * max(len(examples), 1000))
    cache_file = embedding_cache_file(embedder_config)
    cached = 0
    if use_disk_cache:
        cached = load_cache_file(caches.input, cache_file)
        load_cache_file(caches.app, cache_file.with_name(cache_file.stem + "-apps.npz"))
    t0 = time.perf_counter()
    splits = {s: by_split(examples, s) for s in ("train", "val", "test", "unseen")}
    raw: dict[str, tuple[F32Array, F32Array]] = {
        s: embed_examples(rows, embedder, caches) for s, rows in splits.items()}
    embed_s = time.perf_counter() - t0
    if use_disk_cache:
        save_cache_file(caches.input, cache_file)
        save_cache_file(caches.app, cache_file.with_name(cache_file.stem + "-apps.npz"))
    if not splits["train"]:
        raise SystemExit("no profiled training rows yet")
    app_proj, user_proj = fit_projections(splits["train"], *raw["train"], config)
    sets = {s: labeled(rows, *raw[s], app_proj, user_proj) for s, rows in splits.items()}
    t1 = time.perf_counter()
    model, candidates = select_and_fit(sets["train"], sets["val"], app_proj, user_proj,
                                       embedder, config)
    return Built(model, candidates, sets, splits, embed_s, time.perf_counter() - t1, cached)


def write_artifact(model: FittedModel, out: Path | None) -> list[Path]:
    """The artifact under .cache/ (or `out`); also under models/ when small enough to commit."""
    written = [save_artifact(model, out or CACHE_ARTIFACT)]
    if out is None and written[0].stat().st_size < COMMIT_LIMIT_BYTES:
        written.append(save_artifact(model, COMMITTED_ARTIFACT))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=None,
                        help="profiled lengths (default: the final profile, else the partial one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write only here instead of .cache/predictor (+ models/predictor)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="embedder threads (0: torch default); 1 is faster beside busy cores")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = args.profile or default_profile_path()
    examples = load_examples(profile)
    log.info("%d profiled examples from %s", len(examples), profile)
    built = build(examples, torch_threads=args.torch_threads)
    for c in built.candidates:
        log.info("candidate objective=%s user_history=%s val MAE %.1f", c.objective,
                 c.user_history, c.val_mae)
    m = built.model
    log.info("chose %s (objective=%s, user_history=%s); val p90 coverage %.3f", m.version,
             m.config.objective, m.config.user_history, m.holdout_coverage)
    for path in write_artifact(m, args.out):
        log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
