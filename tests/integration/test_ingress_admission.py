"""Admission under concurrency, against real Redis: many submitters at once never leave more
requests open than the system's or a tenant's limit, and never pass a tenant's tokens per minute
(the limits are checked and the request written in one script, shared/state.py `admit`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from services.ingress.core import ApiError, IngressState, enqueue
from shared import keys, state, streams
from shared.schemas import QueuedRequest
from shared.settings import IngressSettings
from shared.tenants import Tenant

pytestmark = pytest.mark.integration

GLOBAL_LIMIT = 40
SUBMITTERS = 120


@pytest.fixture()
def ingress(redis_url: str, redis_client: redis.Redis) -> Iterator[IngressState]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               max_pending_requests=GLOBAL_LIMIT)
    with TestClient(create_app(settings)) as client:
        ingress_state: IngressState = client.app.state.ingress  # type: ignore[attr-defined]
        yield ingress_state


def queued(i: int, tenant: Tenant, input_tokens: int = 10, max_tokens: int = 10
           ) -> QueuedRequest:
    return QueuedRequest(request_id=f"req-{tenant.name}-{i}", app_id="qa", user_id="u",
                         instruction="", input="What is 2+2?", max_tokens=max_tokens,
                         input_tokens=input_tokens, queued_at=time.time(), tenant=tenant.name)


def submit_together(ingress: IngressState, requests: list[QueuedRequest], tenant: Tenant
                    ) -> tuple[list[str], list[ApiError]]:
    """Every request submitted at once (each thread waits at a barrier, then enqueues): the
    accepted ids and the refusals."""
    barrier = threading.Barrier(len(requests))

    def one(req: QueuedRequest) -> str | ApiError:
        barrier.wait()
        try:
            enqueue(ingress, req, tenant)
        except ApiError as exc:
            return exc
        return req.request_id

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        outcomes = list(pool.map(one, requests))
    return ([o for o in outcomes if isinstance(o, str)],
            [o for o in outcomes if isinstance(o, ApiError)])


def test_concurrent_submitters_never_pass_the_global_limit(
        ingress: IngressState, redis_client: redis.Redis) -> None:
    tenant = Tenant(name="default", admin=True)
    accepted, refused = submit_together(
        ingress, [queued(i, tenant) for i in range(SUBMITTERS)], tenant)
    assert len(accepted) == GLOBAL_LIMIT, f"{len(accepted)} accepted"
    assert state.open_requests(redis_client) == GLOBAL_LIMIT
    assert redis_client.xlen(keys.STREAM_INCOMING) == GLOBAL_LIMIT
    assert int(redis_client.hget(keys.METRICS, keys.METRIC_REQUESTS_ACCEPTED) or 0) \
        == GLOBAL_LIMIT
    assert all(e.status_code == 429 and e.headers == {"Retry-After": "1"} for e in refused)
    # What the script wrote is what the services read: the stream entry and the request hash.
    ids = {req.request_id for _, req in streams.read_range(redis_client, streams.INCOMING)}
    assert ids == set(accepted)
    view = state.view_from_hash(accepted[0], redis_client.hgetall(keys.request(accepted[0])))
    assert (view.status.value, view.tenant, view.max_tokens) == ("queued", "default", 10)
    assert 0 < redis_client.ttl(keys.request(accepted[0])) <= keys.REQUEST_TTL_S


def test_concurrent_submitters_never_pass_a_tenants_open_limit(
        ingress: IngressState, redis_client: redis.Redis) -> None:
    acme = Tenant(name="acme", max_open_requests=20)
    accepted, refused = submit_together(
        ingress, [queued(i, acme) for i in range(60)], acme)
    assert len(accepted) == 20, f"{len(accepted)} accepted"
    assert state.open_requests(redis_client, "acme") == 20
    assert state.open_requests(redis_client) == 20
    assert redis_client.xlen(keys.STREAM_INCOMING) == 20
    assert all(e.status_code == 429 and "acme has 20 requests open" in e.message
               for e in refused)


def test_concurrent_submitters_never_pass_a_tenants_tokens_per_minute(
        ingress: IngressState, redis_client: redis.Redis) -> None:
    # Not across a minute's end, where the counter starts again.
    while time.time() % 60 > 55:
        time.sleep(0.5)
    minute = int(time.time() // 60)
    globex = Tenant(name="globex", tokens_per_minute=300)  # 15 requests of 10 + 10 tokens
    accepted, refused = submit_together(
        ingress, [queued(i, globex) for i in range(40)], globex)
    assert int(time.time() // 60) == minute
    assert len(accepted) == 15, f"{len(accepted)} accepted"
    assert int(redis_client.get(keys.tenant_tokens("globex", minute)) or 0) == 300
    assert state.open_requests(redis_client, "globex") == 15
    assert all(e.status_code == 429 and e.field == "max_tokens"
               and 1 <= int((e.headers or {})["Retry-After"]) <= 60 for e in refused)
    # A request that still fits is accepted; the minute's counter keeps only what was accepted.
    small = Tenant(name="globex", tokens_per_minute=320)
    enqueue(ingress, queued(99, small, input_tokens=10, max_tokens=10), small)
    assert int(redis_client.get(keys.tenant_tokens("globex", minute)) or 0) == 320
