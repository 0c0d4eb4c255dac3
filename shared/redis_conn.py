"""Connecting to Redis with a retry, so services started before Redis wait instead of dying."""

from __future__ import annotations

import logging
import time

import redis

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
