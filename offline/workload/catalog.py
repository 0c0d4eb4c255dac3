"""Catalogue of the committed workload: applications and their requests (data/workload)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "data" / "workload"
APPS_FILE = "apps.jsonl"
REQUESTS_FILE = "requests.jsonl.gz"
ARRIVALS_FILE = "azure_arrivals.csv.gz"

Family = Literal[
    "grammar", "detox", "code_translation", "bug_fixing", "translation", "self_instruct", "t0"
]
Split = Literal["train", "val", "test", "unseen"]
FAMILIES: tuple[Family, ...] = get_args(Family)
SPLITS: tuple[Split, ...] = get_args(Split)
SLUG = r"^[a-z0-9]+(-[a-z0-9]+)*$"


class App(BaseModel):
    """An application: one instruction that a service prepends to every user input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    app_id: str = Field(pattern=SLUG)
    name: str
    family: Family
    instruction: str = Field(min_length=1)
    source: str
    licence: str
    held_out: bool = False  # reserved for unseen-app evaluation: all its records are "unseen"


class WorkloadRecord(BaseModel):
    """One request of an application, with the reference output whose length is the target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    app_id: str = Field(pattern=SLUG)
    user_id: str
    input: str = Field(min_length=1)
    reference_output: str
    split: Split


def load_apps(path: Path = DEFAULT_DIR) -> list[App]:
    """All applications of the workload in ``path``, in file order."""
    with (path / APPS_FILE).open(encoding="utf-8") as f:
        return [App.model_validate_json(line) for line in f if line.strip()]


def load_records(path: Path = DEFAULT_DIR, split: str | None = None) -> list[WorkloadRecord]:
    """All requests of the workload in ``path`` (only those of ``split`` when given)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    with gzip.open(path / REQUESTS_FILE, "rt", encoding="utf-8") as f:
        records = [WorkloadRecord.model_validate_json(line) for line in f if line.strip()]
    return records if split is None else [r for r in records if r.split == split]
