"""`POST /v1/predict`: ingress validates and counts the prompt, the real predictor service (the
committed artifact, the real embedder) answers through Redis, and nothing is queued or run."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from offline.predictor.train import COMMITTED_ARTIFACT
from services.ingress.app import create_app
from services.predictor.main import PredictorService
from services.predictor.model import load_artifact
from services.predictor.rows import PredictRow
from shared import keys
from shared.schemas import PredictQuery
from shared.settings import IngressSettings, PredictorSettings

pytestmark = pytest.mark.integration

SHORT = {"app_id": "grammar-jfleg", "user_id": "u1", "max_tokens": 512,
         "instruction": "Correct the grammar of the following sentence. Reply with the corrected "
                        "sentence only.",
         "input": "She go to school every days."}


def ingress_settings(redis_url: str, **extra: object) -> IngressSettings:
    fields: dict[str, object] = {"max_model_len": 2048, "max_tokens_limit": 512, **extra}
    return IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR,
                           **fields)  # type: ignore[arg-type]


@pytest.fixture()
def predictor(redis_url: str, tmp_path: Path) -> Iterator[PredictorService]:
    settings = PredictorSettings(redis_url=redis_url, artifact_path=COMMITTED_ARTIFACT,
                                 cache_dir=tmp_path / "cache", retrain_every=10_000)
    svc = PredictorService(redis.Redis.from_url(redis_url, decode_responses=True), settings,
                           "predict-test")
    stop = threading.Event()
    thread = threading.Thread(target=svc.run, args=(stop,), daemon=True)
    thread.start()
    yield svc
    stop.set()
    thread.join(timeout=10)


def test_predict_answers_from_the_learned_model_and_queues_nothing(
        redis_url: str, redis_client: redis.Redis, predictor: PredictorService) -> None:
    artifact = load_artifact(COMMITTED_ARTIFACT)
    code = {**SHORT, "app_id": "code-java-cs",
            "instruction": "Translate the following Java method into equivalent C#. Reply with "
                           "the C# code only.",
            "input": "public int add(int a, int b) { int s = a + b; return s; }"}
    with TestClient(create_app(ingress_settings(redis_url))) as client:
        answers = []
        for body in (SHORT, code):
            resp = client.post("/v1/predict", json=body)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())
    for body, a in zip((SHORT, code), answers, strict=True):
        assert a["source"] == "model" and a["model_version"] == artifact.version
        assert 1 <= a["predicted_tokens"] <= a["upper_tokens"] <= body["max_tokens"]
        assert a["priority"] == a["predicted_tokens"]
        assert a["ranking_score"] == pytest.approx(math.log1p(a["predicted_tokens"]))
        # The very prediction a queued request gets: same model, same features.
        row = PredictRow(str(body["app_id"]), str(body["user_id"]), str(body["instruction"]),
                         str(body["input"]), a["input_tokens"], int(str(body["max_tokens"])))
        predicted, upper, _ = predictor.predictor.predict_batch([row])[0]
        assert (a["predicted_tokens"], a["upper_tokens"]) == (predicted, upper)
    # A Java method translated to C# is predicted longer than a corrected sentence.
    assert answers[1]["predicted_tokens"] > answers[0]["predicted_tokens"]
    assert redis_client.llen(keys.PREDICT_QUERIES) == 0
    assert redis_client.scard(keys.OPEN_REQUESTS) == 0
    assert redis_client.xlen(keys.STREAM_INCOMING) == 0  # the group made it; nothing in it
    assert int(redis_client.hget(keys.METRICS, "predictor:queries_answered") or 0) == 2


def test_predict_without_a_predictor_is_503_with_retry_after(
        redis_url: str, redis_client: redis.Redis) -> None:
    with TestClient(create_app(ingress_settings(redis_url, predict_timeout_s=0.3))) as client:
        resp = client.post("/v1/predict", json=SHORT)
    assert resp.status_code == 503, resp.text
    assert "predictor" in resp.json()["message"] and resp.headers["Retry-After"]
    assert redis_client.llen(keys.PREDICT_QUERIES) == 1  # bounded list; nothing else written
    assert redis_client.scard(keys.OPEN_REQUESTS) == 0


@pytest.mark.parametrize(("patch", "status", "field"), [
    ({"input": "  "}, 422, "input"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": 513}, 422, "max_tokens"),
    ({"temperature": 0.5}, 422, "temperature"),  # not a prediction input: refused, not ignored
])
def test_bad_predict_input_names_the_field_and_reaches_no_predictor(
        redis_url: str, redis_client: redis.Redis, patch: dict[str, object], status: int,
        field: str) -> None:
    with TestClient(create_app(ingress_settings(redis_url))) as client:
        resp = client.post("/v1/predict", json={**SHORT, **patch})
    assert resp.status_code == status, resp.text
    assert resp.json()["message"].startswith(field)
    assert redis_client.dbsize() == 0


def test_predict_without_max_tokens_asks_with_the_room_the_prompt_leaves(
        redis_url: str, redis_client: redis.Redis) -> None:
    """As a submission without max_tokens would be queued: what the 600-token context leaves
    after the prompt, at most max_tokens_limit (512)."""
    settings = ingress_settings(redis_url, predict_timeout_s=0.3, max_model_len=600)
    body = {k: v for k, v in SHORT.items() if k != "max_tokens"}
    with TestClient(create_app(settings)) as client:
        for words, room_left in ((3, False), (300, True)):
            redis_client.delete(keys.PREDICT_QUERIES)
            resp = client.post("/v1/predict", json={**body, "input": "word " * words})
            assert resp.status_code == 503, resp.text  # no predictor: the query is kept
            query = PredictQuery.parse(redis_client.lindex(keys.PREDICT_QUERIES, 0) or "")
            assert query.max_tokens == (600 - query.input_tokens if room_left else 512)
            assert (query.input_tokens > 600 - 512) == room_left
