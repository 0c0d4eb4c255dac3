from __future__ import annotations

from services.scheduler.policy import fcfs_fixed
from tests.factories import waiting_request


def test_fcfs_takes_the_oldest_up_to_the_batch_size() -> None:
    waiting = [waiting_request(i, 32, t, input_tokens=10, upper=48, max_tokens=64)
               for i, t in enumerate([5.0, 1.0, 3.0, 2.0, 4.0])]
    assert [w.request_id for w in fcfs_fixed(waiting, 3)] == ["r1", "r3", "r2"]


def test_fcfs_does_not_wait_to_fill_a_batch() -> None:
    only = waiting_request(0, 32, 1.0, input_tokens=10, upper=48, max_tokens=64)
    assert [w.request_id for w in fcfs_fixed([only], 8)] == ["r0"]
    assert fcfs_fixed([], 8) == []
