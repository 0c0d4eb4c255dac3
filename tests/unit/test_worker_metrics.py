"""What a worker observes in Prometheus when a request's final run ends (pure: no Redis)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.worker.runner import observe_final
from shared.schemas import BatchItem, FinishReason, QueuedRequest, RequestResult


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def item(app: str, generated_so_far: int = 0, continuations: int = 0) -> BatchItem:
    req = QueuedRequest(request_id="r", app_id=app, user_id="u", instruction="", input="x",
                        max_tokens=64, input_tokens=10, queued_at=100.0,
                        generated_so_far=generated_so_far, continuations=continuations)
    return BatchItem(request=req, max_tokens=64, predicted_tokens=20, upper_tokens=40)


def result(generated: int, finish_reason: FinishReason = "stop") -> RequestResult:
    return RequestResult(request_id="r", batch_id="b", gpu=3, text="t", input_tokens=10,
                         generated_tokens=generated, finish_reason=finish_reason,
                         started_at=102.0, first_token_at=103.0, finished_at=108.0)


def test_a_completed_request_is_counted_and_timed_from_its_acceptance() -> None:
    before = {
        "done": sample("magnus_requests_finished_total", status="completed", tenant="default",
                       app="obs"),
        "latency": sample("magnus_request_latency_seconds_sum", gpu="3"),
        "ttft": sample("magnus_time_to_first_token_seconds_sum", gpu="3"),
        "wait": sample("magnus_queue_wait_seconds_sum", gpu="3"),
        "tpot": sample("magnus_time_per_output_token_seconds_sum", gpu="3"),
        # A histogram with negative buckets has no _sum: its buckets tell where 9 fell.
        "le8": sample("magnus_prediction_error_tokens_bucket", app="obs", le="8.0"),
        "le16": sample("magnus_prediction_error_tokens_bucket", app="obs", le="16.0"),
    }
    observe_final(item("obs"), result(generated=11))
    assert sample("magnus_requests_finished_total", status="completed",
                  tenant="default", app="obs") == before["done"] + 1
    assert sample("magnus_request_latency_seconds_sum", gpu="3") == before["latency"] + 8.0
    assert sample("magnus_time_to_first_token_seconds_sum", gpu="3") == before["ttft"] + 3.0
    assert sample("magnus_queue_wait_seconds_sum", gpu="3") == before["wait"] + 2.0
    # 5 s for the 10 tokens after the first.
    assert abs(sample("magnus_time_per_output_token_seconds_sum", gpu="3")
               - before["tpot"] - 0.5) < 1e-9
    # Predicted 20, generated 11: +9 tokens, in (8, 16].
    assert sample("magnus_prediction_error_tokens_bucket", app="obs", le="8.0") == before["le8"]
    assert sample("magnus_prediction_error_tokens_bucket", app="obs",
                  le="16.0") == before["le16"] + 1


def test_a_continued_request_has_no_first_token_here_and_no_single_prediction() -> None:
    ttft = sample("magnus_time_to_first_token_seconds_count", gpu="3")
    error = sample("magnus_prediction_error_tokens_count", app="cont")
    observe_final(item("cont", generated_so_far=20, continuations=1), result(generated=30))
    assert sample("magnus_time_to_first_token_seconds_count", gpu="3") == ttft
    assert sample("magnus_prediction_error_tokens_count", app="cont") == error


def test_a_failed_request_is_counted_as_failed_and_not_timed() -> None:
    failed = sample("magnus_requests_finished_total", status="failed", tenant="default",
                    app="bad")
    latency = sample("magnus_request_latency_seconds_count", gpu="3")
    observe_final(item("bad"), result(generated=0, finish_reason="error"))
    assert sample("magnus_requests_finished_total", status="failed", tenant="default",
                  app="bad") == failed + 1
    assert sample("magnus_request_latency_seconds_count", gpu="3") == latency


def test_a_taken_metrics_port_is_logged_not_fatal() -> None:
    import socket

    from shared import metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert metrics.serve(taken.getsockname()[1]) is False
    assert metrics.serve(None) is False
