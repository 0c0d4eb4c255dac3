"""Ingress: the HTTP API. Validates before anything touches Redis, then queues and answers polls.

    POST /v1/requests            submit (202 + id)
    GET  /v1/requests/{id}       status, text, token counts, stage timestamps
    POST /v1/chat/completions    OpenAI-compatible: submit and wait for the answer
    GET  /v1/metrics             counters (predictor source, continuations, batches), depths
    GET  /healthz                liveness of ingress and its Redis
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.engine import get_engine
from services.ingress.tokens import PromptCounter
from shared import keys, state, streams
from shared.redis_conn import connect
from shared.schemas import (
    QueuedRequest,
    RequestStatus,
    SubmitRequest,
    SubmitResponse,
)
from shared.settings import IngressSettings


class ApiError(Exception):
    """A client error about one field, answered as a FastAPI-style validation detail."""

    def __init__(self, status_code: int, field: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.field, self.message = status_code, field, message
        self.headers = headers


# An error echoes at most this much of the offending value: a 100 kB field is not sent back.
_EXCERPT_CHARS = 80


def _excerpt(value: Any) -> str:
    """A short, always-serialisable rendering of an offending input (NaN, a lone surrogate and
    huge strings included)."""
    text = repr(value)
    if len(text) > _EXCERPT_CHARS:
        text = text[:_EXCERPT_CHARS] + f"... ({len(text)} chars)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as plain JSON: location, message, type and an excerpt of the input
    (pydantic's own `input` and `ctx` can hold NaN, surrogates or exceptions)."""
    out = []
    for e in errors:
        item: dict[str, Any] = {"loc": [str(p) for p in e.get("loc", ())],
                                "msg": str(e.get("msg", "invalid")),
                                "type": str(e.get("type", "value_error"))}
        if "input" in e:
            item["input"] = _excerpt(e["input"])
        out.append(item)
    return out or [{"loc": ["body"], "msg": "invalid request", "type": "value_error"}]


def _error_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    first = errors[0]
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return {"message": f"{field}: {first.get('msg', 'invalid')}", "detail": errors}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str



class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request Magnus serves. `model` names the app."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    user: str | None = Field(default=None, max_length=256)



@dataclass(frozen=True)
class IngressState:
    """What the handlers share, built once at start-up (lifespan) and kept on `app.state`."""

    settings: IngressSettings
    redis: redis.Redis
    counter: PromptCounter


async def get_ingress(request: Request) -> IngressState:
    # async: FastAPI runs a plain `def` dependency in its thread pool, too much for a lookup.
    ingress: IngressState = request.app.state.ingress
    return ingress


Ingress = Annotated[IngressState, Depends(get_ingress)]
router = APIRouter()
_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


def _valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def validate_and_build(ingress: IngressState, body: SubmitRequest) -> QueuedRequest:
    """The queued request, or the `ApiError` naming the field that does not fit."""
    settings = ingress.settings
    if body.max_tokens > settings.max_tokens_limit:
        raise ApiError(422, "max_tokens", f"max_tokens must be at most {settings.max_tokens_limit}")
    if len(body.input) > settings.max_input_chars:
        raise ApiError(413, "input", f"input is longer than {settings.max_input_chars} characters")
    input_tokens = ingress.counter.count(body.instruction, body.input)
    if input_tokens >= settings.max_model_len:
        raise ApiError(413, "input", f"prompt is {input_tokens} tokens; the model context is "
                       f"{settings.max_model_len}")
    if input_tokens + body.max_tokens > settings.max_model_len:
        raise ApiError(422, "max_tokens", f"prompt ({input_tokens} tokens) + max_tokens "
                       f"({body.max_tokens}) exceeds the model context "
                       f"({settings.max_model_len})")
    return QueuedRequest(
        request_id=f"req-{uuid.uuid4().hex}", app_id=body.app_id, user_id=body.user_id,
        instruction=body.instruction, input=body.input, max_tokens=body.max_tokens,
        input_tokens=input_tokens, sampling=body.sampling(),
        true_output_tokens=body.true_output_tokens, queued_at=time.time(),
    )


def enqueue(ingress: IngressState, req: QueuedRequest) -> None:
    r = ingress.redis
    if state.open_requests(r) >= ingress.settings.max_pending_requests:
        raise ApiError(429, "body", "too many requests in the system; retry later",
                       headers={"Retry-After": str(ingress.settings.retry_after_s)})
    pipe = r.pipeline(transaction=True)
    state.record_queued(pipe, req)
    streams.publish(pipe, streams.INCOMING, req)
    pipe.hincrby(keys.METRICS, "requests_accepted", 1)
    pipe.execute()


def read_view(ingress: IngressState, request_id: str) -> state.RequestView | None:
    h = ingress.redis.hgetall(keys.request(request_id))
    return state.view_from_hash(request_id, h) if h else None


@router.post("/v1/requests", status_code=202, response_model=SubmitResponse)
def submit(body: SubmitRequest, ingress: Ingress) -> SubmitResponse:
    req = validate_and_build(ingress, body)
    enqueue(ingress, req)
    return SubmitResponse(request_id=req.request_id, status=RequestStatus.QUEUED)


@router.get("/v1/requests/{request_id}", response_model=state.RequestView)
def poll(request_id: str, ingress: Ingress) -> state.RequestView | JSONResponse:
    view = read_view(ingress, request_id)
    if view is None:
        return JSONResponse(status_code=404, content={"message": f"no request {request_id}"})
    return view


@router.delete("/v1/requests/{request_id}", response_model=state.RequestView)
def cancel(request_id: str, ingress: Ingress) -> state.RequestView | JSONResponse:
    """Cancel a request not yet final: it leaves the queue, or its generation is aborted. 404
    for an unknown id, 409 for one already final (its result stands)."""
    view = read_view(ingress, request_id)
    if view is None:
        return JSONResponse(status_code=404, content={"message": f"no request {request_id}"})
    if not view.is_final:
        cancel_request(ingress, request_id, "cancelled by the client")
        view = read_view(ingress, request_id)
    assert view is not None
    if view.status is not RequestStatus.CANCELLED:
        return JSONResponse(status_code=409, content={
            "message": f"request {request_id} is already {view.status.value}",
            "status": view.status.value})
    return view


def cancel_request(ingress: IngressState, request_id: str, reason: str) -> None:
    pipe = ingress.redis.pipeline(transaction=True)
    state.record_cancelled(pipe, request_id, time.time(), reason)
    pipe.hincrby(keys.METRICS, "requests_cancelled", 1)
    pipe.execute()


def chat_submit_body(body: ChatCompletionRequest) -> SubmitRequest:
    """The submit body a chat request maps to; `ApiError` naming the chat field that does not
    fit."""
    users = [m.content for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "messages", "messages must contain a user message")
    if not users[-1].strip():
        raise ApiError(422, "messages", "the last user message must contain non-whitespace text")
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    try:
        return SubmitRequest(
            app_id=body.model if _valid_id(body.model) else "openai",
            instruction="\n".join(m.content for m in body.messages if m.role == "system"),
            input=users[-1], user_id=body.user if body.user and _valid_id(body.user)
            else "anonymous", max_tokens=max_tokens,
            temperature=body.temperature, top_p=body.top_p,
        )
    except ValidationError as exc:  # e.g. a system prompt over the instruction limit
        first = exc.errors()[0]
        submit_field = str(first["loc"][0]) if first["loc"] else "body"
        raise ApiError(422, _CHAT_FIELD.get(submit_field, submit_field), str(first["msg"])
                       ) from None


# Where a submit field comes from in a chat request: errors name the field the client sent.
_CHAT_FIELD = {"instruction": "messages", "input": "messages", "app_id": "model",
               "user_id": "user"}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ingress: Ingress) -> dict[str, Any] | JSONResponse:
    submit_body = chat_submit_body(body)
    # Tokenizing and Redis calls block: off the event loop.
    req = await asyncio.to_thread(validate_and_build, ingress, submit_body)
    await asyncio.to_thread(enqueue, ingress, req)
    deadline = time.monotonic() + ingress.settings.chat_timeout_s
    while True:
        view = await asyncio.to_thread(read_view, ingress, req.request_id)
        if view is not None and view.is_final:
            break
        if await request.is_disconnected():
            # Nobody is listening: the answer would go nowhere, so the request is cancelled
            # (its generation aborted if it runs).
            await asyncio.to_thread(cancel_request, ingress, req.request_id,
                                    "the client disconnected")
            return JSONResponse(status_code=499, content={
                "message": f"client disconnected; request {req.request_id} cancelled"})
        if time.monotonic() > deadline:
            return JSONResponse(status_code=504, content={
                "message": f"no answer within {ingress.settings.chat_timeout_s:g} s; request "
                           f"{req.request_id} continues: GET /v1/requests/{req.request_id}",
                "request_id": req.request_id})
        await asyncio.sleep(0.05)
    if view.status != RequestStatus.COMPLETED:
        return JSONResponse(status_code=502, content={
            "message": f"request {req.request_id} {view.status.value}: {view.error}"})
    return {
        "id": req.request_id, "object": "chat.completion", "created": int(req.queued_at),
        "model": body.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": view.text},
                     "finish_reason": view.finish_reason}],
        "usage": {"prompt_tokens": view.input_tokens,
                  "completion_tokens": view.generated_tokens,
                  "total_tokens": view.input_tokens + (view.generated_tokens or 0)},
    }


@router.get("/v1/metrics")
def metrics(ingress: Ingress) -> dict[str, Any]:
    """Counters by stage and reason (predictor source, continuations, batches) and depths."""
    r = ingress.redis
    raw = r.hgetall(keys.METRICS)
    # Counters are integers; labels the services keep beside them (the predictor's model
    # version) are strings and are reported apart.
    counters = {k: int(v) for k, v in raw.items() if v.lstrip("-").isdigit()}
    labels = {k: v for k, v in raw.items() if k not in counters}
    return {"counters": counters, "labels": labels,
            "waiting": r.zcard(keys.SCHEDULER_WAITING),
            "open_requests": state.open_requests(r),
            "incoming_stream": r.xlen(keys.STREAM_INCOMING)}


@router.get("/healthz")
def healthz(ingress: Ingress) -> JSONResponse:
    try:
        ingress.redis.ping()
    except redis.RedisError:
        # No address or errno: health endpoints are often public.
        return JSONResponse(status_code=503, content={"status": "queue store unavailable"},
                            headers={"Retry-After": str(ingress.settings.retry_after_s)})
    return JSONResponse(content={"status": "ok"})


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content=_error_body(_clean_errors(exc.errors())))


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    errors = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
    return JSONResponse(status_code=exc.status_code, content=_error_body(errors),
                        headers=exc.headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    # Redis unreachable (restarting, a network blip): nothing was accepted, so the client may
    # retry. The message leaks no address.
    retry = str(request.app.state.ingress.settings.retry_after_s)
    return JSONResponse(status_code=503, headers={"Retry-After": retry}, content={
        "message": "the queue store is unavailable; nothing was accepted, retry shortly"})


def publish_limits(openapi: dict[str, Any], settings: IngressSettings) -> dict[str, Any]:
    """The OpenAPI schema with the limits this deployment enforces (they are settings, so the
    request models cannot carry them): a client, or a schema-driven test, sees the real bounds."""
    models = openapi.get("components", {}).get("schemas", {})
    for model in ("SubmitRequest", "ChatCompletionRequest"):
        props = models.get(model, {}).get("properties", {})
        for field in ("max_tokens", "max_completion_tokens"):
            if field not in props:
                continue
            for variant in props[field].get("anyOf", [props[field]]):
                if variant.get("type") == "integer":
                    variant["maximum"] = settings.max_tokens_limit
    return openapi


def create_app(
    settings: IngressSettings | None = None,
    redis_factory: Callable[[IngressSettings], redis.Redis] | None = None,
) -> FastAPI:
    """The app; Redis and the tokenizer are opened when it starts (its lifespan), not here."""
    settings = settings or IngressSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = (redis_factory(settings) if redis_factory
             else connect(settings.redis_url, settings.redis_connect_timeout_s))
        app.state.ingress = IngressState(
            settings=settings, redis=r,
            counter=PromptCounter(settings.model_dir, get_engine(settings.engine)))
        try:
            yield
        finally:
            r.close()

    app = FastAPI(title="Magnus", version="0.1.0", lifespan=lifespan)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(redis.ConnectionError)(_redis_down)
    app.exception_handler(redis.TimeoutError)(_redis_down)
    app.exception_handler(redis.BusyLoadingError)(_redis_down)
    app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish_limits(
                get_openapi(title=app.title, version=app.version, routes=app.routes), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def main() -> int:
    import uvicorn

    settings = IngressSettings()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
