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
        if not self._pending_done:
            reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
            pending: list[tuple[str, dict[str, str]]] = reply[0][1] if reply else []
            if pending:
                return pending
            self._pending_done = True
        reply = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count,
                                  block=block_ms)
        return reply[0][1] if reply else []

    def claim_all_pending(self) -> int:
        """Take over entries other consumers of the group read but never acknowledged (a leader
        that died mid-step); they are re-read as this consumer's own pending entries."""
        claimed, start = 0, "0-0"
        while True:
            # The full reply form carries the cursor (justid=True drops it in redis-py).
            reply = self.r.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=0,
                                      start_id=start, count=500)
            start, entries = reply[0], reply[1]
            claimed += len(entries)
            if start in ("0-0", b"0-0"):
                break
        self._pending_done = False
        return claimed

    def ack(self, pipe: redis.client.Pipeline, entry_ids: list[str]) -> None:
        if entry_ids:
            pipe.xack(self.stream, self.group, *entry_ids)
