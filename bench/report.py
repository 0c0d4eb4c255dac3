"""docs/benchmarks.md's generated blocks, from the results the benchmark commands wrote.

Reads results/real_stack.json (the earlier default real-stack run), and when they exist
results/load_sweep.json (the default load sweep),
results/real_sweep.json (the real load sweep), results/sim_real_default.json (the simulator on
the same configuration) and results/sim_scale.json (8 and 64 simulated GPUs). Every figure in the
blocks is computed here from those files; the prose around the blocks is hand-written.

    python -m bench.report [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.metrics import RunSummary, table

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"
_SUMMARY_FIELDS = set(RunSummary.__dataclass_fields__)

Rows = Sequence[dict[str, Any]]


def summaries(rows: Rows) -> list[RunSummary]:
    return [RunSummary(**{k: v for k, v in r.items() if k in _SUMMARY_FIELDS}) for r in rows]


def pick(rows: Rows, policy: str, mode: str, rate: float | None = None) -> dict[str, Any] | None:
    """The row of (policy, mode), at `rate` or else the highest rate run."""
    match = [r for r in rows if r["policy"] == policy and r["mode"] == mode
             and (rate is None or r["rate_per_s"] == rate)]
    return max(match, key=lambda r: r["rate_per_s"]) if match else None


@dataclass(frozen=True)
class Target:
    name: str
    numerator: tuple[str, str]  # (policy, mode)
    denominator: tuple[str, str]
    metric: str  # a RunSummary field
    bound: float
    at_least: bool  # True: ratio >= bound is met; False: ratio <= bound is met

    def ratio(self, rows: Rows) -> float | None:
        a, b = pick(rows, *self.numerator), pick(rows, *self.denominator)
        if a is None or b is None or not b[self.metric]:
            return None
        return float(a[self.metric]) / float(b[self.metric])

    def met(self, ratio: float | None) -> str:
        if ratio is None:
            return "not run"
        ok = ratio >= self.bound if self.at_least else ratio <= self.bound
        return "met" if ok else "NOT met"

    @property
    def wanted(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:g}"


TARGETS = [
    Target("static: magnus / fcfs-fixed request throughput", ("magnus", "static"),
           ("fcfs-fixed", "static"), "request_throughput", 3.3, True),
    Target("static: magnus / fcfs-fixed mean response time", ("magnus", "static"),
           ("fcfs-fixed", "static"), "mean_response_s", 0.10, False),
    Target("continuous: magnus / continuous-fcfs mean response time", ("magnus", "continuous"),
           ("continuous-fcfs", "continuous"), "mean_response_s", 0.35, False),
    Target("continuous: magnus / continuous-fcfs request throughput", ("magnus", "continuous"),
           ("continuous-fcfs", "continuous"), "request_throughput", 1.0, True),
    Target("continuous: magnus / continuous-fcfs p99 response time", ("magnus", "continuous"),
           ("continuous-fcfs", "continuous"), "p99_response_s", 1.2, False),
    Target("static: magnus / magnus-oracle request throughput", ("magnus", "static"),
           ("magnus-oracle", "static"), "request_throughput", 0.9, True),
    Target("static: magnus / magnus-oracle mean response time", ("magnus", "static"),
           ("magnus-oracle", "static"), "mean_response_s", 1.1, False),
    Target("continuous: magnus / magnus-oracle request throughput", ("magnus", "continuous"),
           ("magnus-oracle", "continuous"), "request_throughput", 0.9, True),
    Target("continuous: magnus / magnus-oracle mean response time", ("magnus", "continuous"),
           ("magnus-oracle", "continuous"), "mean_response_s", 1.1, False),
]


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _sim_scale_rows(scale: dict[str, Any], gpus: int) -> list[dict[str, Any]]:
    return [r for r in scale["rows"] if r["gpus"] == gpus]


def targets_block(real: dict[str, Any], scale: dict[str, Any] | None) -> str:
    columns: list[tuple[str, Rows]] = [("real stack, 1 engine", real["rows"])]
    if scale is not None:
        for gpus in sorted({int(r["gpus"]) for r in scale["rows"]}):
            columns.append((f"sim, {gpus} GPUs", _sim_scale_rows(scale, gpus)))
    head = "| target | wanted | " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|---|---|" + "---|" * len(columns)]
    for t in TARGETS:
        cells = []
        for _, rows in columns:
            ratio = t.ratio(rows)
            cells.append("-" if ratio is None else f"{ratio:.2f} ({t.met(ratio)})")
        lines.append(f"| {t.name} | {t.wanted} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def real_block(real: dict[str, Any]) -> str:
    args = real["args"]
    info = (f"{args['requests']} requests, {args['arrivals']} arrivals at {args['rates']}/s, "
            f"max_tokens {args['max_tokens']}, fixed batch {args['batch_size']}, seed "
            f"{args['seed']}; {real['machine']['cpus']} CPUs, vllm {real['machine']['vllm']}; "
            f"finished {real['finished_at']}, wall time {real['wall_s'] / 60:.1f} min.\n\n")
    return info + table(summaries(real["rows"]))


def validation_block(sim: dict[str, Any] | None, real: dict[str, Any]) -> str:
    if sim is None or not sim.get("comparison"):
        return "(no results/sim_real_default.json compared with this run: run `python -m bench`)\n"
    rows = sim["comparison"]
    ok = sum(1 for r in rows if r["within_15pct"])

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| policy | mode | sim / real throughput | sim / real mean response | within 15% | "
             "engine profile alone: throughput | mean response |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['mode']} | {r['throughput_ratio']:.2f} | "
              f"{r['mean_response_ratio']:.2f} | {'yes' if r['within_15pct'] else 'no'} | "
              f"{cell(r.get('engine_only_throughput_ratio'))} | "
              f"{cell(r.get('engine_only_mean_response_ratio'))} |" for r in rows]
    judged = {r.get("lengths", "profiled") for r in rows}
    return (f"Stack slowdown {sim.get('stack_slowdown', 1.0):.2f} (fitted on the fcfs-fixed run's "
            "throughput alone).\n\n" + "\n".join(lines)
            + f"\n\n{ok} of {len(rows)} runs within 15% on both measures (judged on "
            f"{' and '.join(sorted(judged))} lengths).\n")


def sweep_block(sweep: dict[str, Any] | None) -> str:
    if sweep is None:
        return "(not run yet: `make bench-sweep` writes results/real_sweep.json)\n"
    args = sweep["args"]
    return (f"{args['requests']} requests per run, {args['arrivals']} arrivals; finished "
            f"{sweep['finished_at']}, wall time {sweep['wall_s'] / 60:.1f} min.\n\n"
            + table(summaries(sweep["rows"])))


# Issue 11's targets on the load sweep: (name, numerator policy, denominator policy, metric,
# bound, at_least), each judged on the rows of one point (one run of arrivals, same requests).
LoadTarget = tuple[str, str, str, str, float, bool]
LOAD_TARGETS_CONTINUOUS: list[LoadTarget] = [
    ("magnus / vllm-direct mean e2e", "magnus", "vllm-direct", "mean_e2e_s", 0.5, False),
    ("magnus / vllm-direct p99 e2e", "magnus", "vllm-direct", "p99_e2e_s", 1.2, False),
    ("magnus / vllm-direct throughput", "magnus", "vllm-direct", "throughput_rps", 0.97, True),
    ("magnus / vllm-priority mean e2e", "magnus", "vllm-priority", "mean_e2e_s", 1.0, False),
    ("magnus / prompt-hrrn mean e2e", "magnus", "prompt-hrrn", "mean_e2e_s", 1.0, False),
    ("magnus / magnus-oracle mean e2e", "magnus", "magnus-oracle", "mean_e2e_s", 1.15, False),
]
LOW_LOAD_TARGET: LoadTarget = ("magnus / vllm-direct mean e2e (control-plane overhead)", "magnus",
                               "vllm-direct", "mean_e2e_s", 1.05, False)
LOAD_TARGETS_STATIC: list[LoadTarget] = [
    ("magnus / magnus-oracle throughput (= gain over fcfs-fixed / oracle's gain)", "magnus",
     "magnus-oracle", "throughput_rps", 0.9, True),
    ("magnus / magnus-oracle mean e2e", "magnus", "magnus-oracle", "mean_e2e_s", 1.15, False),
    ("magnus / fcfs-fixed throughput (ceiling measured here: 2.78)", "magnus", "fcfs-fixed",
     "throughput_rps", 2.78 * 0.9, True),
    ("magnus / fcfs-fixed mean e2e (ceiling measured here: 0.18)", "magnus", "fcfs-fixed",
     "mean_e2e_s", 0.18 / 0.9, False),
]


def _point_key(r: dict[str, Any]) -> tuple[str, str, str, float]:
    return (r["mode"], r["kv"], r["arrivals"], float(r["load"]))


def load_targets_block(load: dict[str, Any] | None) -> str:
    if load is None:
        return "(not run yet: `make bench` writes results/load_sweep.json)\n"
    points: dict[tuple[str, str, str, float], dict[str, dict[str, Any]]] = {}
    for r in load["rows"]:
        points.setdefault(_point_key(r), {})[r["policy"]] = r
    lines = ["| point (mode, KV, arrivals, load) | target | wanted | measured |",
             "|---|---|---|---|"]
    for (mode, kv, kind, at), by_policy in sorted(points.items()):
        if mode == "static":
            targets = LOAD_TARGETS_STATIC
        elif at >= 1.0:
            targets = LOAD_TARGETS_CONTINUOUS
        elif at <= 0.3:
            targets = [LOW_LOAD_TARGET]
        else:
            continue
        where = f"{mode}, {kv}, {kind}" + ("" if kind == "burst" else f", {at:g}x")
        for name, num, den, metric, bound, at_least in targets:
            a, b = by_policy.get(num), by_policy.get(den)
            if a is None or b is None or not a.get(metric) or not b.get(metric):
                continue
            ratio = float(a[metric]) / float(b[metric])
            ok = ratio >= bound if at_least else ratio <= bound
            lines.append(f"| {where} | {name} | {'>=' if at_least else '<='} {bound:.2f} | "
                         f"{ratio:.2f} ({'met' if ok else 'NOT met'}) |")
    return "\n".join(lines) + "\n"


def load_block(load: dict[str, Any] | None) -> str:
    if load is None:
        return "(not run yet: `make bench` writes results/load_sweep.json)\n"
    from bench.load_sweep import Point, table

    kv = load["kv_pressure"]
    head = (f"Capacity {load['capacity_rps']:.3f} req/s (saturation run); cut KV cache "
            f"{load['cut_blocks']} blocks ({kv['cut_kv_tokens']} tokens); SLO: e2e <= "
            f"{load['slo']['slowdown']:g}x own service time and TTFT <= "
            f"{load['slo']['ttft_s']:g} s; "
            f"{load['machine']['cpus']} CPUs, vllm {load['machine']['vllm']}; finished "
            f"{load['finished_at']}, wall time {load['wall_s'] / 60:.1f} min.\n\n")
    return head + table([Point(**r) for r in load["rows"]])


# --- where Magnus wins (bench/targets.py's repeated, interleaved runs) ----------------------
# (name, numerator policy, denominator, metric, bound, at least?, points it applies to):
# "plain" is plain vLLM in its better configuration at that point (the lower median mean).
WinTarget = tuple[str, str, str, str, float, bool, Callable[[str], bool]]


def _burst(n: int) -> Callable[[str], bool]:
    return lambda point: point == f"burst{n}"


def _online(point: str) -> bool:
    kind, _, load = point.partition("-")
    return kind in ("poisson", "gamma") and load in ("1.0", "1.3")


def _low(point: str) -> bool:
    return point.endswith("-0.3")


WIN_TARGETS: list[WinTarget] = [
    ("mean completion vs plain vLLM", "magnus", "plain", "mean_e2e_s", 0.60, False, _burst(300)),
    ("throughput vs plain vLLM", "magnus", "plain", "throughput_rps", 1.00, True, _burst(300)),
    ("worst slowdown vs plain vLLM", "magnus", "plain", "max_slowdown", 0.10, False,
     _burst(300)),
    ("mean completion vs plain vLLM", "magnus", "plain", "mean_e2e_s", 0.55, False,
     _burst(1000)),
    ("throughput vs plain vLLM", "magnus", "plain", "throughput_rps", 1.00, True, _burst(1000)),
    ("mean e2e vs plain vLLM", "magnus", "plain", "mean_e2e_s", 0.80, False, _online),
    ("p99 e2e vs plain vLLM", "magnus", "plain", "p99_e2e_s", 1.20, False, _online),
    ("throughput vs plain vLLM", "magnus", "plain", "throughput_rps", 0.97, True, _online),
    ("worst slowdown vs plain vLLM", "magnus", "plain", "max_slowdown", 1.00, False, _online),
    ("mean vs its oracle", "magnus", "magnus-oracle", "mean_e2e_s", 1.10, False,
     lambda point: True),
    ("mean vs plain vLLM (control plane's cost)", "magnus", "plain", "mean_e2e_s", 1.05, False,
     _low),
]
_PLAIN = "vllm"


def _median_range(values: Sequence[float]) -> str:
    import numpy as np

    return (f"{float(np.median(values)):.2f} ({min(values):.2f}-{max(values):.2f})"
            if len(values) > 1 else f"{values[0]:.2f} (one run)")


def _by_run(rows: Rows) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """point -> "policy@engine config" -> repeat -> row."""
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in rows:
        name = f"{r['policy']}@{r['config']['engine']}"
        out.setdefault(r["point"], {}).setdefault(name, {})[int(r["repeat"])] = r
    return out


def _plain_config(runs: dict[str, dict[int, dict[str, Any]]]) -> str | None:
    """The plain-vLLM configuration with the lower median mean latency at this point."""
    import numpy as np

    plain = {name: [float(r["mean_e2e_s"]) for r in by_repeat.values() if r.get("mean_e2e_s")]
             for name, by_repeat in runs.items() if name.startswith(f"{_PLAIN}@")}
    plain = {name: v for name, v in plain.items() if v}
    return min(plain, key=lambda n: float(np.median(plain[n]))) if plain else None


def _policy_run(runs: dict[str, dict[int, dict[str, Any]]], policy: str, plain: str | None
                ) -> dict[int, dict[str, Any]]:
    if policy == "plain":
        return runs.get(plain or "", {})
    return next((by_repeat for name, by_repeat in runs.items()
                 if name.split("@")[0] == policy), {})


def wins_block(load: dict[str, Any] | None) -> str:
    rows = (load or {}).get("targets")
    if not rows:
        return ("(not run yet: `python -m bench targets` writes the rows to "
                "results/load_sweep.json)\n")
    meta = load.get("targets_meta", {}) if load else {}
    by_point = _by_run(rows)
    iso = meta.get("isolation")
    head = (f"Isolated engine: compute on core(s) {iso['engine_cpus']}, everything else on "
            f"{iso['service_cpus']}; " if iso else "Shared cores (not isolated); ") + (
        f"capacity {meta.get('capacity_rps', 0):.3f} req/s, knee {meta.get('knee')} at once "
        f"(vLLM --max-num-seqs and Magnus's cap); ratios are per repeat (paired), median "
        f"(min-max); \"plain\" is plain vLLM in its better configuration at each point.\n\n")
    lines = ["| point | target | wanted | magnus / plain (or oracle): median (range) | repeats "
             "| met |", "|---|---|---|---|---|---|"]
    for point in sorted(by_point):
        runs = by_point[point]
        plain = _plain_config(runs)
        for name, num, den, metric, bound, at_least, applies in WIN_TARGETS:
            if not applies(point):
                continue
            a, b = _policy_run(runs, num, plain), _policy_run(runs, den, plain)
            ratios = [float(a[k][metric]) / float(b[k][metric]) for k in sorted(set(a) & set(b))
                      if a[k].get(metric) and b[k].get(metric)]
            if not ratios:
                continue
            import numpy as np

            median = float(np.median(ratios))
            ok = median >= bound if at_least else median <= bound
            against = plain if den == "plain" else den
            lines.append(f"| {point} | {name} ({against}) | {'>=' if at_least else '<='} "
                         f"{bound:.2f} | {_median_range(ratios)} | {len(ratios)} | "
                         f"{'met' if ok else 'NOT met'} |")
    spread = ["", "Each policy's run-to-run spread (median (min-max) over repeats):", "",
              "| point | policy@engine | runs | mean e2e s | p99 e2e s | req/s | worst slowdown |"
              " isolation: compute on own core, foreign share |",
              "|---|---|---|---|---|---|---|---|"]
    for point in sorted(by_point):
        for name, by_repeat in sorted(by_point[point].items()):
            rs = list(by_repeat.values())

            def col(metric: str, rows_: list[dict[str, Any]] = rs) -> str:
                vals = [float(r[metric]) for r in rows_ if r.get(metric) is not None]
                return _median_range(vals) if vals else "-"

            isos = [r["isolation"] for r in rs if r.get("isolation")]
            iso_text = (f"{min(i['compute_on_own_cores'] for i in isos):.1%} min, "
                        f"{max(i['foreign_share_of_compute_cores'] for i in isos):.1%} max"
                        if isos else "shared")
            spread.append(f"| {point} | {name} | {len(rs)} | {col('mean_e2e_s')} | "
                          f"{col('p99_e2e_s')} | {col('throughput_rps')} | "
                          f"{col('max_slowdown')} | {iso_text} |")
    return head + "\n".join(lines + spread) + "\n"


def update(doc: Path, blocks: dict[str, str]) -> None:
    """Replace each `<!-- bench:NAME -->` ... `<!-- /bench:NAME -->` block's body."""
    text = doc.read_text()
    for name, body in blocks.items():
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if start not in text or end not in text:
            raise ValueError(f"{doc} has no {start} ... {end} block")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{body.rstrip()}\n{end}{tail}"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=DOC)
    args = parser.parse_args(argv)
    real = _load("real_stack.json")
    if real is None:
        print("no results/real_stack.json: run `python -m bench real` first")
        return 1
    scale, sim_real, sweep, load = (_load("sim_scale.json"), _load("sim_real_default.json"),
                                    _load("real_sweep.json"), _load("load_sweep.json"))
    blocks: dict[str, Callable[[], str]] = {
        "real": lambda: real_block(real),
        "targets": lambda: targets_block(real, scale),
        "validation": lambda: validation_block(sim_real, real),
        "sweep": lambda: sweep_block(sweep),
        "load": lambda: load_block(load),
        "load-targets": lambda: load_targets_block(load),
        "wins": lambda: wins_block(load),
    }
    rendered = {name: make() for name, make in blocks.items()}
    print(rendered["real"] + "\n" + rendered["targets"])
    update(args.doc, rendered)
    print(f"updated {args.doc.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
