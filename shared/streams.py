"""Consumer-group reading shared by the services: pending entries first, then new ones."""

from __future__ import annotations

import redis


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class GroupReader:
    """Reads a stream through a consumer group.

    After a restart a consumer first re-reads what it was given but never acknowledged, so a crash
    between reading and acknowledging loses nothing.
    """

    def __init__(self, r: redis.Redis, stream: str, group: str, consumer: str) -> None:
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self._pending_done = False
        ensure_group(r, stream, group)

    def read(self, count: int, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        start = ">" if self._pending_done else "0"
        reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count,
                                  block=None if start == "0" else block_ms)
        entries: list[tuple[str, dict[str, str]]] = reply[0][1] if reply else []
        if start == "0" and not entries:
            self._pending_done = True
        return entries

    def ack(self, pipe: redis.client.Pipeline, entry_ids: list[str]) -> None:
        if entry_ids:
            pipe.xack(self.stream, self.group, *entry_ids)
