"""Tests of the committed workload (data/workload), its builder and the arrival processes."""

from __future__ import annotations

import gzip
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from offline.workload import build
from offline.workload.arrivals import azure_trace_arrivals, gamma_arrivals, poisson_arrivals
from offline.workload.catalog import (
    APPS_FILE,
    ARRIVALS_FILE,
    DEFAULT_DIR,
    REQUESTS_FILE,
    App,
    WorkloadRecord,
    load_apps,
    load_records,
)

CORE_APPS = {
    "grammar-jfleg",
    "detox-paradetox",
    "code-java-cs",
    "code-bugfix",
    "translate-en-de",
    "translate-en-fr",
    "translate-en-cs",
}
FILES = (APPS_FILE, REQUESTS_FILE, ARRIVALS_FILE)


@pytest.fixture(scope="module")
def apps() -> list[App]:
    return load_apps()


@pytest.fixture(scope="module")
def records() -> list[WorkloadRecord]:
    return load_records()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build from the third-party data (only where /work/shared/data exists)."""
    if not build.DEFAULT_DATA.is_dir():
        pytest.skip(f"third-party data folder {build.DEFAULT_DATA} is missing")
    out = tmp_path_factory.mktemp("build1")
    assert build.main(["--out", str(out)]) == 0
    return out


# --- builder -------------------------------------------------------------------------------


def test_build_is_byte_identical(built: Path, tmp_path: Path) -> None:
    assert build.main(["--out", str(tmp_path)]) == 0
    for name in FILES:
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_committed_workload_is_current(built: Path) -> None:
    for name in FILES:
        assert (built / name).read_bytes() == (DEFAULT_DIR / name).read_bytes(), name


def test_seed_changes_sampling(built: Path, tmp_path: Path) -> None:
    assert build.main(["--out", str(tmp_path), "--seed", "1"]) == 0
    assert (built / REQUESTS_FILE).read_bytes() != (tmp_path / REQUESTS_FILE).read_bytes()


# --- committed data: schema ----------------------------------------------------------------


def test_every_line_validates() -> None:
    app_lines = (DEFAULT_DIR / APPS_FILE).read_text(encoding="utf-8").splitlines()
    assert app_lines and all(App.model_validate_json(line) for line in app_lines)
    with gzip.open(DEFAULT_DIR / REQUESTS_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines.pop() == ""  # newline-terminated, no blank lines in between
    assert all(WorkloadRecord.model_validate_json(line) for line in lines)


def test_records_reference_known_apps(apps: list[App], records: list[WorkloadRecord]) -> None:
    app_ids = [a.app_id for a in apps]
    assert len(app_ids) == len(set(app_ids))
    assert {r.app_id for r in records} == set(app_ids)  # and every app has requests
    assert all(r.input.strip() and r.reference_output.strip() for r in records)
    assert all(len(r.input) <= build.MAX_INPUT_CHARS for r in records)
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids))
    assert all(r.request_id.startswith(r.app_id + ":") for r in records)
    assert all(r.user_id.startswith(r.app_id + ":") for r in records)


def test_apps_present(apps: list[App]) -> None:
    by_family: dict[str, list[App]] = defaultdict(list)
    for app in apps:
        by_family[app.family].append(app)
    assert {a.app_id for a in apps} >= CORE_APPS
    assert len(by_family["self_instruct"]) == 71
    assert len(by_family["t0"]) > 100


def test_held_out_only_from_long_tail(apps: list[App]) -> None:
    held = [a for a in apps if a.held_out]
    assert held and {a.family for a in held} == {"self_instruct", "t0"}
    assert not any(a.held_out for a in apps if a.app_id in CORE_APPS)


def test_splits_are_disjoint(apps: list[App], records: list[WorkloadRecord]) -> None:
    held = {a.app_id for a in apps if a.held_out}
    split_of: dict[str, set[str]] = defaultdict(set)
    for r in records:
        split_of[r.request_id].add(r.split)
        assert (r.split == "unseen") == (r.app_id in held), r.request_id
    assert all(len(s) == 1 for s in split_of.values())
    assert load_records(split="unseen") == [r for r in records if r.app_id in held]


def test_core_split_fractions(records: list[WorkloadRecord]) -> None:
    for app_id in CORE_APPS:
        splits = [r.split for r in records if r.app_id == app_id]
        assert abs(splits.count("train") / len(splits) - 0.8) < 0.01, app_id
        assert abs(splits.count("test") / len(splits) - 0.1) < 0.01, app_id


def test_users_follow_zipf(records: list[WorkloadRecord]) -> None:
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        if r.app_id == "code-java-cs":
            counts[r.user_id] += 1
    top = sorted(counts.values(), reverse=True)
    assert len(top) > 10 and top[0] > 3 * top[10]


def test_load_records_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_records(split="dev")


def test_arrivals_file_header() -> None:
    with gzip.open(DEFAULT_DIR / ARRIVALS_FILE, "rt", encoding="utf-8") as f:
        header, first = f.readline().strip(), f.readline().strip()
    assert header == "arrival_s,context_tokens,generated_tokens"
    assert first.startswith("0.000,")
    assert all(int(v) >= 0 for v in first.split(",")[1:])


# --- arrivals --------------------------------------------------------------------------------


def test_gamma_arrivals_keep_the_rate_and_are_burstier_than_poisson() -> None:
    def gap_cv(a: list[float]) -> float:
        gaps = np.diff([0.0, *a])
        return float(np.std(gaps) / np.mean(gaps))

    bursty = gamma_arrivals(4.0, 20_000, seed=3, cv=2.0)
    assert bursty == sorted(bursty) and bursty == gamma_arrivals(4.0, 20_000, seed=3, cv=2.0)
    assert 20_000 / bursty[-1] == pytest.approx(4.0, rel=0.05)
    assert gap_cv(bursty) == pytest.approx(2.0, rel=0.1)
    assert gap_cv(gamma_arrivals(4.0, 20_000, seed=3, cv=1.0)) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="cv"):
        gamma_arrivals(4.0, 10, seed=0, cv=0.0)


def test_poisson_deterministic_sorted_and_rate() -> None:
    a = poisson_arrivals(20.0, 5000, seed=7)
    assert a == poisson_arrivals(20.0, 5000, seed=7)
    assert a != poisson_arrivals(20.0, 5000, seed=8)
    assert a == sorted(a) and a[0] >= 0
    assert abs(len(a) / a[-1] / 20.0 - 1) < 0.10


@pytest.mark.parametrize(("rate", "n", "seed"), [(2.0, 500, 0), (50.0, 3000, 3), (0.5, 2, 9)])
def test_azure_window_rescaled(rate: float, n: int, seed: int) -> None:
    a = azure_trace_arrivals(rate, n, seed=seed)
    assert len(a) == n and a[0] == 0.0 and a == sorted(a)
    assert abs((n - 1) / a[-1] / rate - 1) < 0.05
    assert a == azure_trace_arrivals(rate, n, seed=seed)


def test_azure_keeps_burstiness() -> None:
    a = azure_trace_arrivals(1.0, 5000)
    gaps = [later - t for t, later in itertools.pairwise(a)]
    mean = sum(gaps) / len(gaps)
    cv = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean
    assert cv > 0.5  # real traces are not evenly spaced


def test_empty_and_single_arrivals() -> None:
    assert poisson_arrivals(1.0, 0, seed=0) == [] == azure_trace_arrivals(1.0, 0)
    assert azure_trace_arrivals(1.0, 1) == [0.0]


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        poisson_arrivals(rate, 10, seed=0)
    with pytest.raises(ValueError, match="rate_per_s"):
        azure_trace_arrivals(rate, 10)


def test_bad_n() -> None:
    with pytest.raises(ValueError, match="n must"):
        poisson_arrivals(1.0, -1, seed=0)
    with pytest.raises(ValueError, match="n must"):
        azure_trace_arrivals(1.0, -1)
    with pytest.raises(ValueError, match="n must"):
        azure_trace_arrivals(1.0, 10**9)
