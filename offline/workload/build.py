"""Build the committed workload (data/workload) from the third-party corpora in shared/data.

Run ``python -m offline.workload.build``. The output depends only on the input files and
``--seed``: every random choice uses a ``random.Random`` seeded from a string naming its purpose,
files are read in sorted order and gzip headers carry no timestamp, so reruns are byte-identical.
data/README.md documents the rules below (caps, users, splits, held-out apps).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.workload.catalog import (
    APPS_FILE,
    ARRIVALS_FILE,
    FAMILIES,
    REQUESTS_FILE,
    SPLITS,
    App,
    Family,
    Split,
    WorkloadRecord,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "data" / "workload"

# ~500 tokens of input leaves room for the instruction and the output in a 2048-token context.
MAX_INPUT_CHARS = 2000
MAX_OUTPUT_CHARS = 4000
HELD_OUT_FAMILIES: tuple[Family, ...] = ("self_instruct", "t0")
HELD_OUT_FRACTION = 0.1
TRAIN_FRACTION, VAL_FRACTION = 0.8, 0.1  # the rest is test
LENGTH_HABIT_NOISE = 0.5  # std of the noise on log(input length): habits are tendencies
OUTPUT_FILES = (APPS_FILE, REQUESTS_FILE, ARRIVALS_FILE)
LANGUAGES = {"de": "German", "fr": "French", "cs": "Czech"}
REPLY = " Reply with the {} only."
# fmt: off
# Caps keep the core apps comparable in size and the committed files small.
CAPS: dict[Family, int] = {"detox": 3000, "code_translation": 3000, "bug_fixing": 3000,
                           "translation": 2000, "t0": 60}
UPSTREAM = {  # key -> (source, licence), as in shared/data/MANIFEST.md
    "jfleg": ("JFLEG (keisks/jfleg ee06ff80)", "CC BY-NC-SA 4.0"),
    "paradetox": ("ParaDetox (s-nlp/paradetox d97b17d0)", "CC0 1.0"),
    "java_cs": ("CodeXGLUE code-to-code-trans java-cs (microsoft/CodeXGLUE ac74a628)", "MIT"),
    "refine": ("CodeXGLUE code-refinement small (microsoft/CodeXGLUE ac74a628)", "MIT"),
    "multi30k": ("Multi30k task 1 (multi30k/dataset)", "research use (Flickr30k captions)"),
    "self_instruct": ("self-instruct user_oriented_instructions (yizhongw/self-instruct 0b26ccaa)",
                      "Apache-2.0"),
    "t0": ("P3/T0 templates via yizhongw/self-instruct t0_train_50k_per_template", "Apache-2.0"),
}
T0_DATASETS = (  # source dataset = the one whose name prefixes the template file name
    "ag_news", "amazon_polarity", "app_reviews", "cnn_dailymail_3_0_0", "common_gen", "dream",
    "gigaword", "glue_qqp", "imdb", "kilt_tasks_hotpotqa", "multi_news", "qasc",
    "rotten_tomatoes", "social_i_qa", "trec", "wiki_bio", "wiki_hop_original", "wiki_qa",
    "yelp_review_full",
)
# fmt: on

Pair = tuple[str, str]  # (user input, reference output)
Source = tuple[App, list[Pair]]


def _rng(seed: int, *purpose: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed, so this is stable across processes.
    return random.Random(":".join([str(seed), *purpose]))


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    # split("\n"), not splitlines(): U+2028 and friends inside a line must not break alignment.
    return [line.rstrip("\r") for line in text.removesuffix("\n").split("\n")]


def _parallel(src: Path, tgt: Path) -> list[Pair]:
    return list(zip(_lines(src), _lines(tgt), strict=True))


def _app(app_id: str, name: str, family: Family, instruction: str, upstream: str) -> App:
    source, licence = UPSTREAM[upstream]
    return App(
        app_id=app_id,
        name=name,
        family=family,
        instruction=instruction,
        source=source,
        licence=licence,
    )


def _parts(folder: Path, parts: Sequence[str], src: str, tgt: str) -> list[Pair]:
    """Line-aligned pairs of several splits: ``{part}{src}`` / ``{part}{tgt}`` in ``folder``."""
    return [
        pair
        for part in parts
        for pair in _parallel(folder / f"{part}{src}", folder / f"{part}{tgt}")
    ]


def _core_sources(data: Path) -> list[Source]:
    jfleg = _parts(data / "jfleg", ["dev/dev", "test/test"], ".src", ".ref0")
    with (data / "paradetox/paradetox.tsv").open(encoding="utf-8", newline="") as f:
        detox = [(row[0], row[1]) for row in list(csv.reader(f, delimiter="\t"))[1:]]
    java = ".java-cs.txt.java", ".java-cs.txt.cs"
    java_cs = _parts(data / "codexglue_java_cs", ["train", "valid", "test"], *java)
    buggy = ".buggy-fixed.buggy", ".buggy-fixed.fixed"
    bugfix = _parts(data / "codexglue_refine_small", ["valid", "test"], *buggy)
    sources: list[Source] = [
        (_app("grammar-jfleg", "JFLEG grammar correction", "grammar",
              "Correct the grammar of the following sentence." + REPLY.format("corrected sentence"),
              "jfleg"), jfleg),
        (_app("detox-paradetox", "ParaDetox detoxification", "detox",
              "Rewrite the following sentence so that it is polite and not toxic, keeping its "
              "meaning." + REPLY.format("rewritten sentence"), "paradetox"), detox),
        (_app("code-java-cs", "Java to C# translation", "code_translation",
              "Translate the following Java method into equivalent C#." + REPLY.format("C# code"),
              "java_cs"), java_cs),
        (_app("code-bugfix", "Java bug fixing", "bug_fixing",
              "The following Java method contains a bug. Fix it." + REPLY.format("fixed method"),
              "refine"), bugfix),
    ]  # fmt: skip
    for code, language in LANGUAGES.items():
        pairs = _parts(data / "multi30k", ["train", "val", "test_2016_flickr"], ".en.gz",
                       f".{code}.gz")  # fmt: skip
        instruction = f"Translate the following English sentence into {language}."
        app = _app(f"translate-en-{code}", f"English to {language} translation", "translation",
                   instruction + REPLY.format("translation"), "multi30k")  # fmt: skip
        sources.append((app, pairs))
    return sources


def _instances(task: dict[str, Any]) -> list[Pair]:
    return [(str(i["input"]), str(i["output"])) for i in task["instances"]]


def _self_instruct_sources(data: Path) -> list[Source]:
    """One app per motivation_app; see data/README.md for how its several tasks are merged."""
    tasks: dict[str, list[dict[str, Any]]] = {}
    for line in _lines(data / "self_instruct/user_oriented_instructions.jsonl"):
        if line.strip():
            task = json.loads(line)
            tasks.setdefault(task["motivation_app"], []).append(task)
    sources: list[Source] = []
    taken: set[str] = set()
    for name, app_tasks in tasks.items():  # file order, so slug collisions resolve stably
        app_id = base = f"si-{_slug(name)}"
        k = 1
        while app_id in taken:  # "Yelp" / "yelp" and "Wolfram alpha" / "(Wolfram alpha)?"
            k += 1
            app_id = f"{base}-{k}"
        taken.add(app_id)
        # The app instruction is the first task whose instances have an input, so requests of
        # that task are the bare input; other tasks send their own instruction with the input.
        main = next((t for t in app_tasks if any(i.strip() for i, _ in _instances(t))), None)
        fallback = f"You are the assistant of {name}. Do what the user asks."
        instruction = str(main["instruction"]) if main else fallback + REPLY.format("result")
        pairs = [(inp if task is main else f"{task['instruction']}\n\n{inp}", out)
                 for task in app_tasks for inp, out in _instances(task)]  # fmt: skip
        sources.append((_app(app_id, name, "self_instruct", instruction, "self_instruct"), pairs))
    return sources


def _t0_sources(data: Path) -> list[Source]:
    """One app per T0 template; the whole prompt is the user input (it embeds the template)."""
    sources: list[Source] = []
    for path in sorted((data / "t0_templates").glob("*.jsonl")):
        dataset = next((d for d in T0_DATASETS if path.stem.startswith(d + "_")), path.stem)
        template = path.stem.removeprefix(dataset + "_").replace("_", " ").strip()
        pairs = []
        for line in _lines(path):
            if line.strip():
                row = json.loads(line)
                pairs.append(
                    (str(row["prompt"]), str(row["completion"]).removesuffix("<|endoftext|>"))
                )
        instruction = f'Answer the following {dataset} prompt (template "{template}").'
        app = _app(f"t0-{_slug(path.stem)}", path.stem, "t0", instruction + REPLY.format("answer"),
                   "t0")  # fmt: skip
        sources.append((app, pairs))
    return sources


def _select(app: App, pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """Strip, drop empty or oversized pairs, keep a seeded subset (source order) up to the cap."""
    kept = [(i.strip(), o.strip()) for i, o in pairs]
    kept = [
        (i, o)
        for i, o in kept
        if i and o and len(i) <= MAX_INPUT_CHARS and len(o) <= MAX_OUTPUT_CHARS
    ]
    cap = CAPS.get(app.family)
    if cap is not None and len(kept) > cap:
        chosen = _rng(seed, "cap", app.app_id).sample(range(len(kept)), cap)
        kept = [kept[i] for i in sorted(chosen)]
    return kept


def _users(app_id: str, pairs: Sequence[Pair], seed: int) -> list[str]:
    """User ids: a pool of ~sqrt(n) users with Zipf(1) request counts and a length habit."""
    n = len(pairs)
    n_users = max(1, round(math.sqrt(n)))
    weights = [1 / (k + 1) for k in range(n_users)]
    quota = [int(n * w / sum(weights)) for w in weights]
    for k in range(n - sum(quota)):  # remainder (< n_users) to the most popular users
        quota[k] += 1
    # Habit: a hash-derived rank per user; higher-ranked users get the longer inputs, with noise
    # on the length so that the habit is a tendency, not a partition.
    habit_order = sorted(range(n_users), key=lambda k: (_hash01(f"{seed}:{app_id}:u{k}"), k))
    rng = _rng(seed, "users", app_id)
    noisy = [math.log1p(len(i)) + rng.gauss(0.0, LENGTH_HABIT_NOISE) for i, _ in pairs]
    by_length = sorted(range(n), key=lambda i: (noisy[i], i))
    users = [""] * n
    start = 0
    for k in habit_order:
        for i in by_length[start : start + quota[k]]:
            users[i] = f"{app_id}:u{k:03d}"
        start += quota[k]
    return users


def _splits(app: App, n: int, seed: int) -> list[Split]:
    if app.held_out:
        return ["unseen"] * n
    order = list(range(n))
    _rng(seed, "split", app.app_id).shuffle(order)
    n_train, n_val = round(n * TRAIN_FRACTION), round(n * VAL_FRACTION)
    splits: list[Split] = ["test"] * n
    for rank, i in enumerate(order):
        if rank < n_train + n_val:
            splits[i] = "train" if rank < n_train else "val"
    return splits


def _held_out(apps: Sequence[App], seed: int) -> set[str]:
    chosen: set[str] = set()
    for family in HELD_OUT_FAMILIES:
        ids = sorted(
            (a.app_id for a in apps if a.family == family),
            key=lambda a: (_hash01(f"{seed}:held-out:{a}"), a),
        )
        chosen.update(ids[: round(len(ids) * HELD_OUT_FRACTION)])
    return chosen


def build(data: Path, seed: int) -> tuple[list[App], list[WorkloadRecord]]:
    sources = _core_sources(data) + _self_instruct_sources(data) + _t0_sources(data)
    selected = [(app, _select(app, pairs, seed)) for app, pairs in sources]
    selected = [(app, pairs) for app, pairs in selected if pairs]  # an app needs requests
    held_out = _held_out([app for app, _ in selected], seed)
    apps: list[App] = []
    records: list[WorkloadRecord] = []
    for draft, pairs in selected:
        app = draft.model_copy(update={"held_out": draft.app_id in held_out})
        apps.append(app)
        users, splits = _users(app.app_id, pairs, seed), _splits(app, len(pairs), seed)
        records += [
            WorkloadRecord(
                request_id=f"{app.app_id}:{n}",
                app_id=app.app_id,
                user_id=users[n],
                input=inp,
                reference_output=out,
                split=splits[n],
            )
            for n, (inp, out) in enumerate(pairs)
        ]
    return apps, records


def _azure_csv(data: Path) -> str:
    """Arrival offsets (s, from the first arrival) and token counts of the Azure 2023 trace."""
    with (data / "azure_trace/AzureLLMInferenceTrace_conv_int.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    t0 = min(int(r["TIMESTAMP"]) for r in rows)
    lines = ["arrival_s,context_tokens,generated_tokens"]
    lines += [
        f"{(int(r['TIMESTAMP']) - t0) / 1000:.3f},{int(r['ContextTokens'])},"
        f"{int(r['GeneratedTokens'])}"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def _write_gzip(path: Path, text: str) -> None:
    # mtime=0 and an empty file name keep the gzip header identical between builds.
    with path.open("wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        gz.write(text.encode("utf-8"))


def _summary(apps: Sequence[App], records: Sequence[WorkloadRecord], out: Path) -> str:
    family_of = {a.app_id: a.family for a in apps}
    head = f"{'family':<17}{'apps':>6}{'held':>6}" + "".join(f"{s:>8}" for s in SPLITS)
    rows = [head, "-" * len(head)]
    groups: list[tuple[str, tuple[Family, ...]]] = [(f, (f,)) for f in FAMILIES]
    for label, fams in [*groups, ("total", FAMILIES)]:
        n_apps = sum(a.family in fams for a in apps)
        n_held = sum(a.family in fams and a.held_out for a in apps)
        per_split = Counter(r.split for r in records if family_of[r.app_id] in fams)
        cells = "".join(f"{per_split[s]:>8}" for s in SPLITS)
        rows.append(f"{label:<17}{n_apps:>6}{n_held:>6}{cells}")
    rows.append("(apps, held-out apps, then records per split)")
    rows += [f"{name}: {(out / name).stat().st_size / 1e6:.2f} MB" for name in OUTPUT_FILES]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="third-party corpora")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data: Path = args.data
    out: Path = args.out
    if not data.is_dir():
        parser.error(f"--data {data} is not a folder")
    apps, records = build(data, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / APPS_FILE).write_text(
        "".join(a.model_dump_json() + "\n" for a in apps), encoding="utf-8"
    )
    _write_gzip(out / REQUESTS_FILE, "".join(r.model_dump_json() + "\n" for r in records))
    _write_gzip(out / ARRIVALS_FILE, _azure_csv(data))
    print(_summary(apps, records, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
