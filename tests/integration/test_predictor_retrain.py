"""Online retraining against real Redis: completed events in, a new model version out, and its
predictions moving toward the new lengths. Drives the service's loop methods directly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import pytest
import redis

from services.predictor.features import EmbedderConfig
from services.predictor.main import PredictorService
from services.predictor.model import ModelConfig, fit_model, save_artifact
from services.predictor.pipeline import Caches, embed_examples, fit_projections, labeled
from shared import keys, state, streams
from shared.schemas import CompletedEvent, PredictedRequest, QueuedRequest, RequestResult
from shared.settings import PredictorSettings
from tests.conftest import FakeEmbedder
from tests.factories import examples

pytestmark = pytest.mark.integration


def settings_for(redis_url: str, tmp_path: Path, artifact: Path | None = None
                 ) -> PredictorSettings:
    return PredictorSettings(
        redis_url=redis_url, artifact_path=artifact or tmp_path / "absent.npz",
        cache_dir=tmp_path / "cache", retrain_every=40, min_train_samples=40,
        retrain_holdout_share=0.2, train_threads=1,
    )


def queued(i: int, app: str = "chat", tag: str = "") -> QueuedRequest:
    return QueuedRequest(request_id=f"{tag}{app}:{i}", app_id=app, user_id=f"{app}:u{i % 4}",
                         instruction=f"You are the {app} app.", input=f"question {i} {tag}",
                         max_tokens=512, input_tokens=30 + i % 20, queued_at=time.time())


def submit(r: redis.Redis, req: QueuedRequest) -> None:
    state.record_queued(r, req)
    streams.publish(r, streams.INCOMING, req)


def complete(r: redis.Redis, req: QueuedRequest, generated: int,
             kind: Literal["request", "requeued"] = "request") -> None:
    now = time.time()
    res = RequestResult(request_id=req.request_id, batch_id="b", gpu=0, text="...",
                        input_tokens=req.input_tokens, generated_tokens=generated,
                        finish_reason="stop", started_at=now, finished_at=now)
    event = CompletedEvent(kind=kind, result=res)
    streams.publish(r, streams.COMPLETED, event)


def predict_one(svc: PredictorService, r: redis.Redis, req: QueuedRequest) -> PredictedRequest:
    submit(r, req)
    assert svc.predict_incoming(block_ms=10) == 1
    _, fields = r.xrevrange(keys.STREAM_PREDICTED, count=1)[0]
    return PredictedRequest.model_validate_json(fields["request"])


def feed(svc: PredictorService, r: redis.Redis, n: int, length: int, tag: str) -> None:
    for i in range(n):
        req = queued(i, tag=tag)
        state.record_queued(r, req)
        complete(r, req, length + (i % 7) - 3)
    while svc.learn_from_completed():
        pass
    assert svc.wait_retrain(timeout_s=120)


def test_cold_start_then_retrains_toward_new_lengths(redis_client: redis.Redis, redis_url: str,
                                                     tmp_path: Path) -> None:
    r = redis_client
    made: list[FakeEmbedder] = []

    def factory(config: EmbedderConfig) -> FakeEmbedder:
        made.append(FakeEmbedder(config))
        return made[-1]

    svc = PredictorService(r, settings_for(redis_url, tmp_path), "t", embedder_factory=factory)
    first = predict_one(svc, r, queued(1000))
    assert first.prediction.source == "default" and first.prediction.model_version == "ladder-n0"
    assert made == []  # cold start does not load an embedder

    feed(svc, r, 60, length=300, tag="a")
    learned = predict_one(svc, r, queued(1001))
    v1 = learned.prediction.model_version
    assert v1.startswith("online-r1-") and learned.prediction.source == "model"
    assert 250 <= learned.prediction.predicted_tokens <= 350
    assert learned.prediction.upper_tokens >= learned.prediction.predicted_tokens
    assert len(made) == 1

    # The store keeps the text the model needs, read from the request hash.
    stored = json.loads(r.lindex(keys.TRAINING_LENGTHS, 0) or "{}")
    assert stored["instruction"] == "You are the chat app." and stored["input"] == "question 0 a"
    assert stored["input_tokens"] == 30 and stored["generated_tokens"] == 297

    # The app's lengths change: the next retrain swaps in a model that follows them.
    feed(svc, r, 200, length=40, tag="b")
    moved = predict_one(svc, r, queued(1002))
    assert moved.prediction.model_version not in (v1, "ladder-n0")
    assert moved.prediction.model_version.startswith("online-r2-")
    assert moved.prediction.predicted_tokens < 0.6 * learned.prediction.predicted_tokens

    metrics = r.hgetall(keys.METRICS)
    assert int(metrics["predictions:default"]) == 1 and int(metrics["predictions:model"]) == 2
    assert metrics["predictor:model_version"] == moved.prediction.model_version
    assert int(metrics["predictor:retrains"]) == 2
    assert len(list((tmp_path / "cache" / "predictor" / "online").glob("*.npz"))) == 2
    # Inputs embedded when predicted are not embedded again when they come back to retrain.
    assert made[0].texts <= 60 + 200 + 3 + 1


def test_partial_results_are_not_learned(redis_client: redis.Redis, redis_url: str,
                                         tmp_path: Path) -> None:
    r = redis_client
    svc = PredictorService(r, settings_for(redis_url, tmp_path), "t",
                           embedder_factory=FakeEmbedder)
    req = queued(1)
    state.record_queued(r, req)
    complete(r, req, 20, kind="requeued")
    assert svc.learn_from_completed() == 0
    assert r.llen(keys.TRAINING_LENGTHS) == 0


def test_artifact_at_start_then_online_retrain(redis_client: redis.Redis, redis_url: str,
                                               tmp_path: Path) -> None:

    r = redis_client
    config = ModelConfig(app_dims=4, user_dims=4, n_estimators=60, max_depth=3, threads=1)
    emb, caches = FakeEmbedder(EmbedderConfig()), Caches.new()
    train, val = examples(40, seed=0), examples(10, seed=1, prefix="v")
    app_raw, user_raw = embed_examples(train, emb, caches)
    app_proj, user_proj = fit_projections(train, app_raw, user_raw, config)
    base = fit_model(labeled(train, app_raw, user_raw, app_proj, user_proj),
                     labeled(val, *embed_examples(val, emb, caches), app_proj, user_proj),
                     app_proj, user_proj, emb.config, config)
    path = save_artifact(base, tmp_path / "predictor.npz")

    svc = PredictorService(r, settings_for(redis_url, tmp_path, artifact=path), "t",
                           embedder_factory=FakeEmbedder)
    before = predict_one(svc, r, queued(1000))
    assert before.prediction.model_version == base.version
    assert before.prediction.source == "model"

    # A new app: unseen by the artifact, then learned online.
    feed(svc, r, 120, length=450, tag="c")
    after = predict_one(svc, r, queued(1001))
    assert after.prediction.model_version.startswith("online-r1-")
    assert after.prediction.predicted_tokens > before.prediction.predicted_tokens + 100

    # A restart with a non-empty store retrains at once from the artifact plus the store.
    again = PredictorService(r, settings_for(redis_url, tmp_path, artifact=path), "t2",
                             embedder_factory=FakeEmbedder)
    assert again.wait_retrain(timeout_s=120)
    assert again.predictor.version.startswith("online-r1-")


def test_continuation_is_predicted_its_remaining_length(redis_client: redis.Redis,
                                                        redis_url: str, tmp_path: Path) -> None:
    r = redis_client
    svc = PredictorService(r, settings_for(redis_url, tmp_path), "t",
                           embedder_factory=FakeEmbedder)
    req = queued(1).model_copy(update={"generated_so_far": 500, "continuation": "so far",
                                       "continuations": 1, "input_tokens": 531})
    p = predict_one(svc, r, req).prediction
    assert 1 <= p.predicted_tokens <= p.upper_tokens <= 12
