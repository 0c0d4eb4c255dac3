"""The predictor service: annotates each incoming request with its predicted generation length.

Reads the incoming stream through a consumer group, predicts each read batch together (one batched
embedding), writes each prediction to the request's state and to the predicted stream in one
transaction, and learns online from the completed stream: each completed length (with its app,
user, instruction and input) goes to a bounded training store, and a background thread retrains
every `retrain_every` completions or `retrain_interval_s`, then swaps the new model in by reference.

    python -m services.predictor.main
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from services.predictor.features import Embedder, EmbedderConfig
from services.predictor.linear import LengthSample, LinearLengthModel
from services.predictor.model import (
    FittedModel,
    LengthPredictor,
    ModelConfig,
    Prediction3,
    fallback_ladder,
    load_artifact,
    save_artifact,
)
from services.predictor.pipeline import Caches, retrain
from services.predictor.rows import Example, PredictRow
from shared import keys, metrics, state, streams
from shared.lifecycle import start_service
from shared.redis_conn import REDIS_DOWN, RedisOutage, connect
from shared.schemas import PredictAnswer, PredictedRequest, Prediction, PredictQuery
from shared.settings import REPO_ROOT, PredictorSettings

log = logging.getLogger("magnus.predictor")
EmbedderFactory = Callable[[EmbedderConfig], Embedder]
_HASH_FIELDS = ("app_id", "user_id", "instruction", "input", "max_tokens", "input_tokens")


def artifact_candidates(settings: PredictorSettings) -> list[Path]:
    if settings.artifact_path is not None:
        return [settings.artifact_path]
    return [settings.cache_dir / "predictor" / "predictor.npz",
            REPO_ROOT / "models" / "predictor" / "predictor.npz"]


def sentence_embedder(settings: PredictorSettings) -> EmbedderFactory:
    def make(config: EmbedderConfig) -> Embedder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedder is a local package
        import torch

        from services.predictor.features import SentenceEmbedder

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        return SentenceEmbedder(config)

    return make


def sample_from_store(raw: str, index: int) -> Example:
    """One stored completion. Entries written before text was stored (app, input tokens and
    length only) still count: for the ladder, and with empty text for the model."""
    d: dict[str, Any] = json.loads(raw)
    return Example(
        app_id=str(d["app_id"]), user_id=str(d.get("user_id", "")),
        instruction=str(d.get("instruction", "")), input=str(d.get("input", "")),
        input_tokens=int(d["input_tokens"]), max_tokens=int(d.get("max_tokens", 0)),
        request_id=str(d.get("request_id", f"store:{index}")),
        generated_tokens=int(d["generated_tokens"]), hit_cap=bool(d.get("hit_cap", False)),
    )


def learnable(finish_reason: str, generated: int, max_tokens: int | None) -> bool:
    """Whether a result is the request's real length. A run stopped by a cap below the request's
    own max_tokens (a scheduler's predicted cap) only says the length is at least that much."""
    if finish_reason == "stop":
        return True
    return finish_reason == "length" and max_tokens is not None and generated >= max_tokens


class PredictorService:
    def __init__(self, r: redis.Redis, settings: PredictorSettings, consumer: str,
                 embedder_factory: EmbedderFactory | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.r, self.settings, self.clock = r, settings, clock
        self.incoming = streams.StreamReader(r, streams.INCOMING, keys.GROUP_PREDICTOR, consumer)
        self.completed = streams.StreamReader(r, streams.COMPLETED,
                                              keys.GROUP_PREDICTOR_TRAINING, consumer)
        self._embedder_factory = embedder_factory or sentence_embedder(settings)
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self.caches = Caches.new(settings.input_cache_size)
        self.base: FittedModel | None = self._load_base() if settings.use_model else None
        if self.base is not None:
            try:
                self._embedder = self._embedder_factory(self.base.embedder)
            except Exception:
                # Serving without the model beats not serving: the ladder answers instead.
                log.exception("could not load the embedder; cold start without the artifact")
                self.base = None
        self.retrains = 0
        self._retrain_thread: threading.Thread | None = None
        self._new_samples = 0
        self._last_retrain = clock()
        store = self._read_store()
        self.predictor = LengthPredictor(self.base, self._ladder(store), self._embedder,
                                         self.caches.input, self.caches.app)
        self._publish_version()
        log.info("predictor %s (%s; %d stored lengths)", self.predictor.version,
                 "learned" if self.base is not None else "cold start", len(store))
        if settings.use_model and store and (self.base is not None or
                                              len(store) >= settings.min_train_samples):
            self._start_retrain()  # a restart picks up what the store learned since the artifact

    # --- models ---------------------------------------------------------------------------

    def _load_base(self) -> FittedModel | None:
        for path in artifact_candidates(self.settings):
            if path.exists():
                model = load_artifact(path, threads=self.settings.train_threads)
                log.info("loaded predictor artifact %s (%s)", path, model.version)
                return model
        log.info("no predictor artifact; cold start")
        return None

    def _embedder_for(self, config: EmbedderConfig) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = self._embedder_factory(config)
            return self._embedder

    def _ladder(self, store: Sequence[Example]) -> LinearLengthModel:
        samples = [] if self.base is None else self.base.base_train.samples()
        samples += [LengthSample(e.app_id, e.input_tokens, e.generated_tokens) for e in store]
        return fallback_ladder(samples, self.settings.default_predicted_tokens)

    def _read_store(self) -> list[Example]:
        raw = self.r.lrange(keys.TRAINING_LENGTHS, 0, -1)
        out = []
        for i, s in enumerate(raw):
            try:
                out.append(sample_from_store(s, i))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a malformed training entry")
        return out

    def _publish_version(self) -> None:
        self.r.hset(keys.METRICS, "predictor:model_version", self.predictor.version)

    # --- prediction -----------------------------------------------------------------------

    def predict_rows(self, predictor: LengthPredictor, rows: Sequence[PredictRow]
                     ) -> tuple[list[Prediction3], str]:
        """Predictions and the version that made them; if the model fails, the ladder answers
        rather than leaving the batch unpredicted."""
        try:
            return predictor.predict_batch(rows), predictor.version
        except Exception:
            log.exception("model prediction failed; answering from the ladder")
            return [predictor.ladder_predict(r) for r in rows], predictor.ladder.version

    def answer_queries(self) -> int:
        """Answer waiting length queries (`POST /v1/predict`), oldest first, in one batch: the
        same model and features as a queued request gets, but nothing is recorded or queued."""
        raw = self.r.rpop(keys.PREDICT_QUERIES, self.settings.read_count)
        if not raw:
            return 0
        queries: list[PredictQuery] = []
        for item in raw if isinstance(raw, list) else [raw]:
            try:
                queries.append(PredictQuery.parse(item))
            except ValueError:
                log.warning("dropped an unreadable length query: %.200r", item)
        if not queries:
            return 0
        predictor = self.predictor
        rows = [PredictRow(q.app_id, q.user_id, q.instruction, q.input, q.input_tokens,
                           q.max_tokens) for q in queries]
        results, version = self.predict_rows(predictor, rows)
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        for q, (predicted, upper, source) in zip(queries, results, strict=True):
            answer = PredictAnswer(query_id=q.query_id, predicted_tokens=predicted,
                                   upper_tokens=upper, model_version=version, source=source,
                                   answered_at=now)
            key = keys.predict_answer(q.query_id)
            pipe.rpush(key, answer.model_dump_json())
            pipe.expire(key, keys.PREDICT_ANSWER_TTL_S)
        pipe.hincrby(keys.METRICS, "predictor:queries_answered", len(queries))
        pipe.execute()
        return len(queries)

    def predict_incoming(self, block_ms: int = 50) -> int:
        entries = self.incoming.read(self.settings.read_count, block_ms)
        if not entries:
            return 0
        started = time.monotonic()
        predictor = self.predictor  # one model for the whole batch, even if a swap happens now
        reqs = [req for _, req in entries]
        # A continuation's prompt has grown by its output so far: the model wants the original.
        rows = [PredictRow(q.app_id, q.user_id, q.instruction, q.input,
                           max(q.input_tokens - q.generated_so_far, 1), q.max_tokens,
                           q.generated_so_far) for q in reqs]
        results, version = self.predict_rows(predictor, rows)
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        sources: Counter[str] = Counter()
        for req, (predicted, upper, source) in zip(reqs, results, strict=True):
            prediction = Prediction(
                request_id=req.request_id, predicted_tokens=predicted, upper_tokens=upper,
                model_version=version, source=source, predicted_at=now,
            )
            state.record_predicted(pipe, prediction)
            sources[source.value] += 1
            streams.publish(pipe, streams.PREDICTED,
                            PredictedRequest(request=req, prediction=prediction))
        for source_name, n in sources.items():
            pipe.hincrby(keys.METRICS, f"predictions:{source_name}", n)
        self.incoming.ack(pipe, [entry_id for entry_id, _ in entries])
        pipe.execute()
        for source_name, n in sources.items():
            metrics.PREDICTIONS.labels(source=source_name).inc(n)
        metrics.PREDICTION_DURATION.observe(time.monotonic() - started)
        return len(entries)

    # --- online learning ------------------------------------------------------------------

    def learn_from_completed(self) -> int:
        """Store each completed request's real length with its text; retrain in the background
        every `retrain_every` new samples or `retrain_interval_s`."""
        entries = self.completed.read(256, block_ms=1)
        if entries:
            results = []
            for _, event in entries:
                # A requeued run's result is partial: its final result comes later.
                if event.kind == "request" and event.result is not None and \
                        event.result.finish_reason != "error":
                    results.append(event.result)
            lookup = self.r.pipeline(transaction=False)
            for res in results:
                lookup.hmget(keys.request(res.request_id), list(_HASH_FIELDS))
            hashes = lookup.execute() if results else []
            cap = self.settings.training_text_max_chars
            pipe = self.r.pipeline(transaction=True)
            learned = 0
            for res, values in zip(results, hashes, strict=True):
                h = dict(zip(_HASH_FIELDS, values, strict=True))
                max_tokens = int(h["max_tokens"]) if h["max_tokens"] is not None else None
                if h["app_id"] is None or not learnable(res.finish_reason, res.generated_tokens,
                                                        max_tokens):
                    continue
                sample = {
                    "request_id": res.request_id, "app_id": h["app_id"],
                    "user_id": h["user_id"] or "", "instruction": (h["instruction"] or "")[:cap],
                    "input": (h["input"] or "")[:cap],
                    # The prompt as queued: a continuation's last run saw a longer one.
                    "input_tokens": int(h["input_tokens"] or res.input_tokens),
                    "generated_tokens": res.generated_tokens, "max_tokens": max_tokens,
                    "hit_cap": res.finish_reason == "length",
                }
                pipe.rpush(keys.TRAINING_LENGTHS, json.dumps(sample))
                learned += 1
            pipe.ltrim(keys.TRAINING_LENGTHS, -self.settings.training_store_max, -1)
            self.completed.ack(pipe, [entry_id for entry_id, _ in entries])
            pipe.execute()
            self._new_samples += learned
        else:
            learned = 0
        self.maybe_retrain()
        return learned

    def maybe_retrain(self) -> bool:
        due = self._new_samples >= self.settings.retrain_every or (
            self._new_samples > 0
            and self.clock() - self._last_retrain >= self.settings.retrain_interval_s)
        if not due or self.retraining:
            return False
        self._new_samples = 0
        self._last_retrain = self.clock()
        self._start_retrain()
        return True

    @property
    def retraining(self) -> bool:
        return self._retrain_thread is not None and self._retrain_thread.is_alive()

    def _start_retrain(self) -> None:
        self.retrains += 1
        self._retrain_thread = threading.Thread(
            target=self._retrain_job, args=(self.retrains,), name="predictor-retrain",
            daemon=True)
        self._retrain_thread.start()

    def wait_retrain(self, timeout_s: float | None = None) -> bool:
        """Wait for a background retrain in progress (tests, shutdown). True if none is left."""
        t = self._retrain_thread
        if t is not None:
            t.join(timeout_s)
        return not self.retraining

    def _retrain_job(self, generation: int) -> None:
        try:
            self._retrain(generation)
        except Exception:
            # The old model keeps serving; the next trigger tries again.
            log.exception("predictor retrain %d failed", generation)

    def _retrain(self, generation: int) -> None:
        t0 = time.monotonic()
        store = self._read_store()
        ladder = self._ladder(store)
        model: FittedModel | None = None
        embedder = self._embedder
        s = self.settings
        if s.use_model and (self.base is not None or len(store) >= s.min_train_samples):
            embedder = self._embedder_for(EmbedderConfig() if self.base is None
                                          else self.base.embedder)
            model = retrain(self.base, store, embedder, self.caches,
                            ModelConfig(threads=s.train_threads), s.retrain_holdout_share,
                            s.min_train_samples, version_prefix=f"online-r{generation}")
        if model is None and self.predictor.model is not None:
            model = self.predictor.model  # keep the learned model; only the ladder moved
        predictor = LengthPredictor(model, ladder, embedder, self.caches.input, self.caches.app)
        if model is not None and model is not self.predictor.model:
            self._write_online(model)
        self.predictor = predictor  # the swap: one reference assignment
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(keys.METRICS, "predictor:model_version", predictor.version)
        pipe.hincrby(keys.METRICS, "predictor:retrains", 1)
        pipe.execute()
        log.info("predictor retrain %d: %s from %d stored lengths in %.1fs", generation,
                 predictor.version, len(store), time.monotonic() - t0)

    def _write_online(self, model: FittedModel) -> None:
        folder = self.settings.online_dir or self.settings.cache_dir / "predictor" / "online"
        try:
            save_artifact(model, folder / f"{model.version}.npz")
            old = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
            for p in old[: -self.settings.online_keep]:
                with contextlib.suppress(OSError):
                    p.unlink()
        except OSError:
            log.exception("could not write the retrained model to %s", folder)

    def claim_abandoned(self) -> int:
        """Take over entries a dead predictor read and never acknowledged (its consumer name
        died with its process): without this they would wait forever."""
        idle_ms = int(self.settings.claim_idle_s * 1000)
        claimed = (self.incoming.claim_all_pending(idle_ms)
                   + self.completed.claim_all_pending(idle_ms))
        if claimed:
            log.warning("predictor: took over %d entries a stopped predictor left", claimed)
        return claimed

    def beat(self) -> None:
        """Say this process is ready (model loaded, reading): the launcher waits for it, so a
        benchmark's first requests do not wait for a predictor still starting."""
        self.r.set(keys.PREDICTOR_HEARTBEAT, str(os.getpid()), ex=keys.HEARTBEAT_TTL_S)

    def run(self, stop: threading.Event) -> None:
        outage = RedisOutage("predictor")
        last_claim = last_beat = -math.inf
        while not stop.is_set():
            try:
                if self.clock() - last_beat >= keys.HEARTBEAT_TTL_S / 5:
                    self.beat()
                    last_beat = self.clock()
                if self.clock() - last_claim >= self.settings.claim_interval_s:
                    self.claim_abandoned()
                    last_claim = self.clock()
                self.answer_queries()
                self.predict_incoming()
                self.learn_from_completed()
                outage.recovered()
            except REDIS_DOWN as exc:
                outage.failed(exc, stop)
                self.incoming.reread_pending()
                self.completed.reread_pending()


def main() -> int:
    stop = start_service()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = PredictorSettings()
    metrics.serve(settings.metrics_port, settings.metrics_host)
    r = connect(settings.redis_url, settings.redis_connect_timeout_s)
    PredictorService(r, settings, consumer=f"predictor-{os.getpid()}").run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
