"""Tenants at the front door, against real Redis: keys required where configured, a request
readable only by its tenant, per-tenant limits answered with 429 and Retry-After, benchmark-only
fields for admins, keys required off loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from offline.model import SMOLLM2_DIR
from services.ingress.app import create_app
from services.ingress.openai_api import ChatCompletionRequest, chat_submit_body
from shared import keys, state
from shared.schemas import RequestResult
from shared.settings import IngressSettings
from shared.tenants import hash_key, load_tenants

pytestmark = pytest.mark.integration

KEYS = {"acme": "mk-acme-secret", "globex": "mk-globex-secret", "root": "mk-root-secret"}


def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(f"""
[[tenant]]
name = "acme"
key_sha256 = ["{hash_key(KEYS['acme'])}"]
apps = ["qa"]
max_open_requests = 2

[[tenant]]
name = "globex"
key_sha256 = ["{hash_key(KEYS['globex'])}"]
tokens_per_minute = 100

[[tenant]]
name = "root"
key_sha256 = ["{hash_key(KEYS['root'])}"]
admin = true
""")
    return path


@pytest.fixture()
def client(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[TestClient]:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               tenants_file=tenants_file(tmp_path))
    with TestClient(create_app(settings)) as c:
        yield c


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


BODY = {"app_id": "qa", "input": "What is 2+2?", "max_tokens": 8}


def test_a_key_is_required_and_a_wrong_one_refused(client: TestClient,
                                                   redis_client: redis.Redis) -> None:
    for headers in ({}, {"Authorization": "Bearer mk-guess"}, {"Authorization": KEYS["acme"]}):
        resp = client.post("/v1/requests", json=BODY, headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.headers["www-authenticate"] == "Bearer"
        assert resp.json()["message"].startswith("authorization")
    chat = client.post("/v1/chat/completions", json={
        "model": "qa", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 401 and chat.json()["error"]["param"] == "authorization"
    assert client.get("/v1/models").status_code == 401
    assert redis_client.dbsize() == 0


def test_a_request_is_readable_only_by_its_tenant(client: TestClient) -> None:
    rid = client.post("/v1/requests", json=BODY, headers=auth("acme")).json()["request_id"]
    view = client.get(f"/v1/requests/{rid}", headers=auth("acme")).json()
    assert view["tenant"] == "acme"
    other = client.get(f"/v1/requests/{rid}", headers=auth("globex"))
    assert other.status_code == 404  # the same answer as an id that does not exist
    assert other.json()["message"] == f"no request {rid}"
    assert client.delete(f"/v1/requests/{rid}", headers=auth("globex")).status_code == 404
    assert client.get(f"/v1/requests/{rid}", headers=auth("root")).status_code == 200  # admin
    assert client.delete(f"/v1/requests/{rid}", headers=auth("acme")).status_code == 200


def test_a_tenant_uses_only_its_apps_and_benchmark_fields_need_an_admin(
        client: TestClient) -> None:
    resp = client.post("/v1/requests", json={**BODY, "app_id": "translate"},
                       headers=auth("acme"))
    assert resp.status_code == 403 and resp.json()["message"].startswith("app_id")
    for field, value in (("true_output_tokens", 5), ("ignore_eos", True)):
        resp = client.post("/v1/requests", json={**BODY, field: value}, headers=auth("globex"))
        assert resp.status_code == 403 and resp.json()["message"].startswith(field), resp.text
        assert client.post("/v1/requests", json={**BODY, field: value},
                           headers=auth("root")).status_code == 202
    # vLLM's `ignore_eos` on the OpenAI routes (vllm bench serve --ignore-eos) likewise.
    chat = {"model": "qa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "ignore_eos": True}
    refused = client.post("/v1/chat/completions", json=chat, headers=auth("globex"))
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "ignore_eos"
    assert chat_submit_body(ChatCompletionRequest.model_validate(chat)).ignore_eos


def test_open_requests_per_tenant_are_limited_and_freed_when_final(
        client: TestClient, redis_client: redis.Redis) -> None:
    ids = [client.post("/v1/requests", json=BODY, headers=auth("acme")).json()["request_id"]
           for _ in range(2)]
    refused = client.post("/v1/requests", json=BODY, headers=auth("acme"))
    assert refused.status_code == 429 and refused.headers["retry-after"]
    assert "acme" in refused.json()["message"]
    # Another tenant is not held back by acme's limit.
    assert client.post("/v1/requests", json=BODY, headers=auth("globex")).status_code == 202
    now = time.time()
    state.record_result(redis_client, RequestResult(
        request_id=ids[0], batch_id="b", gpu=0, text="4", input_tokens=5, generated_tokens=1,
        finish_reason="stop", started_at=now, finished_at=now))
    assert state.open_requests(redis_client, "acme") == 1
    assert client.post("/v1/requests", json=BODY, headers=auth("acme")).status_code == 202


def test_tokens_per_minute_are_limited_with_retry_after(client: TestClient,
                                                        redis_client: redis.Redis) -> None:
    accepted = 0
    while True:
        resp = client.post("/v1/requests", json={**BODY, "max_tokens": 30},
                           headers=auth("globex"))
        if resp.status_code != 202:
            break
        accepted += 1
        assert accepted < 10
    assert resp.status_code == 429 and 1 <= int(resp.headers["retry-after"]) <= 60
    assert resp.json()["message"].startswith("max_tokens")
    assert 1 <= accepted <= 3  # each costs its prompt + 30 against 100 a minute
    minute = int(time.time() // 60)
    used = sum(int(redis_client.get(keys.tenant_tokens("globex", m)) or 0)
               for m in (minute - 1, minute))
    assert used <= 100  # the refused request did not count


def test_without_a_tenants_file_keys_are_refused_off_loopback(redis_url: str) -> None:
    with pytest.raises(ValueError, match="MAGNUS_TENANTS_FILE"):
        create_app(IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR,
                                   host="0.0.0.0"))
    create_app(IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, host="127.0.0.1"))


def test_a_tenants_file_with_a_plain_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[tenant]]\nname = "x"\nkey_sha256 = ["mk-plain-key"]\n')
    with pytest.raises(ValueError, match="SHA-256 of a key"):
        load_tenants(path)


def test_the_status_page_is_open_but_its_data_needs_an_admin_key(client: TestClient) -> None:
    page = client.get("/status")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="c-latency"' in page.text  # served without a key: it holds no data itself
    assert client.get("/status/data").status_code == 401
    refused = client.get("/status/data", headers=auth("acme"))
    assert refused.status_code == 403 and "admin" in refused.json()["message"]
    assert client.get("/status/data", headers=auth("root")).status_code == 200


@pytest.mark.parametrize("path", ["/metrics", "/v1/metrics"])
def test_the_metrics_need_an_admin_key_when_keys_are_configured(
        client: TestClient, path: str) -> None:
    # They name every tenant and app (request counters carry both labels).
    client.post("/v1/requests", json=BODY, headers=auth("acme"))
    missing = client.get(path)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert "acme" not in missing.text
    refused = client.get(path, headers=auth("acme"))
    assert refused.status_code == 403 and "admin" in refused.json()["message"]
    assert "acme" not in refused.text
    served = client.get(path, headers=auth("root"))
    assert served.status_code == 200, served.text


@pytest.mark.parametrize("path", ["/metrics", "/v1/metrics"])
def test_without_a_tenants_file_the_metrics_stay_open(
        redis_url: str, redis_client: redis.Redis, path: str) -> None:
    settings = IngressSettings(redis_url=redis_url, model_dir=SMOLLM2_DIR, max_model_len=256)
    with TestClient(create_app(settings)) as client:
        assert client.get(path).status_code == 200
