"""The wire contracts in shared/: schema_version refused on read, stream specs, the Celery task."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared import keys, streams
from shared.schemas import (
    SCHEMA_VERSION,
    Batch,
    BatchItem,
    CompletedEvent,
    PredictedRequest,
    Prediction,
    PredictorSource,
    QueuedRequest,
    SchemaVersionError,
)
from shared.tasks import RUN_BATCH_TASK, parse_batch, send_batch
from tests.conftest import RecordingCelery


def queued(rid: str = "req-1") -> QueuedRequest:
    return QueuedRequest(request_id=rid, app_id="a", user_id="u", instruction="", input="x",
                         max_tokens=64, input_tokens=10, queued_at=1.0)


def predicted(rid: str = "req-1") -> PredictedRequest:
    return PredictedRequest(request=queued(rid), prediction=Prediction(
        request_id=rid, predicted_tokens=20, upper_tokens=30, model_version="t",
        source=PredictorSource.DEFAULT, predicted_at=2.0))


def with_version(message_json: str, version: int, *path: str) -> str:
    d = json.loads(message_json)
    node = d
    for part in path:
        node = node[part]
    node["schema_version"] = version
    return json.dumps(d)


def test_another_schema_version_is_refused_naming_type_found_and_expected() -> None:
    raw = with_version(queued().model_dump_json(), SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError) as info:
        QueuedRequest.parse(raw)
    err = info.value
    assert (err.message_type, err.found, err.expected) == ("QueuedRequest", SCHEMA_VERSION + 1,
                                                           SCHEMA_VERSION)
    assert str(err) == (f"QueuedRequest has schema_version {SCHEMA_VERSION + 1}; this process "
                        f"reads schema_version {SCHEMA_VERSION}")
    assert isinstance(err, ValueError)
    # Plain pydantic parsing refuses it too, with the same words.
    with pytest.raises(ValidationError, match="QueuedRequest has schema_version 2"):
        QueuedRequest.model_validate_json(raw)


def test_a_nested_message_of_another_version_is_refused_by_its_own_name() -> None:
    raw = with_version(predicted().model_dump_json(), 0, "request")
    with pytest.raises(SchemaVersionError, match="QueuedRequest has schema_version 0"):
        PredictedRequest.parse(raw)
    with pytest.raises(SchemaVersionError, match="PredictedRequest has schema_version 7"):
        PredictedRequest.parse(with_version(predicted().model_dump_json(), 7))


def test_current_version_and_other_errors_parse_as_before() -> None:
    assert PredictedRequest.parse(predicted().model_dump_json()) == predicted()
    assert QueuedRequest.parse(queued().model_dump()) == queued()
    # A message written without the field is read as the current version.
    d = json.loads(queued().model_dump_json())
    del d["schema_version"]
    assert QueuedRequest.parse(json.dumps(d)).schema_version == SCHEMA_VERSION
    with pytest.raises(ValidationError) as info:
        QueuedRequest.parse('{"request_id": "x"}')
    assert not isinstance(info.value, SchemaVersionError)


def test_stream_specs_encode_in_one_field_and_decode_typed() -> None:
    assert streams.INCOMING.encode(queued()) == {"request": queued().model_dump_json()}
    assert streams.PREDICTED.decode({"request": predicted().model_dump_json()}) == predicted()
    event = CompletedEvent(kind="batch")
    assert streams.COMPLETED.decode(streams.COMPLETED.encode(event)) == event
    assert (streams.INCOMING.key, streams.PREDICTED.key, streams.COMPLETED.key) == (
        keys.STREAM_INCOMING, keys.STREAM_PREDICTED, keys.STREAM_COMPLETED)
    with pytest.raises(streams.MalformedEntry, match="no 'event' field"):
        streams.COMPLETED.decode({"request": "{}"})


def test_a_refused_entry_still_names_its_request() -> None:
    bad = with_version(predicted("req-9").model_dump_json(), 2, "request")
    assert streams.PREDICTED.request_id_in({"request": bad}) == "req-9"
    assert streams.INCOMING.request_id_in({"request": '{"request_id": "req-3"'}) is None
    assert streams.INCOMING.request_id_in({"request": '{"request_id": "req-3"}'}) == "req-3"
    assert streams.COMPLETED.request_id_in({"event": "{}"}) is None


def batch(gpu: int = 1) -> Batch:
    return Batch(batch_id="b1", gpu=gpu, policy="magnus", estimated_service_s=1.0, formed_at=3.0,
                 items=[BatchItem(request=queued(), max_tokens=30, predicted_tokens=20,
                                  upper_tokens=30)])


def test_send_batch_queues_the_batch_json_for_its_gpu() -> None:
    celery = RecordingCelery()
    send_batch(celery, batch(gpu=3))
    assert celery.sent == [(RUN_BATCH_TASK, [batch(gpu=3).model_dump_json()], "local.gpu.3")]
    assert parse_batch(celery.sent[0][1][0]) == batch(gpu=3)


def test_parse_batch_refuses_another_schema_version() -> None:
    raw = with_version(batch().model_dump_json(), 2)
    with pytest.raises(SchemaVersionError, match="Batch has schema_version 2"):
        parse_batch(raw)
    nested = json.loads(batch().model_dump_json())
    nested["items"][0]["request"]["schema_version"] = 5
    with pytest.raises(SchemaVersionError, match="QueuedRequest has schema_version 5"):
        parse_batch(nested)
