"""The Celery contract between the scheduler (which sends batches) and the GPU workers (which run
them): the task name, the Celery configuration, and the typed batch message both sides use.

One queue per GPU (`<node>.gpu.<id>`: `local.gpu.0`, ...); workers run concurrency 1 with
prefetch 1 so a GPU holds one batch at a time, and ack late with reject-on-worker-lost so a batch
on a dead worker runs again. The batch travels as `Batch` JSON (never pickle) in the task's one
argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote

from celery import Celery

from shared import keys
from shared.redis_conn import is_sentinel_url, parse_sentinel_url
from shared.schemas import Batch

RUN_BATCH_TASK = "magnus.run_batch"


def celery_broker(redis_url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and transport options for MAGNUS_REDIS_URL. A `redis://` URL is the
    broker as it is. A `sentinel://` URL (shared/redis_conn.py) becomes kombu's Sentinel
    transport: one `sentinel://host:port/db` per Sentinel joined by `;`, the master name (and
    the Sentinels' own credentials) in the transport options; the primary's credentials ride
    in each URL. Workers and the scheduler's sender then follow a failover too."""
    if not is_sentinel_url(redis_url):
        return redis_url, {}
    s = parse_sentinel_url(redis_url)
    auth = ""
    if s.username is not None or s.password is not None:
        auth = f"{quote(s.username or '', safe='')}:{quote(s.password or '', safe='')}@"
    broker = ";".join(f"sentinel://{auth}{f'[{host}]' if ':' in host else host}:{port}/{s.db}"
                      for host, port in s.sentinels)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if s.sentinel_username is not None:
        sentinel_kwargs["username"] = s.sentinel_username
    if s.sentinel_password is not None:
        sentinel_kwargs["password"] = s.sentinel_password
    return broker, {"master_name": s.master, "sentinel_kwargs": sentinel_kwargs}


def make_celery(redis_url: str, visibility_timeout_s: float = 60.0) -> Celery:
    broker, transport_options = celery_broker(redis_url)
    app = Celery("magnus", broker=broker)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_connection_retry_on_startup=True,
        # Results travel on Magnus's own completed stream, not Celery's result backend.
        task_track_started=False,
        worker_hijack_root_logger=False,
        # A message a dead worker took and never claimed comes back after this long (workers
        # restore expired messages every 10 s); copies of a claimed batch are skipped.
        broker_transport_options={**transport_options,
                                  "visibility_timeout": visibility_timeout_s},
    )
    return app


class TaskSender(Protocol):
    """What sending needs of a Celery app (tests pass a recorder instead)."""

    def send_task(self, name: str, args: list[str], queue: str) -> object: ...


def send_batch(celery: TaskSender, batch: Batch) -> None:
    """Queue `batch` for its GPU's worker."""
    celery.send_task(RUN_BATCH_TASK, args=[batch.model_dump_json()],
                     queue=keys.celery_queue(batch.gpu, batch.node))


def parse_batch(payload: str | bytes | Mapping[str, Any]) -> Batch:
    """The worker's side: the task argument as a `Batch`; `SchemaVersionError` for a batch of
    another schema version, pydantic's `ValidationError` for anything else unreadable."""
    return Batch.parse(payload)
