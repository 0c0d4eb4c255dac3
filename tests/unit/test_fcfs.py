from __future__ import annotations

from services.scheduler.policy import WaitingRequest, fcfs_fixed


def _w(i: int, queued_at: float) -> WaitingRequest:
    return WaitingRequest(request_id=f"r{i}", queued_at=queued_at, input_tokens=10,
                          max_tokens=64, predicted_tokens=32, upper_tokens=48)


def test_fcfs_takes_the_oldest_up_to_the_batch_size() -> None:
    waiting = [_w(i, t) for i, t in enumerate([5.0, 1.0, 3.0, 2.0, 4.0])]
    assert [w.request_id for w in fcfs_fixed(waiting, 3)] == ["r1", "r3", "r2"]


def test_fcfs_does_not_wait_to_fill_a_batch() -> None:
    assert [w.request_id for w in fcfs_fixed([_w(0, 1.0)], 8)] == ["r0"]
    assert fcfs_fixed([], 8) == []
