"""The Redis streams between the services, typed: one `StreamSpec` per stream (its key, the one
field its entries carry and that field's message type), `publish` to write an entry and
`StreamReader` to read parsed `(entry id, message)` pairs through a consumer group.

    INCOMING   ingress, worker (continuations) -> predictor    QueuedRequest
    PREDICTED  predictor -> scheduler                          PredictedRequest
    COMPLETED  worker -> scheduler, predictor (training)       CompletedEvent
    per request text (keys.request_text) worker -> ingress     TextDelta (no consumer group:
               one reader, the ingress answering the stream, reads from the start)

An entry that cannot be read (another `schema_version`, malformed JSON, no field) is refused: the
reader logs it, acknowledges it and goes on, so one poison entry cannot block a consumer forever.
A refused entry of a request stream fails its request with the reason (the poll API shows it), so
no request silently disappears; when no request can be found for it, it is logged at error level.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import redis

from shared import keys, state
from shared.schemas import (
    CompletedEvent,
    Message,
    PredictedRequest,
    QueuedRequest,
    TextDelta,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class MalformedEntry(ValueError):
    """A stream entry without the field its stream's messages travel in."""


@dataclass(frozen=True)
class StreamSpec(Generic[M]):
    name: str
    key: str
    field: str
    message: type[M]
    # Where a raw entry keeps its request id (a path into the JSON), for failing the request when
    # its entry is refused; None: the stream's entries are no request's only record.
    request_id_path: tuple[str, ...] | None = None

    def encode(self, message: M) -> dict[str, str]:
        return {self.field: message.model_dump_json()}

    def decode(self, fields: Mapping[str, str]) -> M:
        """The entry's message; `SchemaVersionError`, `ValidationError` or `MalformedEntry` (all
        `ValueError`s) when it cannot be read."""
        raw = fields.get(self.field)
        if raw is None:
            raise MalformedEntry(f"{self.name} entry has no {self.field!r} field "
                                 f"(fields: {sorted(fields)})")
        return self.message.parse(raw)

    def request_id_in(self, fields: Mapping[str, str]) -> str | None:
        """The request id of an entry that could not be parsed, if the raw JSON still has one."""
        if self.request_id_path is None or self.field not in fields:
            return None
        try:
            node: Any = json.loads(fields[self.field])
        except ValueError:
            return None
        for part in self.request_id_path:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return node if isinstance(node, str) and node else None


INCOMING: StreamSpec[QueuedRequest] = StreamSpec(
    "incoming", keys.STREAM_INCOMING, "request", QueuedRequest, ("request_id",))
PREDICTED: StreamSpec[PredictedRequest] = StreamSpec(
    "predicted", keys.STREAM_PREDICTED, "request", PredictedRequest, ("request", "request_id"))
# A completed event's request state was written by the worker in the same transaction as the
# entry, so a refused entry loses no request (only what a reader would have learnt from it).
COMPLETED: StreamSpec[CompletedEvent] = StreamSpec(
    "completed", keys.STREAM_COMPLETED, "event", CompletedEvent)


class StreamWriter(Protocol):
    """A Redis client or pipeline (a pipeline lets the write join a stage's transaction)."""

    def xadd(self, name: str, fields: Any, *args: Any, **kwargs: Any) -> Any: ...


def publish(r: StreamWriter, spec: StreamSpec[M], message: M) -> None:
    # Trimmed approximately (cheap in Redis); consumers keep up far before the bound.
    r.xadd(spec.key, spec.encode(message), maxlen=keys.STREAM_MAXLEN, approximate=True)


TEXT_FIELD = "delta"


def append_text(pipe: Any, request_id: str, deltas: list[TextDelta]) -> None:
    """Queue `deltas` on a pipeline: appended to the request's text stream, which lives as long
    as the request's hash."""
    key = keys.request_text(request_id)
    for delta in deltas:
        pipe.xadd(key, {TEXT_FIELD: delta.model_dump_json()},
                  maxlen=keys.TEXT_STREAM_MAXLEN, approximate=True)
    pipe.expire(key, keys.REQUEST_TTL_S)


def decode_text(fields: Mapping[str, str]) -> TextDelta:
    """A text stream entry; a `ValueError` when it cannot be read."""
    raw = fields.get(TEXT_FIELD)
    if raw is None:
        raise MalformedEntry(f"text entry without a {TEXT_FIELD!r} field")
    return TextDelta.parse(raw)


def read_range(r: redis.Redis, spec: StreamSpec[M], start: str = "-", end: str = "+",
               count: int | None = None) -> list[tuple[str, M]]:
    """Entries by id range, outside any consumer group (benchmarks, tests); unreadable entries are
    logged and left out."""
    out: list[tuple[str, M]] = []
    for entry_id, fields in r.xrange(spec.key, start, end, count=count):
        try:
            out.append((entry_id, spec.decode(fields)))
        except ValueError as exc:
            log.warning("skipping unreadable %s entry %s: %s", spec.name, entry_id, exc)
    return out


def ensure_group(r: redis.Redis, stream: str, group: str) -> None:
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class GroupReader:
    """Reads a stream's raw entries through a consumer group (the mechanism under
    `StreamReader`; services read through `StreamReader`).

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

    def claim_all_pending(self, min_idle_ms: int = 0) -> int:
        """Take over entries other consumers of the group read but never acknowledged (a leader
        that died mid-step, a predictor killed mid-batch) and left idle at least `min_idle_ms`;
        they are re-read as this consumer's own pending entries."""
        claimed, start = 0, "0-0"
        while True:
            # The full reply form carries the cursor (justid=True drops it in redis-py).
            reply = self.r.xautoclaim(self.stream, self.group, self.consumer,
                                      min_idle_time=min_idle_ms, start_id=start, count=500)
            start, entries = reply[0], reply[1]
            claimed += len(entries)
            if start in ("0-0", b"0-0"):
                break
        self._pending_done = False
        return claimed

    def reread_pending(self) -> None:
        """Read this consumer's unacknowledged entries again first (after a failed step: its
        acknowledgement may not have reached Redis)."""
        self._pending_done = False

    def ack(self, pipe: redis.client.Pipeline, entry_ids: list[str]) -> None:
        if entry_ids:
            pipe.xack(self.stream, self.group, *entry_ids)


@dataclass(frozen=True)
class Refused:
    entry_id: str
    fields: dict[str, str]
    error: ValueError


class StreamReader(Generic[M]):
    """One stream read through a consumer group as parsed `(entry id, message)` pairs.

    Pending entries first, as `GroupReader`. The caller acknowledges what it handled with `ack`,
    in the same transaction as its effects; refused entries are acknowledged here (see the module
    docstring), and a read that refused everything it got reads again, so an empty answer still
    means the stream had nothing.
    """

    def __init__(self, r: redis.Redis, spec: StreamSpec[M], group: str, consumer: str) -> None:
        self.r, self.spec = r, spec
        self.raw = GroupReader(r, spec.key, group, consumer)
        self.refused = 0

    def read(self, count: int, block_ms: int) -> list[tuple[str, M]]:
        while True:
            entries = self.raw.read(count, block_ms)
            if not entries:
                return []
            parsed: list[tuple[str, M]] = []
            refused: list[Refused] = []
            for entry_id, fields in entries:
                try:
                    parsed.append((entry_id, self.spec.decode(fields)))
                except ValueError as exc:
                    refused.append(Refused(entry_id, fields, exc))
            if refused:
                self._refuse(refused)
            if parsed:
                return parsed

    def ack(self, pipe: redis.client.Pipeline, entry_ids: list[str]) -> None:
        self.raw.ack(pipe, entry_ids)

    def claim_all_pending(self, min_idle_ms: int = 0) -> int:
        return self.raw.claim_all_pending(min_idle_ms)

    def reread_pending(self) -> None:
        self.raw.reread_pending()

    def _refuse(self, refused: list[Refused]) -> None:
        """Fail the refused entries' requests that are still open, and acknowledge the entries,
        in one transaction."""
        request_ids = [self.spec.request_id_in(x.fields) for x in refused]
        status = state.statuses(self.r, [rid for rid in request_ids if rid is not None])
        now = time.time()
        pipe = self.r.pipeline(transaction=True)
        for entry, rid in zip(refused, request_ids, strict=True):
            reason = f"refused on the {self.spec.name} stream: {entry.error}"
            current = status.get(rid) if rid is not None else None
            if rid is not None and current is not None and not current.is_final:
                state.record_failed(pipe, rid, now, reason)
                log.warning("request %s failed: %s entry %s %s", rid, self.spec.name,
                            entry.entry_id, reason)
            elif current is not None:
                log.warning("ignoring %s entry %s of request %s, already %s: %s", self.spec.name,
                            entry.entry_id, rid, current.value, reason)
            elif self.spec.request_id_path is None:
                log.error("%s entry %s %s", self.spec.name, entry.entry_id, reason)
            else:
                # Nothing to mark failed (no id, or no state under it): only this log keeps it.
                log.error("%s entry %s of unknown request %s dropped, %s; fields: %.500s",
                          self.spec.name, entry.entry_id, rid, reason, entry.fields)
            pipe.hincrby(keys.METRICS, f"refused:{self.spec.name}", 1)
        self.raw.ack(pipe, [x.entry_id for x in refused])
        pipe.execute()
        self.refused += len(refused)
