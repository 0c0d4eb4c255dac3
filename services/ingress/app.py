"""Ingress: the HTTP API. Validates before anything touches Redis, then queues and answers polls.

    POST   /v1/requests            submit (202 + id)
    GET    /v1/requests/{id}       status, text, token counts, stage timestamps
    DELETE /v1/requests/{id}       cancel
    POST   /v1/predict             a request's predicted length, bound and rank, without running it
    POST   /v1/chat/completions    OpenAI-compatible (openai_api.py), streaming or not
    POST   /v1/completions         the same for text completions
    GET    /v1/models              the served model
    GET    /v1/metrics             counters (predictor source, continuations, batches), depths;
                                   admin only when keys are configured
    GET    /metrics                Prometheus exposition (shared/metrics.py), likewise admin only
    GET    /status                 the live status page (status.html; charts, refreshes itself)
    GET    /status/data            what it draws (status.py), admin only when keys are configured
    GET    /healthz                liveness of ingress and its Redis
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import redis
import redis.asyncio
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response

from services.engine import get_engine
from services.ingress import openai_api, status
from services.ingress.body_limit import BodyLimit
from services.ingress.core import (
    ApiError,
    Caller,
    Ingress,
    IngressState,
    ask_predictor,
    cancel_request,
    clean_errors,
    enqueue,
    error_body,
    may_read,
    read_view,
    validate_and_build,
)
from services.ingress.tokens import PromptCounter
from shared import keys, metrics, state
from shared.redis_conn import async_client, connect
from shared.schemas import (
    PredictBody,
    PredictResponse,
    RequestStatus,
    SubmitRequest,
    SubmitResponse,
)
from shared.settings import IngressSettings
from shared.tenants import Tenant, load_tenants

log = logging.getLogger("magnus.ingress")
router = APIRouter()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@router.post("/v1/requests", status_code=202, response_model=SubmitResponse)
def submit(body: SubmitRequest, ingress: Ingress, caller: Caller) -> SubmitResponse:
    req = validate_and_build(ingress, body, caller)
    enqueue(ingress, req, caller)
    return SubmitResponse(request_id=req.request_id, status=RequestStatus.QUEUED)


@router.post("/v1/predict", response_model=PredictResponse)
def predict(body: PredictBody, ingress: Ingress, caller: Caller) -> PredictResponse:
    return ask_predictor(ingress, body, caller)


@router.get("/v1/requests/{request_id}", response_model=state.RequestView)
def poll(request_id: str, ingress: Ingress, caller: Caller
         ) -> state.RequestView | JSONResponse:
    view = read_view(ingress, request_id)
    if view is None or not may_read(caller, view):
        return JSONResponse(status_code=404, content={"message": f"no request {request_id}"})
    return view


@router.delete("/v1/requests/{request_id}", response_model=state.RequestView)
def cancel(request_id: str, ingress: Ingress, caller: Caller
           ) -> state.RequestView | JSONResponse:
    """Cancel a request not yet final: it leaves the queue, or its generation is aborted. 404
    for an unknown id (or another tenant's), 409 for one already final (its result stands)."""
    view = read_view(ingress, request_id)
    if view is None or not may_read(caller, view):
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


def require_admin(caller: Tenant, what: str) -> None:
    """Every tenant's activity (tenant and app names, counts) is an admin's view: 403 for
    another key. Without a tenants file the caller is the open tenant, an admin, and ingress
    listens on loopback only."""
    if not caller.admin:
        raise ApiError(403, "authorization", f"{what} needs an admin key")


@router.get("/v1/metrics")
def counters(ingress: Ingress, caller: Caller) -> dict[str, Any]:
    """Counters by stage and reason (predictor source, continuations, batches) and depths.
    An admin key's, when keys are configured."""
    require_admin(caller, "the metrics")
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


@router.get("/metrics", response_class=Response)
def prometheus_metrics(ingress: Ingress, caller: Caller) -> Response:
    """Prometheus exposition of ingress's metrics (shared/metrics.py). An admin key's, when
    keys are configured: Prometheus sends it as a bearer token (infra/prometheus)."""
    require_admin(caller, "the metrics")
    body, content_type = metrics.render(ingress.settings.prometheus_multiproc_dir)
    return Response(content=body, media_type=content_type)


STATUS_PAGE = Path(__file__).with_name("status.html").read_text(encoding="utf-8")


@router.get("/status", response_class=HTMLResponse)
def status_page(ingress: Ingress) -> HTMLResponse:
    """The page only: it holds no data (its script reads /status/data with the key it is given),
    so it is served to anyone."""
    refresh_ms = str(round(ingress.settings.status_refresh_s * 1000))
    return HTMLResponse(STATUS_PAGE.replace("__REFRESH_MS__", refresh_ms),
                        headers={"Cache-Control": "no-store"})


@router.get("/status/data", response_model=status.StatusReport)
def status_data(ingress: Ingress, caller: Caller) -> status.StatusReport:
    """Queue depth by stage, app and tenant, per-GPU batches and KV, latency percentiles and
    predictor error over the last minutes. Every tenant's activity: an admin's view."""
    require_admin(caller, "the status")
    s = ingress.settings
    snapshot = status.read_snapshot(
        ingress.redis, gpus=s.gpus, now=time.time(), window_s=s.status_window_s,
        bucket_s=s.status_bucket_s, max_open=s.status_max_open,
        max_finished=s.status_max_finished)
    return status.summarize(snapshot)


@router.get("/healthz")
def healthz(ingress: Ingress) -> JSONResponse:
    try:
        ingress.redis.ping()
    except redis.RedisError:
        # No address or errno: health endpoints are often public.
        return JSONResponse(status_code=503, content={"status": "queue store unavailable"},
                            headers={"Retry-After": str(ingress.settings.retry_after_s)})
    return JSONResponse(content={"status": "ok"})


def _is_openai(request: Request) -> bool:
    """OpenAI's routes answer errors in OpenAI's shape, Magnus's own in FastAPI's."""
    return request.url.path in openai_api.OPENAI_PATHS


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    metrics.REQUESTS_REFUSED.labels(status_code="422").inc()
    body = error_body(clean_errors(exc.errors()))
    if _is_openai(request):
        first = body["detail"][0]
        param = ".".join(p for p in first["loc"] if p != "body") or None
        return openai_api.openai_error(422, body["message"], param=param)
    return JSONResponse(status_code=422, content=body)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    metrics.REQUESTS_REFUSED.labels(status_code=str(exc.status_code)).inc()
    if _is_openai(request):
        return openai_api.openai_error(exc.status_code, f"{exc.field}: {exc.message}",
                                       param=exc.field, headers=exc.headers)
    errors = [{"loc": ["body", exc.field], "msg": exc.message, "type": "value_error"}]
    return JSONResponse(status_code=exc.status_code, content=error_body(errors),
                        headers=exc.headers)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    # Redis unreachable (restarting, a network blip): nothing was accepted, so the client may
    # retry. The message leaks no address.
    metrics.REQUESTS_REFUSED.labels(status_code="503").inc()
    retry = str(request.app.state.ingress.settings.retry_after_s)
    message = "the queue store is unavailable; nothing was accepted, retry shortly"
    if _is_openai(request):
        return openai_api.openai_error(503, message, headers={"Retry-After": retry})
    return JSONResponse(status_code=503, headers={"Retry-After": retry},
                        content={"message": message})


def publish_limits(openapi: dict[str, Any], settings: IngressSettings) -> dict[str, Any]:
    """The OpenAPI schema with the limits this deployment enforces (they are settings, so the
    request models cannot carry them): a client, or a schema-driven test, sees the real bounds."""
    models = openapi.get("components", {}).get("schemas", {})
    for model in ("PredictBody", "SubmitRequest", "ChatCompletionRequest", "CompletionRequest"):
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
    shutting_down: threading.Event | None = None,
) -> FastAPI:
    """The app; Redis and the tokenizer are opened when it starts (its lifespan), not here.
    `shutting_down`: set by the server when it is asked to stop (`main`'s `ShutdownAwareServer`),
    so open streams and waiting chats say so."""
    settings = settings or IngressSettings()
    shutting_down = shutting_down or threading.Event()

    tenants = load_tenants(settings.tenants_file)  # a bad file stops start-up, with the reason
    if not tenants.keyed and not is_loopback(settings.host):
        raise ValueError(f"ingress binds {settings.host}, not a loopback address, and has no "
                         "tenants file: set MAGNUS_TENANTS_FILE (keys are required off loopback)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not tenants.keyed:
            log.warning("no API keys (MAGNUS_TENANTS_FILE unset): anyone who reaches %s:%d may "
                        "use every app and read every request", settings.host, settings.port)
        r = (redis_factory(settings) if redis_factory
             else connect(settings.redis_url, settings.redis_connect_timeout_s))
        aredis = async_client(settings.redis_url, settings.redis_connect_timeout_s)
        app.state.ingress = IngressState(
            settings=settings, redis=r, aredis=aredis, tenants=tenants,
            counter=PromptCounter(settings.model_dir, get_engine(settings.engine)),
            shutting_down=shutting_down)
        try:
            yield
        finally:
            r.close()
            await aredis.aclose()

    app = FastAPI(title="Magnus", version="0.1.0", lifespan=lifespan)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(redis.ConnectionError)(_redis_down)
    app.exception_handler(redis.TimeoutError)(_redis_down)
    app.exception_handler(redis.BusyLoadingError)(_redis_down)
    app.include_router(router)
    app.include_router(openai_api.router)
    # Outermost but for Starlette's own error handling: a body over the limit is refused before
    # any route reads or parses it.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       is_openai=lambda path: path in openai_api.OPENAI_PATHS)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = publish_limits(
                get_openapi(title=app.title, version=app.version, routes=app.routes), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class ShutdownAwareServer(uvicorn.Server):
    """uvicorn's server, which first tells the app it is shutting down: on SIGTERM or SIGINT,
    `shutting_down` is set before uvicorn stops accepting connections and waits for the open
    ones, so each open stream and waiting chat answers that its request goes on (within about
    100 ms) rather than being cut off or cancelled."""

    def __init__(self, config: uvicorn.Config, shutting_down: threading.Event) -> None:
        super().__init__(config)
        self.shutting_down = shutting_down

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.shutting_down.set()
        super().handle_exit(sig, frame)


def main() -> int:
    settings = IngressSettings()
    shutting_down = threading.Event()
    config = uvicorn.Config(
        create_app(settings, shutting_down=shutting_down), host=settings.host,
        port=settings.port, log_level="info", timeout_keep_alive=settings.keep_alive_s,
        # Streams and chats answer within a moment of shutting_down: whatever is still open
        # after this is cut, and ingress exits.
        timeout_graceful_shutdown=settings.graceful_shutdown_s)
    # uvicorn raises the signal it caught again once shut down: SIGINT as KeyboardInterrupt,
    # which ends a shutdown already done (as uvicorn.run does).
    with contextlib.suppress(KeyboardInterrupt):
        ShutdownAwareServer(config, shutting_down).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
