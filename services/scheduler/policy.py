"""Scheduling policies: pure functions over snapshots of the waiting pool and the free GPU.

No Redis, no Celery, no clock reads: the loop passes `now` in and carries out what is returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WaitingRequest:
    """What a policy may know of a waiting request."""

    request_id: str
    queued_at: float
    input_tokens: int
    max_tokens: int
    predicted_tokens: int
    upper_tokens: int


@dataclass(frozen=True)
class GpuSnapshot:
    gpu: int
    kv_budget_tokens: int


def fcfs_fixed(waiting: Sequence[WaitingRequest], batch_size: int) -> list[WaitingRequest]:
    """First come, first served, in batches of at most `batch_size` (the paper's baseline).

    Takes whoever waits when the GPU frees rather than waiting for a full batch: holding a free GPU
    idle to fill a batch only adds latency.
    """
    assert batch_size >= 1, "batch size must be positive"
    chosen = sorted(waiting, key=lambda w: (w.queued_at, w.request_id))[:batch_size]
    assert len({w.request_id for w in chosen}) == len(chosen), "a request twice in one batch"
    return chosen
