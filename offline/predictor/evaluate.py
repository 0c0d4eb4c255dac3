"""Evaluate the predictor and its baselines on the test split (seen apps) and held-out apps.

    python -m offline.predictor.evaluate [--profile PATH] [--write-artifact]

Trains on train, selects and calibrates on val (exactly as `offline.predictor.train`), then
reports MAE, median absolute error, Kendall tau (across the mix and within apps), Acc-50 and p90
coverage (overall and on long-output apps) per app family and overall for every model, the noise
floor where prompts were resampled, and unseen apps after their first 10 observed lengths;
prints the tables, writes results/predictor_eval.json and renders docs/predictor.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from offline.predictor import report
from offline.predictor.baselines import (
    LONG_APP_MEAN_TOKENS,
    LinearBaseline,
    MeanBaseline,
    Metrics,
    PairwiseRanker,
    app_mean_oracle,
    calibrated_upper,
    clamp_arrays,
    fit_forest,
    long_output_rows,
    metrics,
    noise_floor,
)
from offline.predictor.dataset import (
    PROFILE_MAX_TOKENS,
    default_profile_path,
    load_examples,
    load_resamples,
)
from offline.predictor.report import CHOSEN, MODELS, N_OBSERVED, NOISE_FLOOR, TODAY, table_lines
from offline.predictor.train import Built, build, write_artifact
from offline.workload.catalog import FAMILIES
from services.predictor.features import EmbedderConfig, F32Array, FloatArray, fit_history, fold_of
from services.predictor.model import LabeledSet, finish, training_matrix
from services.predictor.rows import PredictRow
from shared.settings import REPO_ROOT

log = logging.getLogger("magnus.predictor.evaluate")
Predictor = Callable[[LabeledSet], FloatArray]


def _families(built: Built, split: str) -> list[str]:
    return [e.family for e in built.examples[split]]


def _timed(fn: Callable[[], tuple[FloatArray, FloatArray]], n: int
           ) -> tuple[tuple[FloatArray, FloatArray], float]:
    """The prediction and how many rows per second it made (after embedding)."""
    t0 = time.perf_counter()
    out = fn()
    return out, n / max(time.perf_counter() - t0, 1e-9)


def observed_protocol(built: Built, n_observed: int = N_OBSERVED, min_scored: int = 4
                      ) -> dict[str, Any]:
    """Unseen apps after their first `n_observed` lengths: per unseen app with enough rows, the
    first `n_observed` by id hash are revealed (as the first completions an online service would
    see), the rest scored. The per-app mean of the revealed lengths is the baseline a model that
    only counts would tie; the model gets the same lengths as app history (no retrain), as a
    serving model does once they are in its table."""
    m, s, train = built.model, built.sets["unseen"], built.sets["train"]
    app_ids = np.asarray(s.app_ids, dtype=np.str_)
    rank = np.array([fold_of(str(r), 1_000_000) for r in s.request_ids], dtype=np.int64)
    revealed = np.zeros(len(s), dtype=bool)
    scored = np.zeros(len(s), dtype=bool)
    for app in np.unique(app_ids):
        rows = np.flatnonzero(app_ids == app)
        if len(rows) < n_observed + min_scored:
            continue
        first = rows[np.argsort(rank[rows], kind="stable")[:n_observed]]
        revealed[first] = True
        scored[rows] = True
    scored &= ~revealed
    if not scored.any():
        return {"n_observed": n_observed, "n_apps": 0, "n_scored": 0, "models": {}}
    shown, target = s.take(revealed), s.take(scored)
    keys = [str(a) for a in train.app_ids] + [str(a) for a in shown.app_ids]
    table = fit_history(keys, np.concatenate([train.generated, shown.generated]),
                        np.concatenate([train.capped, shown.capped]),
                        m.app_history.prior_strength)
    observed_model = replace(m, app_history=table)
    means = {str(a): float(np.mean(shown.generated[shown.app_ids == a]))
             for a in np.unique(shown.app_ids)}
    val = built.sets["val"]
    app_mean = MeanBaseline.fit(list(train.app_ids), train.generated, per_app=True)
    base_point = np.array([means[str(a)] for a in target.app_ids], dtype=np.float64)
    base_upper = calibrated_upper(base_point, app_mean.predict(list(val.app_ids)), val.generated)
    caps = np.full(len(target), PROFILE_MAX_TOKENS, dtype=np.int64)
    long_rows = long_output_rows(list(target.app_ids), target.generated)
    runs = {
        f"per-app-mean of {n_observed} observed": (base_point, base_upper),
        f"xgboost with {n_observed} observed": observed_model.predict_set(target),
        "xgboost, none observed": m.predict_set(target),
    }
    return {
        "n_observed": n_observed, "n_apps": len(means), "n_scored": int(scored.sum()),
        "models": {name: asdict(metrics(target.generated, *clamp_arrays(*pu, caps),
                                        target.capped, list(target.app_ids), long_rows))
                   for name, pu in runs.items()},
    }


def _unbounded(m: Metrics) -> dict[str, Any]:
    """A row with no upper bound: coverage is not what it measures."""
    return {**asdict(m), "p90_coverage": None, "p90_coverage_long": None}


def continuations(point: FloatArray, upper: FloatArray, y: FloatArray, max_tokens: int
                  ) -> dict[str, Any]:
    """The remaining length of requests that outran their first run: a run is capped at the
    upper bound, so a request longer than it is requeued with `upper` tokens generated. Scores
    `finish` (the remaining length given length > tokens so far, what the service predicts for a
    continuation) against two naive answers: the original estimate again, and the original
    estimate minus what is already generated (floored at 1)."""
    cont = (y > upper) & (upper < max_tokens)
    if not cont.any():
        return {"n": 0}
    so_far = upper[cont]
    left = y[cont] - so_far
    rows = [finish(float(p), float(u), PredictRow("", "", "", "", 1, max_tokens, int(g)))
            for p, u, g in zip(point[cont], upper[cont], so_far, strict=True)]
    pred = np.array([r[0] for r in rows], dtype=np.float64)
    bound = np.array([r[1] for r in rows], dtype=np.float64)
    again = np.minimum(point[cont], max_tokens - so_far)
    minus = np.maximum(point[cont] - so_far, 1.0)
    return {
        "n": int(cont.sum()), "share": float(cont.mean()),
        "mae_conditional": float(np.mean(np.abs(pred - left))),
        "mae_original_again": float(np.mean(np.abs(again - left))),
        "mae_original_minus_so_far": float(np.mean(np.abs(minus - left))),
        "p90_coverage_conditional": float(np.mean(left <= bound)),
        "mean_true_remaining": float(left.mean()),
    }


def evaluate(built: Built, today: Built | None = None) -> dict[str, Any]:
    """Every model of `report.MODELS` on the test and unseen splits. `built` is the chosen model
    (its features also feed the random forest and the pairwise ranker); `today` the model it
    replaces, evaluated on its own features."""
    m = built.model
    train, val = built.sets["train"], built.sets["val"]
    t0 = time.perf_counter()
    x_train, _, _, _ = training_matrix(train, m.config)
    forest = fit_forest(x_train, train.generated, threads=2)
    forest_s = time.perf_counter() - t0

    def feats(s: LabeledSet) -> F32Array:
        return m.features(s.app_emb, s.user_emb, list(s.app_ids), list(s.user_ids),
                          s.input_tokens)

    ranker = PairwiseRanker.fit(x_train, train.generated, [str(r) for r in train.request_ids],
                                feats(val), val.generated)
    app_mean = MeanBaseline.fit(list(train.app_ids), train.generated, per_app=True)
    global_mean = MeanBaseline.fit(list(train.app_ids), train.generated, per_app=False)
    linear = LinearBaseline.fit(list(train.app_ids), train.input_tokens, train.generated)

    points: dict[str, Predictor] = {
        "random-forest": lambda s: np.asarray(forest.predict(feats(s)), dtype=np.float64),
        "xgboost-pairwise": lambda s: ranker.predict(feats(s)),
        "per-app-linear": lambda s: linear.predict(list(s.app_ids), s.input_tokens),
        "per-app-mean": lambda s: app_mean.predict(list(s.app_ids)),
        "global-mean": lambda s: global_mean.predict(list(s.app_ids)),
    }

    def predict(name: str, split: str) -> tuple[FloatArray, FloatArray]:
        if name == CHOSEN:
            return m.predict_set(built.sets[split])
        if name == TODAY:
            assert today is not None
            return today.model.predict_set(today.sets[split])
        point = points[name](built.sets[split])
        return point, calibrated_upper(point, points[name](val), val.generated)

    resamples = load_resamples()
    out: dict[str, Any] = {"splits": {}, "cap": {}, "noise_floor": {}, "predict_per_s": {},
                           "long_app_mean_tokens": LONG_APP_MEAN_TOKENS,
                           "resampled_prompts": len(resamples),
                           "resamples_per_prompt": max((len(v) for v in resamples.values()),
                                                       default=0)}
    max_tokens = built.examples["train"][0].max_tokens if built.examples["train"] else 512
    names = [n for n in MODELS if n != NOISE_FLOOR and (n != TODAY or today is not None)]
    for split in ("test", "unseen"):
        s = built.sets[split]
        if today is not None:
            assert list(today.sets[split].request_ids) == list(s.request_ids)
        fams = np.array(_families(built, split))
        caps = np.full(len(s), max_tokens, dtype=np.int64)
        app_ids = list(s.app_ids)
        long_rows = long_output_rows(app_ids, s.generated)
        table: dict[str, dict[str, dict[str, Any]]] = {}
        clamped: dict[str, tuple[FloatArray, FloatArray]] = {}
        for name in names:
            (raw_point, raw_upper), per_s = _timed(partial(predict, name, split), len(s))
            if split == "test":
                out["predict_per_s"][name] = per_s
            point, upper = clamped[name] = clamp_arrays(raw_point, raw_upper, caps)
            groups = [f for f in FAMILIES if (fams == f).any()] + ["overall"]
            table[name] = {}
            for g in groups:
                sel = np.ones(len(s), bool) if g == "overall" else fams == g
                table[name][g] = asdict(metrics(
                    s.generated[sel], point[sel], upper[sel], s.capped[sel],
                    [a for a, k in zip(app_ids, sel, strict=True) if k], long_rows[sel]))
        oracle = app_mean_oracle(app_ids, s.generated)
        out.setdefault("app_mean_oracle", {})[split] = _unbounded(metrics(
            s.generated, oracle, oracle, s.capped, app_ids, long_rows))
        has, floor = noise_floor(resamples, [str(r) for r in s.request_ids])
        if has.any():
            sub_ids = [a for a, k in zip(app_ids, has, strict=True) if k]
            table[NOISE_FLOOR] = {"overall": _unbounded(metrics(
                s.generated[has], floor, floor, s.capped[has], sub_ids, long_rows[has]))}
            _, floor_median = noise_floor(resamples, [str(r) for r in s.request_ids], "median")
            out.setdefault("noise_floor_median", {})[split] = _unbounded(metrics(
                s.generated[has], floor_median, floor_median, s.capped[has], sub_ids,
                long_rows[has]))
            out.setdefault("app_mean_oracle_resampled_rows", {})[split] = _unbounded(metrics(
                s.generated[has], oracle[has], oracle[has], s.capped[has], sub_ids,
                long_rows[has]))
            out["noise_floor"][split] = {
                name: asdict(metrics(s.generated[has], clamped[name][0][has],
                                     clamped[name][1][has], s.capped[has], sub_ids,
                                     long_rows[has]))
                for name in names}
        out["splits"][split] = table
        out.setdefault("continuations", {})[split] = continuations(
            *clamped[CHOSEN], s.generated, max_tokens)
    out["observed"] = observed_protocol(built)
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
    # The model this one replaced (inputs embedded by their head only), side by side.
    before = replace(EmbedderConfig(), window="head")
    today = None if before == built.model.embedder else \
        build(examples, before, torch_threads=args.torch_threads)
    result = evaluate(built, today)
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
        today=None if today is None else {"model_version": today.model.version,
                                          "embedder": asdict(today.model.embedder)},
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
