"""The rows the predictor reads: a request at serving time, and one with its observed length.

Runtime types only: loading the profiled training data from the workload catalog is offline
(`offline/predictor/dataset.py`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PredictRow:
    """What the predictor sees of a request at serving time.

    `input_tokens` is the original prompt's; a continuation (a run stopped at its predicted cap and
    requeued) also says how many tokens it has generated so far, and is predicted its remaining
    length within `max_tokens - generated_so_far`."""

    app_id: str
    user_id: str
    instruction: str
    input: str
    input_tokens: int
    max_tokens: int
    generated_so_far: int = 0


@dataclass(frozen=True, kw_only=True)
class Example(PredictRow):
    """A request with the length the serving model actually generated for it."""

    request_id: str
    generated_tokens: int
    hit_cap: bool  # finish_reason == "length": the output ran into max_tokens
    family: str = ""
    split: str = ""
