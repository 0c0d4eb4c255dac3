"""The predictor service: annotates each incoming request with its predicted generation length.

Reads the incoming stream through a consumer group, writes each prediction to the request's state and
to the predicted stream in one transaction, and learns online from the completed stream.

    python -m services.predictor.main
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from types import FrameType

import redis

from services.predictor.linear import LengthSample, LinearLengthModel
from shared import keys, state
from shared.redis_conn import connect
from shared.schemas import (
    CompletedEvent,
    PredictedRequest,
    Prediction,
    QueuedRequest,
)
from shared.settings import PredictorSettings
from shared.streams import GroupReader

log = logging.getLogger("magnus.predictor")


class PredictorService:
    def __init__(self, r: redis.Redis, settings: PredictorSettings, consumer: str) -> None:
        self.r, self.settings = r, settings
        self.incoming = GroupReader(r, keys.STREAM_INCOMING, keys.GROUP_PREDICTOR, consumer)
        self.completed = GroupReader(r, keys.STREAM_COMPLETED, keys.GROUP_PREDICTOR_TRAINING,
                                     consumer)
        self.model = self._fit()
        self._new_samples = 0

    def _fit(self) -> LinearLengthModel:
        raw = self.r.lrange(keys.TRAINING_LENGTHS, 0, -1)
        samples = [LengthSample(**json.loads(s)) for s in raw]
        model = LinearLengthModel.fit(
            samples, version=f"linear-n{len(samples)}-{int(time.time())}",
            min_samples_per_app=self.settings.min_samples_per_app,
            default_tokens=self.settings.default_predicted_tokens,
        )
        log.info("predictor model %s (%d apps)", model.version, len(model.apps))
        return model

    def predict_incoming(self, block_ms: int = 200) -> int:
        entries = self.incoming.read(self.settings.read_count, block_ms)
        if not entries:
            return 0
        model = self.model
        pipe = self.r.pipeline(transaction=True)
        for _, fields in entries:
            req = QueuedRequest.model_validate_json(fields["request"])
            predicted, upper, source = model.predict(req.app_id, req.input_tokens, req.max_tokens)
            prediction = Prediction(
                request_id=req.request_id, predicted_tokens=predicted, upper_tokens=upper,
                model_version=model.version, source=source, predicted_at=time.time(),
            )
            state.record_predicted(pipe, prediction)
            pipe.hincrby(keys.METRICS, f"predictions:{source.value}", 1)
            pipe.xadd(
                keys.STREAM_PREDICTED,
                {"request": PredictedRequest(request=req, prediction=prediction).model_dump_json()},
                maxlen=keys.STREAM_MAXLEN, approximate=True,
            )
        self.incoming.ack(pipe, [entry_id for entry_id, _ in entries])
        pipe.execute()
        return len(entries)

    def learn_from_completed(self) -> int:
        """Store each completed request's real length; refit every `retrain_every` new samples."""
        entries = self.completed.read(256, block_ms=1)
        if not entries:
            return 0
        pipe = self.r.pipeline(transaction=True)
        learned = 0
        for _, fields in entries:
            event = CompletedEvent.model_validate_json(fields["event"])
            res = event.result
            if res is None or res.finish_reason == "error":
                continue
            app_id = self.r.hget(keys.request(res.request_id), "app_id")
            if app_id is None:
                continue
            sample = {"app_id": app_id, "input_tokens": res.input_tokens,
                      "generated_tokens": res.generated_tokens}
            pipe.rpush(keys.TRAINING_LENGTHS, json.dumps(sample))
            learned += 1
        pipe.ltrim(keys.TRAINING_LENGTHS, -keys.TRAINING_MAXLEN, -1)
        self.completed.ack(pipe, [entry_id for entry_id, _ in entries])
        pipe.execute()
        self._new_samples += learned
        if self._new_samples >= self.settings.retrain_every:
            self._new_samples = 0
            self.model = self._fit()  # a reference swap: predictions in flight keep the old one
        return learned

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.predict_incoming()
            self.learn_from_completed()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = PredictorSettings()
    r = connect(settings.redis_url, settings.redis_connect_timeout_s)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    PredictorService(r, settings, consumer=f"predictor-{os.getpid()}").run(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
