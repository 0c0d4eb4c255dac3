"""The profiled training data joined to the committed workload, and the on-disk embedding cache.

Training data is the serving model's own generated lengths (`offline.workload.profile`), joined to
the workload by request id for the app instruction and the user input. The row types themselves
are the service's (`services/predictor/rows.py`).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from offline.workload.catalog import DEFAULT_DIR, load_apps, load_records
from services.predictor.features import EmbeddingCache
from services.predictor.rows import Example
from shared.settings import REPO_ROOT

PROFILE_DIR = REPO_ROOT / "data" / "profiles"
PROFILE_FINAL = PROFILE_DIR / "smollm2-135m-instruct.jsonl.gz"
PROFILE_PARTIAL = PROFILE_DIR / "smollm2-135m-instruct.partial.jsonl"
# More samples of some profiled prompts (`offline.workload.profile --resample`): the noise floor.
RESAMPLE_PROFILE = PROFILE_DIR / "smollm2-135m-instruct.resample.jsonl.gz"
# The cap the profile ran under (its .meta.json says so when present).
PROFILE_MAX_TOKENS = 512


def default_profile_path() -> Path:
    """The final profile when profiling has finished, else the partial file it appends to."""
    return PROFILE_FINAL if PROFILE_FINAL.exists() else PROFILE_PARTIAL


def _lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def profile_max_tokens(path: Path) -> int:
    meta = path.parent / (path.name.split(".")[0] + ".meta.json")
    if meta.exists():
        return int(json.loads(meta.read_text()).get("max_tokens", PROFILE_MAX_TOKENS))
    return PROFILE_MAX_TOKENS


def load_examples(profile: Path | None = None, workload: Path = DEFAULT_DIR) -> list[Example]:
    """Profiled lengths joined to the workload's instruction and input, sorted by request id.

    A line cut short by a profile still being written is skipped, and a request profiled twice
    keeps its last line (as the profiler's own finalize does)."""
    path = profile or default_profile_path()
    max_tokens = profile_max_tokens(path)
    apps = {a.app_id: a for a in load_apps(workload)}
    records = {r.request_id: r for r in load_records(workload)}
    rows: dict[str, dict[str, object]] = {}
    for line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[str(row["request_id"])] = row
    out: list[Example] = []
    for rid in sorted(rows):
        row = rows[rid]
        rec = records.get(rid)
        if rec is None:
            continue
        app = apps[rec.app_id]
        out.append(Example(
            app_id=rec.app_id, user_id=rec.user_id, instruction=app.instruction, input=rec.input,
            input_tokens=int(str(row["input_tokens"])), max_tokens=max_tokens, request_id=rid,
            generated_tokens=int(str(row["generated_tokens"])),
            hit_cap=row["finish_reason"] == "length", family=app.family, split=rec.split,
        ))
    return out


def load_resamples(path: Path = RESAMPLE_PROFILE) -> dict[str, list[int]]:
    """Request id -> the lengths of its resamples (ids `<request id>#<j>`); empty when the noise
    floor was never measured."""
    out: dict[str, list[int]] = {}
    if not path.exists():
        return out
    for line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        base = str(row["request_id"]).rsplit("#", 1)[0]
        out.setdefault(base, []).append(int(row["generated_tokens"]))
    return out


def by_split(examples: Iterable[Example], *splits: str) -> list[Example]:
    return [e for e in examples if e.split in splits]


def load_cache_file(cache: EmbeddingCache, path: Path) -> int:
    """Fill `cache` from an .npz written by `save_cache_file` (keys are text hashes, no pickle)."""
    if not path.exists():
        return 0
    with np.load(path, allow_pickle=False) as z:
        keys, vectors = z["keys"], z["vectors"]
    cache.put_many([bytes.fromhex(str(k)) for k in keys], vectors)
    return len(keys)


def save_cache_file(cache: EmbeddingCache, path: Path) -> None:
    items = cache.items()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=np.array([k.hex() for k, _ in items]),
             vectors=np.stack([v for _, v in items]) if items else np.zeros((0, 0), np.float32))
    tmp.replace(path)
