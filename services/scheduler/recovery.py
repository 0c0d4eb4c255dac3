"""Which in-flight batches died with their worker: a pure decision over one GPU's snapshot.

A worker claims a batch when it starts it (`state.claim_batch` records a `BatchClaim`: which
process, started when). With Celery's late acks the batch's message stays unacknowledged while it
runs, so a worker killed mid-batch leaves a message Redis would hand out again only after the
broker's visibility timeout (an hour), and a batch the scheduler still counts as in flight. The
scheduler decides here that the batch is orphaned and reruns its open requests; the claim refuses
any later delivery of the same batch, so it never runs twice.

A started batch is orphaned when
- a worker process that started after the claiming one beats for its GPU (the supervisor
  restarted the worker; a beat older than the claimant is stale, not a replacement), or
- no worker has beaten for the GPU for `orphan_after_s` (the worker is gone, or gave up), or
- the worker gave the batch back (`state.abandon_batch`: a claim dated 0, older than any live
  worker).
A batch nobody started is still in its Celery queue: whichever worker comes next runs it, unless
its GPU has been silent for `orphan_after_s` (its node is gone, or its worker cannot start): then
it is stranded, and its requests go back to be planned onto GPUs that live (`stranded_batches`).
The claim refuses the stranded copy if that node comes back and its worker takes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.schemas import BatchClaim


@dataclass(frozen=True)
class GpuLiveness:
    """One GPU's worker as the scheduler sees it: the process in its heartbeat now (None: no
    heartbeat, or one that names no process) and when a heartbeat was last seen (None: never,
    since this scheduler took the lead)."""

    live_worker_id: str | None
    live_worker_started_at: float
    last_beat_seen_at: float | None


def orphaned_batches(claims: Mapping[str, BatchClaim], inflight_batch_ids: set[str],
                     liveness: GpuLiveness, now: float, orphan_after_s: float,
                     leading_since: float) -> list[str]:
    """Batch ids (of those in flight) started by a worker process that is gone.

    `claims`: batch id -> the claim of the worker that started it; `leading_since`: when this
    scheduler took the lead (one that never saw a heartbeat waits `orphan_after_s` from then, so
    a worker that beats every few seconds is never taken for dead)."""
    started = {b: c for b, c in claims.items() if b in inflight_batch_ids}
    if not started:
        return []
    if liveness.live_worker_id is not None:
        return sorted(b for b, c in started.items()
                      if c.worker_id != liveness.live_worker_id
                      and c.worker_started_at < liveness.live_worker_started_at)
    if not _silent(liveness, now, orphan_after_s, leading_since):
        return []
    return sorted(started)


def stranded_batches(claimed_batch_ids: set[str], inflight_batch_ids: set[str],
                     liveness: GpuLiveness, now: float, orphan_after_s: float,
                     leading_since: float) -> list[str]:
    """Batch ids (of those in flight) that no worker started, on a GPU silent for
    `orphan_after_s`: no worker will take them from that GPU's queue, so they are planned again.
    A GPU whose worker beats keeps its queue, however long (the worker runs them in turn)."""
    unstarted = inflight_batch_ids - claimed_batch_ids
    if not unstarted or liveness.live_worker_id is not None:
        return []
    if not _silent(liveness, now, orphan_after_s, leading_since):
        return []
    return sorted(unstarted)


def _silent(liveness: GpuLiveness, now: float, orphan_after_s: float,
            leading_since: float) -> bool:
    """No heartbeat for the GPU for `orphan_after_s` (since this scheduler took the lead, when
    it never saw one)."""
    if liveness.live_worker_id is not None:
        return False
    silent_since = (liveness.last_beat_seen_at if liveness.last_beat_seen_at is not None
                    else leading_since)
    return now - silent_since >= orphan_after_s
