"""Connecting to Redis with a retry, so services started before Redis wait instead of dying."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")

log = logging.getLogger(__name__)


def connect(url: str, timeout_s: float = 30.0) -> redis.Redis:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        client: redis.Redis = redis.Redis.from_url(url, decode_responses=True)
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() >= deadline:
                raise
            log.info("waiting for redis at %s", url)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# Redis unreachable, restarting or still loading its append-only file: wait and retry. Any other
# Redis error (a wrong type, a script error) is a bug and propagates.
REDIS_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


class RedisOutage:
    """Backoff while Redis is unreachable, for a service loop that must ride it out: `failed`
    after each failed step (it logs the first, then waits 0.1 s doubling to `max_delay_s`),
    `recovered` after the first step that succeeds again (True once per outage, so the caller
    can resync what it keeps in memory)."""

    def __init__(self, service: str, max_delay_s: float = 5.0) -> None:
        self.service, self.max_delay_s = service, max_delay_s
        self.down_since: float | None = None
        self.delay = 0.1

    def failed(self, exc: Exception, stop: threading.Event) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s: redis unreachable (%s: %s); retrying with backoff", self.service,
                        type(exc).__name__, exc)
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.max_delay_s)

    def recovered(self) -> bool:
        if self.down_since is None:
            return False
        log.info("%s: redis back after %.1f s", self.service, time.monotonic() - self.down_since)
        self.down_since, self.delay = None, 0.1
        return True


def call_retrying(call: Callable[[], T], give_up_s: float = 120.0) -> T:
    """`call()`, retried through a Redis outage for up to `give_up_s` (0.1 s doubling to 5 s):
    a worker's write while Redis restarts is delayed, not lost."""
    deadline = time.monotonic() + give_up_s
    delay = 0.1
    while True:
        try:
            return call()
        except REDIS_DOWN as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("redis unreachable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def execute_retrying(r: redis.Redis, build: Callable[[redis.client.Pipeline], None],
                     give_up_s: float = 120.0) -> list[Any]:
    """Run the transaction `build` writes into a fresh pipeline, retrying through a Redis
    outage (rebuilt on each try: a failed pipeline forgets its commands)."""

    def once() -> list[Any]:
        pipe = r.pipeline(transaction=True)
        build(pipe)
        return list(pipe.execute())

    return call_retrying(once, give_up_s)
