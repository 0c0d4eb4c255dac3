"""Importing the worker module (as `celery -A services.worker.main` does) builds the Celery app and
nothing else: no Redis connection, no engine, no thread, until Celery's worker_init."""

from __future__ import annotations

import subprocess
import sys

from shared.settings import REPO_ROOT, child_environment

_PROBE = """
import socket, threading
def refuse(*args, **kwargs):
    raise AssertionError("network use at import")
socket.socket.connect = refuse
socket.create_connection = refuse
threads = threading.active_count()
import services.worker.main as m
from shared.tasks import RUN_BATCH_TASK
assert m._context is None
assert RUN_BATCH_TASK in m.app.tasks
assert threading.active_count() == threads
try:
    m.context()
except RuntimeError as exc:
    assert "worker_init" in str(exc)
else:
    raise AssertionError("a context before worker_init")
print("ok")
"""


def test_importing_the_worker_has_no_side_effects() -> None:
    # Port 1: nothing listens there, so a connection attempt would hang in retries or fail.
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120,
                         env=child_environment({"MAGNUS_REDIS_URL": "redis://127.0.0.1:1/0"}))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
