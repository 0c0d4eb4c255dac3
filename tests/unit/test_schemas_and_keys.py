from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared import keys
from shared.schemas import (
    SCHEMA_VERSION,
    Batch,
    BatchItem,
    CompletedEvent,
    QueuedRequest,
    RequestResult,
    RequestStatus,
    SubmitRequest,
)
from shared.state import view_from_hash


def _queued() -> QueuedRequest:
    return QueuedRequest(request_id="req-1", app_id="qa", user_id="u1", instruction="Be brief.",
                         input="Hi", max_tokens=16, input_tokens=12, queued_at=1.0)


def test_messages_round_trip_through_json_with_schema_version() -> None:
    req = _queued()
    again = QueuedRequest.model_validate_json(req.model_dump_json())
    assert again == req and again.schema_version == SCHEMA_VERSION
    batch = Batch(batch_id="b", gpu=0, policy="fcfs-fixed", estimated_service_s=0.0, formed_at=2.0,
                  items=[BatchItem(request=req, max_tokens=16, predicted_tokens=8,
                                   upper_tokens=12)])
    assert Batch.model_validate_json(batch.model_dump_json()) == batch


def test_messages_refuse_unknown_fields_and_empty_batches() -> None:
    with pytest.raises(ValidationError):
        QueuedRequest.model_validate({**_queued().model_dump(), "surprise": 1})
    with pytest.raises(ValidationError, match="items"):
        Batch(batch_id="b", gpu=0, policy="p", items=[], estimated_service_s=0, formed_at=0)


def test_final_statuses() -> None:
    finals = {s for s in RequestStatus if s.is_final}
    assert finals == {RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"app_id": "qa", "input": "", "max_tokens": 4}, "input"),
        ({"app_id": "qa", "input": " \n\t", "max_tokens": 4}, "input"),
        ({"app_id": "qa", "input": "x", "max_tokens": 0}, "max_tokens"),
        ({"app_id": "bad id!", "input": "x"}, "app_id"),
        ({"app_id": "qa", "input": "x", "colour": "red"}, "colour"),
        ({"input": "x"}, "app_id"),
    ],
)
def test_submit_validation_names_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        SubmitRequest.model_validate(body)
    assert field in {str(loc) for e in info.value.errors() for loc in e["loc"]}


def test_key_names_are_distinct_and_prefixed() -> None:
    names = [keys.STREAM_INCOMING, keys.STREAM_PREDICTED, keys.STREAM_COMPLETED,
             keys.SCHEDULER_WAITING, keys.SCHEDULER_LEADER, keys.METRICS, keys.TRAINING_LENGTHS,
             keys.request("a"), keys.request_payload("a"), keys.gpu_inflight(0),
             keys.worker_heartbeat(0), keys.gpu_inflight(1), keys.gpu_running(0)]
    assert len(set(names)) == len(names)
    assert all(n.startswith(keys.PREFIX + ":") for n in names)
    assert keys.celery_queue(3) == "local.gpu.3"
    assert keys.celery_queue(3, "node-b") == "node-b.gpu.3"


def test_view_from_hash_reads_stage_timestamps_and_result() -> None:
    h = {"status": "completed", "app_id": "qa", "user_id": "u", "max_tokens": "16",
         "input_tokens": "12", "queued_at": "1.0", "predicted_at": "1.5", "finished_at": "3.0",
         "text": "Paris", "generated_tokens": "3", "finish_reason": "stop"}
    view = view_from_hash("req-1", h)
    assert view.is_final and view.text == "Paris" and view.generated_tokens == 3
    assert view.timestamps == {"queued": 1.0, "predicted": 1.5, "finished": 3.0}


def test_completed_event_carries_a_result() -> None:
    res = RequestResult(request_id="r", batch_id="b", gpu=0, text="t", input_tokens=1,
                        generated_tokens=1, finish_reason="stop", started_at=0, finished_at=1)
    ev = CompletedEvent(kind="request", result=res)
    assert CompletedEvent.model_validate_json(ev.model_dump_json()).result == res
