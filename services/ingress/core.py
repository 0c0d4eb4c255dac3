"""What ingress's routes share: the state built at start-up, validation before anything touches
Redis, queueing, reading a request back, cancelling one, and the error type handlers raise."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import redis
import redis.asyncio
from fastapi import Depends, Request

from services.ingress.tokens import PromptCounter
from shared import keys, metrics, redis_conn, state, streams
from shared.schemas import (
    PredictAnswer,
    PredictBody,
    PredictQuery,
    PredictResponse,
    QueuedRequest,
    RequestStatus,
    SubmitRequest,
)
from shared.settings import IngressSettings
from shared.tenants import OPEN_TENANT, Tenant, TenantDirectory

log = logging.getLogger("magnus.ingress")


class ApiError(Exception):
    """A client error about one field, answered as a FastAPI-style validation detail."""

    def __init__(self, status_code: int, field: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.field, self.message = status_code, field, message
        self.headers = headers


# An error echoes at most this much of the offending value: a 100 kB field is not sent back.
_EXCERPT_CHARS = 80


def excerpt(value: Any) -> str:
    """A short, always-serialisable rendering of an offending input (NaN, a lone surrogate and
    huge strings included)."""
    text = repr(value)
    if len(text) > _EXCERPT_CHARS:
        text = text[:_EXCERPT_CHARS] + f"... ({len(text)} chars)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as plain JSON: location, message, type and an excerpt of the input
    (pydantic's own `input` and `ctx` can hold NaN, surrogates or exceptions)."""
    out = []
    for e in errors:
        item: dict[str, Any] = {"loc": [str(p) for p in e.get("loc", ())],
                                "msg": str(e.get("msg", "invalid")),
                                "type": str(e.get("type", "value_error"))}
        if "input" in e:
            item["input"] = excerpt(e["input"])
        out.append(item)
    return out or [{"loc": ["body"], "msg": "invalid request", "type": "value_error"}]


def error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return {"message": f"{field}: {first.get('msg', 'invalid')}", "detail": errors}


@dataclass(frozen=True)
class IngressState:
    """What the handlers share, built once at start-up (lifespan) and kept on `app.state`."""

    settings: IngressSettings
    redis: redis.Redis
    counter: PromptCounter
    tenants: TenantDirectory
    # For the long waits of streamed answers (blocking stream reads), which would otherwise each
    # hold one of the few threads `asyncio.to_thread` has.
    aredis: redis.asyncio.Redis
    # Set when ingress is asked to stop (SIGTERM, SIGINT: app.py's server sets it before
    # uvicorn's own shutdown): open streams and waiting chats then tell their clients that
    # their requests go on, instead of ending silently. A threading.Event: the signal handler
    # sets it from outside the event loop's callbacks.
    shutting_down: threading.Event = dataclasses.field(default_factory=threading.Event)


async def get_ingress(request: Request) -> IngressState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, too much for a lookup.
    ingress: IngressState = request.app.state.ingress
    return ingress


Ingress = Annotated[IngressState, Depends(get_ingress)]


async def get_caller(request: Request) -> Tenant:
    """The tenant whose API key the request bears (`Authorization: Bearer <key>`); without a
    tenants file, the open tenant. 401 for a missing or unknown key."""
    ingress: IngressState = request.app.state.ingress
    if not ingress.tenants.keyed:
        return OPEN_TENANT
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    tenant = ingress.tenants.by_key(key.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise ApiError(401, "authorization", "a valid API key is required "
                       "(Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"})
    return tenant


Caller = Annotated[Tenant, Depends(get_caller)]


def may_read(caller: Tenant, view: state.RequestView) -> bool:
    """A request is its tenant's (and an admin's): to anyone else it does not exist (404)."""
    return caller.admin or view.tenant == caller.name
_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


def valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def default_max_tokens(input_tokens: int, max_model_len: int, max_tokens_limit: int) -> int:
    """A request's max_tokens when its client sent none: the room its prompt leaves in the
    context, at most the deployment's limit (as vLLM's OpenAI server defaults, for chats and
    completions alike). A fixed default would refuse a long prompt that fits, or cut a short
    one's answer. At least 1: a prompt that fills the context is refused before this."""
    return max(1, min(max_model_len - input_tokens, max_tokens_limit))


def validate_and_build(ingress: IngressState, body: SubmitRequest, caller: Tenant,
                       stream: bool = False) -> QueuedRequest:
    """The queued request, or the `ApiError` naming the field that does not fit."""
    settings = ingress.settings
    if not caller.may_use(body.app_id):
        raise ApiError(403, "app_id", f"app {body.app_id!r} is not one of tenant "
                       f"{caller.name}'s apps")
    if not caller.admin:
        # Benchmark-only: forced lengths would let a client jump the queue (the oracle policy
        # reads true lengths) or burn capacity.
        for field, value in (("true_output_tokens", body.true_output_tokens),
                             ("ignore_eos", body.ignore_eos or None)):
            if value is not None:
                raise ApiError(403, field, f"{field} needs an admin key")
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_limit:
        raise ApiError(422, "max_tokens", f"max_tokens must be at most {settings.max_tokens_limit}")
    if len(body.input) > settings.max_input_chars:
        raise ApiError(413, "input", f"input is longer than {settings.max_input_chars} characters")
    input_tokens = ingress.counter.count(body.instruction, body.input)
    if input_tokens >= settings.max_model_len:
        raise ApiError(413, "input", f"prompt is {input_tokens} tokens; the model context is "
                       f"{settings.max_model_len}")
    if body.max_tokens is not None and input_tokens + body.max_tokens > settings.max_model_len:
        raise ApiError(422, "max_tokens", f"prompt ({input_tokens} tokens) + max_tokens "
                       f"({body.max_tokens}) exceeds the model context "
                       f"({settings.max_model_len})")
    max_tokens = (body.max_tokens if body.max_tokens is not None else
                  default_max_tokens(input_tokens, settings.max_model_len,
                                     settings.max_tokens_limit))
    return QueuedRequest(
        request_id=f"req-{uuid.uuid4().hex}", app_id=body.app_id, user_id=body.user_id,
        instruction=body.instruction, input=body.input, max_tokens=max_tokens,
        input_tokens=input_tokens, sampling=body.sampling(),
        true_output_tokens=body.true_output_tokens, queued_at=time.time(), stream=stream,
        tenant=caller.name, tenant_weight=caller.weight,
    )


def enqueue(ingress: IngressState, req: QueuedRequest, caller: Tenant) -> None:
    """Queue `req`, or the 429 of the limit it would pass: the system's open requests, its
    tenant's, or its tenant's tokens this minute. Checked and written in one script
    (`state.admit`), so concurrent submitters never pass a limit together."""
    now = time.time()
    limits = state.AdmissionLimits(
        max_open=ingress.settings.max_pending_requests,
        tenant_max_open=caller.max_open_requests,
        tenant_tokens_per_minute=caller.tokens_per_minute)
    admission = state.admit(ingress.redis, req, limits, int(now // 60), streams.INCOMING.key,
                            streams.INCOMING.encode(req))
    refusal = admission_refusal(admission, caller, ingress.settings.retry_after_s, now)
    if refusal is not None:
        raise refusal
    await_replicas(ingress, req)
    metrics.REQUESTS_ACCEPTED.labels(tenant=req.tenant, app=req.app_id).inc()


def admission_refusal(admission: state.Admission, caller: Tenant, retry_after_s: int,
                      now: float) -> ApiError | None:
    """The 429 a refused admission answers (None when accepted): a token limit is retried when
    its minute ends, the others after `retry_after_s`."""
    retry = {"Retry-After": str(retry_after_s)}
    if admission is state.Admission.SYSTEM_FULL:
        return ApiError(429, "body", "too many requests in the system; retry later",
                        headers=retry)
    if admission is state.Admission.TENANT_FULL:
        return ApiError(429, "body", f"tenant {caller.name} has {caller.max_open_requests} "
                        "requests open, its limit; retry later", headers=retry)
    if admission is state.Admission.TENANT_TOKENS:
        return ApiError(429, "max_tokens", f"tenant {caller.name} would pass its "
                        f"{caller.tokens_per_minute} tokens per minute (prompt + max_tokens)",
                        headers={"Retry-After": str(max(1, 60 - int(now % 60)))})
    return None


@dataclass
class _Unreplicated:
    """Requests accepted without a replica's acknowledgement since the last warning (one
    warning at most every `every_s`: while no replica is attached, every request is one)."""

    count: int = 0
    warned_at: float = -math.inf
    every_s: float = 10.0


_unreplicated = _Unreplicated()


def await_replicas(ingress: IngressState, req: QueuedRequest) -> None:
    """Behind Sentinel: wait for a replica to hold the request just written (the durability
    window of asynchronous replication; `redis_wait_*` settings). Replicated: done. On the
    primary only (no replica acknowledged in time): accepted all the same, as durable as a
    single server, logged and counted. Lost (a failover since the write): a 503, nothing was
    accepted. Unknown (Redis stayed unreachable): a 503 that says to poll the id before
    resubmitting."""
    settings = ingress.settings
    replicas = redis_conn.default_wait_replicas(settings.redis_url, settings.redis_wait_replicas)
    if replicas == 0:
        return
    retry = {"Retry-After": str(settings.retry_after_s)}
    try:
        outcome = redis_conn.wait_for_replicas(
            ingress.redis, keys.request(req.request_id), keys.REQUEST_TTL_S, replicas,
            settings.redis_wait_timeout_ms, give_up_s=settings.redis_connect_timeout_s)
    except redis_conn.REDIS_DOWN as exc:
        raise ApiError(503, "body", f"the queue store failed while confirming request "
                       f"{req.request_id}; it may or may not have been kept: GET "
                       f"/v1/requests/{req.request_id} answers 404 if it was not (then "
                       "resubmit)", headers=retry) from exc
    if outcome is redis_conn.Durability.LOST:
        raise ApiError(503, "body", "the queue store failed over and lost the request before "
                       "a replica had it; nothing was accepted, retry shortly", headers=retry)
    if outcome is redis_conn.Durability.PRIMARY_ONLY:
        with contextlib.suppress(*redis_conn.REDIS_DOWN):
            ingress.redis.hincrby(keys.METRICS, keys.METRIC_REQUESTS_ACCEPTED_UNREPLICATED, 1)
        _unreplicated.count += 1
        now = time.monotonic()
        if now - _unreplicated.warned_at >= _unreplicated.every_s:
            log.warning("%d request(s) accepted (last %s) that no Redis replica acknowledged "
                        "within %d ms: a failover now would lose them", _unreplicated.count,
                        req.request_id, settings.redis_wait_timeout_ms)
            _unreplicated.count, _unreplicated.warned_at = 0, now


def ask_predictor(ingress: IngressState, body: PredictBody, caller: Tenant) -> PredictResponse:
    """A length prediction for a request that is not run: validated exactly like a submission
    (the tenant's apps, limits, the context), then asked of the predictor through Redis. 503
    when no predictor answers within `predict_timeout_s` (nothing is left behind: the query and
    its answer expire)."""
    req = validate_and_build(ingress, body.as_submit(), caller)
    query = PredictQuery(query_id=uuid.uuid4().hex, app_id=req.app_id, user_id=req.user_id,
                         instruction=req.instruction, input=req.input,
                         input_tokens=req.input_tokens, max_tokens=req.max_tokens,
                         asked_at=time.time())
    r = ingress.redis
    pipe = r.pipeline(transaction=True)
    pipe.lpush(keys.PREDICT_QUERIES, query.model_dump_json())
    # Bounded: with no predictor running, old queries fall off instead of piling up.
    pipe.ltrim(keys.PREDICT_QUERIES, 0, keys.PREDICT_QUERIES_MAX - 1)
    pipe.execute()
    got = r.blpop([keys.predict_answer(query.query_id)],
                  timeout=ingress.settings.predict_timeout_s)
    if got is None:
        raise ApiError(503, "body", f"no predictor answered within "
                       f"{ingress.settings.predict_timeout_s:g} s; retry later",
                       headers={"Retry-After": str(ingress.settings.retry_after_s)})
    answer = PredictAnswer.parse(got[1])
    return PredictResponse(
        predicted_tokens=answer.predicted_tokens, upper_tokens=answer.upper_tokens,
        ranking_score=math.log1p(answer.predicted_tokens), priority=answer.predicted_tokens,
        input_tokens=req.input_tokens, max_tokens=req.max_tokens, source=answer.source,
        model_version=answer.model_version)


def read_view(ingress: IngressState, request_id: str) -> state.RequestView | None:
    h = ingress.redis.hgetall(keys.request(request_id))
    return state.view_from_hash(request_id, h) if h else None


def cancel_request(ingress: IngressState, request_id: str, reason: str) -> bool:
    """Cancel a request not yet final; True if this call cancelled it (a final status stands)."""
    pipe = ingress.redis.pipeline(transaction=True)
    state.record_cancelled(pipe, request_id, time.time(), reason)
    pipe.hincrby(keys.METRICS, keys.METRIC_REQUESTS_CANCELLED, 1)
    pipe.execute()
    view = read_view(ingress, request_id)
    cancelled = (view is not None and view.status is RequestStatus.CANCELLED
                 and view.error == reason)
    if cancelled and view is not None:
        metrics.finished(RequestStatus.CANCELLED, view.tenant, view.app_id)
    return cancelled
