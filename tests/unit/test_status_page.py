"""The status page's summary (services/ingress/status.py): pure, from hand-built snapshots."""

from __future__ import annotations

import pytest

from services.ingress.status import (
    FinishedRequest,
    GpuSnapshot,
    OpenRequest,
    StatusSnapshot,
    percentiles,
    summarize,
)
from shared.schemas import Batch, BatchItem, RequestResult, RequestStatus
from tests.factories import heartbeat, predicted_request

NOW = 10_000.0


def finished(i: int, queued_at: float, finished_at: float, generated: int,
             predicted: int | None = 50, error: bool = False, continuations: int = 0,
             first_token_after_s: float | None = 0.5) -> FinishedRequest:
    started = queued_at + 1.0
    return FinishedRequest(
        result=RequestResult(
            request_id=f"req-{i}", batch_id="b", gpu=0, text="t", input_tokens=10,
            generated_tokens=generated, finish_reason="error" if error else "stop",
            started_at=started,
            first_token_at=None if first_token_after_s is None else started + first_token_after_s,
            finished_at=finished_at),
        app_id="a", tenant="t", queued_at=queued_at, predicted_tokens=predicted,
        continuations=continuations)


def snapshot(open_requests: list[OpenRequest] | None = None, gpus: list[GpuSnapshot] | None = None,
             done: list[FinishedRequest] | None = None, open_unread: int = 0) -> StatusSnapshot:
    return StatusSnapshot(now=NOW, window_s=600.0, bucket_s=60.0,
                          open_requests=open_requests or [], open_unread=open_unread,
                          gpus=gpus or [], finished=done or [])


def test_percentiles_are_nearest_rank_values_that_happened() -> None:
    p = percentiles([float(v) for v in range(1, 101)])
    assert (p.count, p.p50, p.p90, p.p99, p.mean) == (100, 50.0, 90.0, 99.0, 50.5)
    one = percentiles([3.0])
    assert one.p50 == one.p99 == 3.0
    empty = percentiles([])
    assert empty.count == 0 and empty.p50 is None and empty.mean is None


def test_queue_depth_by_stage_app_and_tenant() -> None:
    stages = [RequestStatus.QUEUED, RequestStatus.PREDICTED, RequestStatus.REQUEUED,
              RequestStatus.SCHEDULED, RequestStatus.RUNNING, RequestStatus.RUNNING]
    opened = [OpenRequest(f"req-{i}", s, "fix" if i < 4 else "chat", "heavy" if i % 2 else "light")
              for i, s in enumerate(stages)]
    q = summarize(snapshot(opened, open_unread=7)).queue
    assert (q.open, q.waiting, q.scheduled, q.running) == (13, 3, 1, 2)
    assert q.by_status == {"predicted": 1, "queued": 1, "requeued": 1, "running": 2,
                           "scheduled": 1}
    assert q.by_app == {"fix": {"waiting": 3, "dispatched": 1},
                        "chat": {"waiting": 0, "dispatched": 2}}
    assert q.by_tenant == {"light": {"waiting": 2, "dispatched": 1},
                           "heavy": {"waiting": 1, "dispatched": 2}}
    assert list(q.by_app) == ["fix", "chat"]  # deepest first


def test_gpu_kv_counts_only_members_still_open() -> None:
    items = []
    for i in (1, 2):
        req = predicted_request(i, input_tokens=100, max_tokens=64).request
        items.append(BatchItem(request=req, max_tokens=40, predicted_tokens=20, upper_tokens=40))
    batch = Batch(batch_id="b1", gpu=0, policy="magnus", items=items, estimated_service_s=1.0,
                  formed_at=NOW - 5)
    beat = heartbeat(0, kv_budget_tokens=1000).model_copy(update={"at": NOW - 3, "busy": True})
    # req-2 finished already (a continuous group stays in flight until its last member ends).
    opened = [OpenRequest("req-1", RequestStatus.RUNNING, "a", "t")]
    gpus = summarize(snapshot(opened, [GpuSnapshot(0, [batch], beat),
                                       GpuSnapshot(1, [], None)])).gpus
    assert gpus[0].requests == 1 and gpus[0].batches == 1
    assert gpus[0].kv_reserved_tokens == 140 and gpus[0].kv_budget_tokens == 1000
    assert gpus[0].kv_reserved_fraction == pytest.approx(0.14)
    assert gpus[0].alive and gpus[0].busy and gpus[0].heartbeat_age_s == pytest.approx(3.0)
    assert gpus[0].policies == ["magnus"]
    assert not gpus[1].alive and gpus[1].kv_reserved_fraction is None


def test_latency_and_predictor_error_land_in_their_buckets() -> None:
    done = [
        # Bucket 0 (the window's first minute): 10 s and 20 s end to end.
        finished(1, queued_at=NOW - 600, finished_at=NOW - 590, generated=40, predicted=50),
        finished(2, queued_at=NOW - 610, finished_at=NOW - 590, generated=60, predicted=50),
        # The last bucket: a failure, a continued request (its prediction was of a remainder)
        # and one without a first-token time.
        finished(3, queued_at=NOW - 30, finished_at=NOW - 1, generated=0, error=True),
        finished(4, queued_at=NOW - 30, finished_at=NOW - 2, generated=500, predicted=20,
                 continuations=1, first_token_after_s=None),
        # Outside the window: left out.
        finished(5, queued_at=NOW - 900, finished_at=NOW - 700, generated=5),
    ]
    report = summarize(snapshot(done=done))
    assert len(report.buckets) == 10
    first, last = report.buckets[0], report.buckets[-1]
    assert first.start == NOW - 600 and (first.completed, first.failed) == (2, 0)
    assert (first.latency_s.p50, first.latency_s.p99) == (10.0, 20.0)
    assert first.queue_wait_s.p50 == 1.0 and first.ttft_s.p50 == 1.5
    assert first.prediction_abs_error == 10.0 and first.prediction_signed_error == 0.0
    assert (last.completed, last.failed) == (1, 1) and last.ttft_s.count == 0
    assert last.prediction_abs_error is None  # only a continued request: not scored
    assert all(b.completed == 0 for b in report.buckets[1:-1])
    assert (report.window.completed, report.window.failed) == (3, 1)
    assert report.window.generated_tokens == 600
    p = report.predictor
    assert p.count == 2 and p.mean_abs_error_tokens == 10.0 and p.within_25pct == 1.0


def test_the_predictor_is_ready_while_its_key_names_a_process() -> None:
    assert not summarize(snapshot()).predictor_ready
    ready = StatusSnapshot(now=NOW, window_s=600.0, bucket_s=60.0, open_requests=[],
                           open_unread=0, gpus=[], finished=[], predictor_pid="4242")
    assert summarize(ready).predictor_ready


def test_an_empty_stack_summarizes_to_zeros_not_errors() -> None:
    report = summarize(snapshot())
    assert report.queue.open == 0 and report.gpus == [] and report.predictor.count == 0
    assert report.window.latency_s.p50 is None
    assert all(b.completed == 0 for b in report.buckets)
