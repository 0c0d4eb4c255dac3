"""Which in-flight batches died with their worker (services/scheduler/recovery.py)."""

from __future__ import annotations

from services.scheduler.recovery import GpuLiveness, orphaned_batches, stranded_batches
from shared.schemas import BatchClaim

INFLIGHT = {"a", "b", "c"}
# Worker processes and when they started: w0 (the first), w1 (its replacement).
STARTED = {"w0": 10.0, "w1": 50.0}


def claim(worker: str) -> BatchClaim:
    return BatchClaim(worker_id=worker, worker_started_at=STARTED[worker], claimed_at=60.0)


def orphans(claims: dict[str, str], live: str | None, seen: float | None,
            now: float = 100.0, leading_since: float = 0.0) -> list[str]:
    liveness = GpuLiveness(live, STARTED[live] if live else 0.0, seen)
    return orphaned_batches({b: claim(w) for b, w in claims.items()}, INFLIGHT, liveness, now,
                            orphan_after_s=20.0, leading_since=leading_since)


def test_batches_started_by_the_worker_that_beats_now_are_not_orphans() -> None:
    assert orphans({"a": "w1", "b": "w1"}, live="w1", seen=100.0) == []


def test_a_newer_worker_beating_orphans_what_the_old_one_started_at_once() -> None:
    # The supervisor restarted the worker: the batch it was running died with it.
    assert orphans({"a": "w0", "b": "w1"}, live="w1", seen=100.0) == ["a"]


def test_a_stale_beat_of_the_dead_worker_does_not_orphan_its_successors_batch() -> None:
    # w1 claimed a batch before its first beat replaced w0's (still within its TTL).
    assert orphans({"a": "w1"}, live="w0", seen=100.0) == []


def test_batches_nobody_started_are_left_to_the_queue() -> None:
    # "c" was dispatched but no worker claimed it: it waits in its Celery queue.
    assert orphans({"a": "w0"}, live="w1", seen=100.0) == ["a"]
    assert orphans({}, live=None, seen=0.0) == []


def test_claims_on_batches_no_longer_in_flight_are_ignored() -> None:
    assert orphans({"done": "w0"}, live="w1", seen=100.0) == []


def test_without_a_heartbeat_batches_are_orphaned_only_after_the_grace() -> None:
    assert orphans({"a": "w0"}, live=None, seen=90.0) == []  # silent 10 s of 20
    assert orphans({"a": "w0", "b": "w1"}, live=None, seen=79.0) == ["a", "b"]


def test_a_scheduler_that_never_saw_a_beat_waits_the_grace_from_taking_the_lead() -> None:
    assert orphans({"a": "w0"}, live=None, seen=None, leading_since=95.0) == []
    assert orphans({"a": "w0"}, live=None, seen=None, leading_since=70.0) == ["a"]


def stranded(claimed: set[str], live: str | None, seen: float | None, now: float = 100.0,
             leading_since: float = 0.0) -> list[str]:
    liveness = GpuLiveness(live, STARTED[live] if live else 0.0, seen)
    return stranded_batches(claimed, INFLIGHT, liveness, now, orphan_after_s=20.0,
                            leading_since=leading_since)


def test_unstarted_batches_stay_queued_while_their_gpu_beats_however_long() -> None:
    assert stranded({"a"}, live="w1", seen=100.0, now=10_000.0) == []


def test_unstarted_batches_of_a_gpu_silent_past_the_grace_are_planned_again() -> None:
    # Its node is gone: nobody will take "b" and "c" from its queue; "a" started (an orphan).
    assert stranded({"a"}, live=None, seen=90.0) == []  # silent 10 s of 20
    assert stranded({"a"}, live=None, seen=79.0) == ["b", "c"]
    assert stranded({"a", "b", "c"}, live=None, seen=0.0) == []
    assert stranded(set(), live=None, seen=None, leading_since=95.0) == []
    assert stranded(set(), live=None, seen=None, leading_since=70.0) == ["a", "b", "c"]
