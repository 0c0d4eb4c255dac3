"""The Celery application shared by the scheduler (which sends batches) and the GPU workers.

One queue per GPU (`gpu.0`, ...); workers run concurrency 1 with prefetch 1 so a GPU holds one batch
at a time, and ack late with reject-on-worker-lost so a batch on a dead worker runs again.
"""

from __future__ import annotations

from celery import Celery

RUN_BATCH_TASK = "magnus.run_batch"


def make_celery(redis_url: str) -> Celery:
    app = Celery("magnus", broker=redis_url)
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
    )
    return app
