"""Evaluate the predictor and its baselines on the test split (seen apps) and held-out apps.

    python -m offline.predictor.evaluate [--profile PATH] [--write-artifact]

Trains on train, selects and calibrates on val (exactly as `offline.predictor.train`), then
reports MAE, median absolute error, Kendall tau, Acc-50 and p90 coverage per app family and
overall for every model; prints the tables, writes results/predictor_eval.json and renders
docs/predictor.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from offline.predictor import report
from offline.predictor.baselines import (
    LinearBaseline,
    MeanBaseline,
    calibrated_upper,
    clamp_arrays,
    fit_forest,
    metrics,
)
from offline.predictor.dataset import default_profile_path, load_examples
from offline.predictor.report import MODELS, table_lines
from offline.predictor.train import Built, build, write_artifact
from offline.workload.catalog import FAMILIES
from services.predictor.features import FloatArray
from services.predictor.model import LabeledSet, training_matrix
from shared.settings import REPO_ROOT

log = logging.getLogger("magnus.predictor.evaluate")
Predictor = Callable[[LabeledSet], FloatArray]


def _families(built: Built, split: str) -> list[str]:
    return [e.family for e in built.examples[split]]


def evaluate(built: Built) -> dict[str, Any]:
    m = built.model
    train, val = built.sets["train"], built.sets["val"]
    t0 = time.perf_counter()
    x_train, _, _, _ = training_matrix(train, m.config)
    forest = fit_forest(x_train, train.generated, threads=2)
    forest_s = time.perf_counter() - t0
    app_mean = MeanBaseline.fit(list(train.app_ids), train.generated, per_app=True)
    global_mean = MeanBaseline.fit(list(train.app_ids), train.generated, per_app=False)
    linear = LinearBaseline.fit(list(train.app_ids), train.input_tokens, train.generated)

    def forest_predict(s: LabeledSet) -> FloatArray:
        x = m.features(s.app_emb, s.user_emb, list(s.app_ids), list(s.user_ids), s.input_tokens)
        return np.asarray(forest.predict(x), dtype=np.float64)

    points: dict[str, Predictor] = {
        "random-forest": forest_predict,
        "per-app-linear": lambda s: linear.predict(list(s.app_ids), s.input_tokens),
        "per-app-mean": lambda s: app_mean.predict(list(s.app_ids)),
        "global-mean": lambda s: global_mean.predict(list(s.app_ids)),
    }

    def predict(name: str, s: LabeledSet) -> tuple[FloatArray, FloatArray]:
        if name == "xgboost":
            return m.predict_set(s)
        point = points[name](s)
        return point, calibrated_upper(point, points[name](val), val.generated)

    out: dict[str, Any] = {"splits": {}, "cap": {}}
    max_tokens = built.examples["train"][0].max_tokens if built.examples["train"] else 512
    for split in ("test", "unseen"):
        s = built.sets[split]
        fams = np.array(_families(built, split))
        caps = np.full(len(s), max_tokens, dtype=np.int64)
        table: dict[str, dict[str, dict[str, Any]]] = {}
        for name in MODELS:
            point, upper = clamp_arrays(*predict(name, s), caps)
            groups = [f for f in FAMILIES if (fams == f).any()] + ["overall"]
            table[name] = {}
            for g in groups:
                sel = np.ones(len(s), bool) if g == "overall" else fams == g
                table[name][g] = asdict(metrics(s.generated[sel], point[sel], upper[sel],
                                                s.capped[sel]))
        out["splits"][split] = table
    # How often the serving model ran into the cap, per family, over every profiled row.
    all_fams = [e.family for split in built.examples.values() for e in split]
    all_cap = [e.hit_cap for split in built.examples.values() for e in split]
    for f in [*FAMILIES, "overall"]:
        sel = [c for fam, c in zip(all_fams, all_cap, strict=True) if f in (fam, "overall")]
        if sel:
            out["cap"][f] = {"n": len(sel), "share": float(np.mean(sel))}
    out["forest_fit_s"] = forest_s
    return out


def _seq_length_row(b: Built) -> dict[str, Any]:
    """Validation and test MAE of the selected model at one embedder truncation."""
    m = b.model
    out: dict[str, Any] = {"max_seq_length": m.embedder.max_seq_length,
                           "val_mae": min(c.val_mae for c in b.candidates),
                           "embed_s": b.embed_s}
    for split in ("test", "unseen"):
        s = b.sets[split]
        point, _ = m.predict_set(s)
        out[f"{split}_mae"] = float(np.mean(np.abs(np.clip(np.round(point), 1, None)
                                                   - s.generated))) if len(s) else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--write-artifact", action="store_true",
                        help="also write the evaluated model as the artifact (as train does)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/predictor.md")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--compare-seq-lengths", default="",
                        help="comma-separated embedder truncations to compare (e.g. 32,128)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    profile = args.profile or default_profile_path()
    examples = load_examples(profile)
    built = build(examples, torch_threads=args.torch_threads)
    result = evaluate(built)
    m = built.model
    result.update(
        profile=str(profile.relative_to(REPO_ROOT)) if profile.is_absolute() and
        profile.is_relative_to(REPO_ROOT) else str(profile),
        profile_final=not profile.name.endswith(".partial.jsonl"),
        n_examples=len(examples),
        n_by_split={s: len(v) for s, v in built.examples.items()},
        model_version=m.version, objective=m.config.objective,
        user_history=m.config.user_history, app_dims=m.config.app_dims,
        user_dims=m.config.user_dims, embedder=asdict(m.embedder),
        prior_strength_app=m.app_history.prior_strength,
        prior_strength_user=None if m.user_history is None else m.user_history.prior_strength,
        val_coverage=m.holdout_coverage, upper_log_offset=m.upper_log_offset,
        val_coverage_unseen=m.holdout_coverage_unseen,
        upper_log_offset_unseen=m.upper_log_offset_unseen, app_dropout=m.config.app_dropout,
        neighbours=m.config.neighbours,
        point_trees=m.point.num_boosted_rounds(), upper_trees=m.upper.num_boosted_rounds(),
        candidates=[asdict(c) for c in built.candidates],
        embed_s=built.embed_s, fit_s=built.fit_s, total_s=time.perf_counter() - t0,
        cached_vectors=built.cached_vectors,
    )
    if args.compare_seq_lengths:
        rows = [_seq_length_row(built)] + [
            _seq_length_row(build(examples, replace(m.embedder, max_seq_length=int(n)),
                                  torch_threads=args.torch_threads))
            for n in args.compare_seq_lengths.split(",") if n.strip()]
        report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        report.SEQ_LENGTH_JSON.write_text(json.dumps(
            {"profile": result["profile"], "n_examples": len(examples), "rows": rows},
            indent=2) + "\n")
    if args.write_artifact:
        result["artifacts"] = [str(p) for p in write_artifact(m, None)]
    report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report.EVAL_JSON.write_text(json.dumps(result, indent=2, default=float) + "\n")
    for split in ("test", "unseen"):
        groups = [*[f for f in FAMILIES if f in result["splits"][split]["xgboost"]], "overall"]
        print(f"\n## {split}")
        print("\n".join(table_lines(result["splits"][split], groups)))
    print(f"\nprofile {result['profile']} ({len(examples)} rows); model {m.version}; "
          f"{result['total_s']:.0f}s")
    if not args.no_doc:
        report.render()
        print(f"wrote {report.DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
