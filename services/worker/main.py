"""The GPU worker process: a Celery worker on its GPU's queue (`<node>.gpu.<id>`, keys.celery_queue)
beside one engine server.

    celery -A services.worker.main worker -Q local.gpu.0 --pool solo -c 1        (static mode)
    celery -A services.worker.main worker -Q local.gpu.0 --pool threads -c 64    (continuous mode)

Importing this module only builds the Celery app (`celery -A` needs `app` at import). Everything
else (settings validation, the Redis connection, the engine) is made in Celery's `worker_init`
signal, which fires in the worker's own process before it consumes anything, and held in one
`WorkerContext`; the heartbeat starts on `worker_ready` and stops on `worker_shutdown`. The solo and
threads pools the launcher uses run tasks in that same process (`worker_process_init` fires only
in prefork children, which Magnus does not use: its busy flag and heartbeat are per process).

A heartbeat thread publishes the engine's real KV-cache budget (read from the engine itself) so the
scheduler sizes batches to what this GPU holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from celery.signals import worker_init, worker_ready, worker_shutdown, worker_shutting_down

from services.engine import get_engine
from services.engine.base import Engine, KVCacheInfo, engine_headers
from services.worker.runner import Shutdown, WorkerIdentity, run_batch_sync
from shared import keys, metrics, state
from shared.redis_conn import connect
from shared.schemas import BatchRecord, WorkerHeartbeat
from shared.settings import MagnusSettings, WorkerSettings
from shared.tasks import RUN_BATCH_TASK, make_celery

log = logging.getLogger("magnus.worker")


@dataclass
class WorkerContext:
    """What a running worker holds: its settings, Redis, its engine and the heartbeat's state."""

    settings: WorkerSettings
    redis: redis.Redis
    engine: Engine
    # This process in heartbeats and batch claims: a newer process beating for the GPU tells the
    # scheduler that batches an earlier one started died with it.
    identity: WorkerIdentity = field(default_factory=WorkerIdentity.of_this_process, init=False)
    stop: threading.Event = field(default_factory=threading.Event, init=False)
    # Set when the worker is asked to stop: a batch in hand is finished or handed back.
    stopping: threading.Event = field(default_factory=threading.Event, init=False)
    # Tasks running now: several at once in the threads pool (continuous mode).
    running_tasks: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _heartbeat: threading.Thread | None = field(default=None, init=False, repr=False)
    _kv: KVCacheInfo | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, settings: WorkerSettings | None = None) -> WorkerContext:
        """Validate settings (fail fast at start-up), pick the engine and wait for Redis."""
        settings = settings or WorkerSettings()
        engine = get_engine(settings.engine)
        r = connect(settings.redis_url, settings.redis_connect_timeout_s)
        return cls(settings=settings, redis=r, engine=engine)

    def wait_for_engine(self) -> None:
        """Block until this GPU's engine serves. Called before the worker consumes: a worker
        restarted beside a restarting engine would otherwise fail every batch waiting in its
        queue ("all connection attempts failed")."""
        s = self.settings
        log.info("waiting for the engine at %s", s.engine_url)
        self.engine.wait_ready(s.engine_url, s.engine_ready_timeout_s)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.running_tasks > 0

    def run_batch(self, payload: str | bytes | Mapping[str, Any]) -> BatchRecord | None:
        s = self.settings
        with self._lock:
            self.running_tasks += 1
        try:
            return run_batch_sync(self.redis, self.engine, s.engine_url, s.served_model_name,
                                  payload, s.engine_timeout_s, self.identity,
                                  s.max_reruns, s.engine_ready_timeout_s,
                                  Shutdown(self.stopping, s.shutdown_handback_s),
                                  s.engine_api_key)
        finally:
            with self._lock:
                self.running_tasks -= 1

    def kv_info(self) -> KVCacheInfo | None:
        async def fetch() -> KVCacheInfo | None:
            async with httpx.AsyncClient(
                    base_url=self.settings.engine_url, timeout=10.0,
                    headers=engine_headers(self.settings.engine_api_key)) as http:
                return await self.engine.kv_budget(http)

        return asyncio.run(fetch())

    def beat(self, kv: KVCacheInfo | None) -> None:
        s = self.settings
        if kv is None and s.kv_budget_tokens_override is None:
            raise RuntimeError("the engine reports no KV cache and no override is set")
        budget = s.kv_budget_tokens_override or (kv.kv_budget_tokens if kv else 0)
        beat = WorkerHeartbeat(
            gpu=s.gpu,
            node=s.node,
            engine_url=s.engine_url,
            model=s.served_model_name,
            kv_budget_tokens=budget,
            kv_block_size=kv.block_size if kv else 0,
            kv_num_blocks=kv.num_blocks if kv else 0,
            max_model_len=s.max_model_len,
            busy=self.busy,
            at=time.time(),
            worker_id=self.identity.worker_id,
            worker_started_at=self.identity.started_at,
        )
        self.redis.set(keys.worker_heartbeat(s.gpu), beat.model_dump_json(),
                       ex=keys.HEARTBEAT_TTL_S)

    def beat_once(self) -> None:
        if self._kv is None:
            self._kv = self.kv_info()
        self.beat(self._kv)

    def _heartbeat_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.beat_once()
            except Exception as exc:  # keep beating through transient engine/redis errors
                log.warning("heartbeat failed: %s", exc)
            self.stop.wait(self.settings.heartbeat_s)

    def start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat",
                                               daemon=True)
            self._heartbeat.start()

    def shutdown(self) -> None:
        self.stop.set()
        # The scheduler stops sending to this GPU at once instead of when the heartbeat expires.
        self.redis.delete(keys.worker_heartbeat(self.settings.gpu))
        self.redis.close()


# `celery -A` needs the app, so its broker URL, at import; creating it connects to nothing. The
# worker's own settings are checked in `worker_init`.
_celery_settings = MagnusSettings()
app = make_celery(_celery_settings.redis_url, _celery_settings.broker_visibility_timeout_s)
_context: WorkerContext | None = None


def context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker not started: its context is made in Celery's worker_init")
    return _context


@app.task(name=RUN_BATCH_TASK)  # type: ignore[untyped-decorator]
def run_batch(payload: str) -> dict[str, Any]:
    record = context().run_batch(payload)
    if record is None:
        return {"skipped": True}
    log.info("batch %s: %d requests in %.2fs", record.batch_id, record.size, record.measured_s)
    return {"batch_id": record.batch_id, "measured_s": record.measured_s}


@worker_init.connect  # type: ignore[untyped-decorator]
def _init_worker(**_: Any) -> None:
    global _context
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _context = WorkerContext.create()
    # Before anything is consumed: a GPU id another node holds is a configuration error.
    state.register_gpu(_context.redis, _context.settings.gpu, _context.settings.node)
    metrics.serve(_context.settings.metrics_port, _context.settings.metrics_host)
    # worker_init fires before the consumer starts: nothing is taken from the queue until the
    # engine answers, and this process beats before it claims anything, so the scheduler knows
    # it replaced whoever beat before (a dead predecessor's batches are rerun at once).
    _context.wait_for_engine()
    try:
        _context.beat_once()
    except Exception as exc:  # the heartbeat thread keeps trying
        log.warning("first heartbeat failed: %s", exc)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_heartbeat(**_: Any) -> None:
    context().start_heartbeat()


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _asked_to_stop(**_: Any) -> None:
    # Celery's warm shutdown (SIGTERM) waits for the task in hand: it finishes it or, after
    # shutdown_handback_s, hands its unfinished requests back (runner.Shutdown). Called in the
    # signal handler: only an Event is set here.
    if _context is not None:
        _context.stopping.set()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_heartbeat(**_: Any) -> None:
    if _context is not None:
        _context.shutdown()
