"""The GPU worker process: a Celery worker on queue `gpu.<n>` beside one engine server.

    celery -A services.worker.main worker -Q gpu.0 --pool solo -c 1

A heartbeat thread publishes the engine's real KV-cache budget (read from its /metrics) so the
scheduler sizes batches to what this GPU holds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import httpx
from celery.signals import worker_ready, worker_shutdown

from services.engine import client as engine
from services.worker.celery_app import RUN_BATCH_TASK, make_celery
from services.worker.runner import run_batch_sync
from shared import keys
from shared.redis_conn import connect
from shared.schemas import WorkerHeartbeat
from shared.settings import WorkerSettings

log = logging.getLogger("magnus.worker")
logging.getLogger("httpx").setLevel(logging.WARNING)
settings = WorkerSettings()
app = make_celery(settings.redis_url)
_redis = connect(settings.redis_url, settings.redis_connect_timeout_s)
_running_tasks = 0
_running_lock = threading.Lock()
_stop = threading.Event()


@app.task(name=RUN_BATCH_TASK)  # type: ignore[untyped-decorator]
def run_batch(payload: str) -> dict[str, Any]:
    global _running_tasks
    with _running_lock:
        _running_tasks += 1
    try:
        record = run_batch_sync(_redis, settings.engine_url, settings.served_model_name, payload,
                                settings.engine_timeout_s)
    finally:
        with _running_lock:
            _running_tasks -= 1
    log.info("batch %s: %d requests in %.2fs", record.batch_id, record.size, record.measured_s)
    return {"batch_id": record.batch_id, "measured_s": record.measured_s}


def _kv_info() -> engine.KVCacheInfo | None:
    async def fetch() -> engine.KVCacheInfo | None:
        async with httpx.AsyncClient(base_url=settings.engine_url, timeout=10.0) as http:
            return await engine.kv_cache(http)

    return asyncio.run(fetch())


def _heartbeat_loop() -> None:
    kv: engine.KVCacheInfo | None = None
    while not _stop.is_set():
        try:
            if kv is None:
                kv = _kv_info()
            if kv is None and settings.kv_budget_tokens_override is None:
                raise RuntimeError("engine /metrics reports no KV cache and no override is set")
            budget = settings.kv_budget_tokens_override or (kv.kv_budget_tokens if kv else 0)
            beat = WorkerHeartbeat(
                gpu=settings.gpu,
                engine_url=settings.engine_url,
                model=settings.served_model_name,
                kv_budget_tokens=budget,
                kv_block_size=kv.block_size if kv else 0,
                kv_num_blocks=kv.num_blocks if kv else 0,
                max_model_len=settings.max_model_len,
                busy=_running_tasks > 0,
                at=time.time(),
            )
            _redis.set(keys.worker_heartbeat(settings.gpu), beat.model_dump_json(),
                       ex=keys.HEARTBEAT_TTL_S)
        except Exception as exc:  # keep beating through transient engine/redis errors
            log.warning("heartbeat failed: %s", exc)
        _stop.wait(settings.heartbeat_s)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_heartbeat(**_: Any) -> None:
    threading.Thread(target=_heartbeat_loop, name="heartbeat", daemon=True).start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_heartbeat(**_: Any) -> None:
    _stop.set()
    _redis.delete(keys.worker_heartbeat(settings.gpu))
