"""The sentinel:// form of MAGNUS_REDIS_URL: parsing, refusals that name the problem, the Celery
broker it becomes, and the durability decision of an accepted write."""

from __future__ import annotations

import pytest

from shared.redis_conn import (
    SENTINEL_DEFAULT_PORT,
    Durability,
    SentinelUrl,
    client_for,
    default_wait_replicas,
    durability,
    is_sentinel_url,
    parse_sentinel_url,
    redacted,
)
from shared.settings import IngressSettings, MagnusSettings
from shared.tasks import celery_broker, make_celery

THREE = "sentinel://h1:26379,h2:26380,h3/magnus/2"


def test_hosts_master_and_db() -> None:
    assert parse_sentinel_url(THREE) == SentinelUrl(
        sentinels=(("h1", 26379), ("h2", 26380), ("h3", SENTINEL_DEFAULT_PORT)),
        master="magnus", db=2)


def test_db_defaults_to_zero_and_one_sentinel_is_enough() -> None:
    s = parse_sentinel_url("sentinel://10.0.0.1/mymaster")
    assert s.sentinels == (("10.0.0.1", 26379),) and s.master == "mymaster" and s.db == 0


def test_credentials_percent_decoded_and_sentinel_password_option() -> None:
    s = parse_sentinel_url("sentinel://:p%40ss%3Aword@h1:1,h2:2/m/0?sentinel_password=sp")
    assert (s.username, s.password) == (None, "p@ss:word")
    assert s.sentinel_password == "sp" and s.sentinel_username is None
    s = parse_sentinel_url("sentinel://alice:pw@h1/m?sentinel_username=u&sentinel_password=x")
    assert (s.username, s.password, s.sentinel_username, s.sentinel_password) == (
        "alice", "pw", "u", "x")


def test_ipv6_sentinels() -> None:
    s = parse_sentinel_url("sentinel://[::1]:26379,[fe80::2]/m")
    assert s.sentinels == (("::1", 26379), ("fe80::2", 26379))


@pytest.mark.parametrize(("url", "problem"), [
    ("sentinel://h1:26379", "no master name"),
    ("sentinel://h1:26379/", "no master name"),
    ("sentinel:///m", "no sentinel addresses"),
    ("sentinel://h1,,h2/m", "empty sentinel address"),
    ("sentinel://h1:notaport/m", "no valid port"),
    ("sentinel://h1:0/m", "no valid port"),
    ("sentinel://h1:70000/m", "no valid port"),
    ("sentinel://:26379/m", "has no host"),
    ("sentinel://h1/m/x", "db 'x' is not a number"),
    ("sentinel://h1/m/-1", "is not a number"),
    ("sentinel://h1/m/0/extra", "is not /master-name[/db]"),
    ("sentinel://h1/m/", "is not /master-name[/db]"),
    ("sentinel://h1/m?timeout=3", "unknown option 'timeout'"),
    ("sentinel://h1/m?sentinel_password=a&sentinel_password=b", "given 2 times"),
    ("sentinel://h1/m#frag", "fragment"),
    ("sentinel://[::1/m", "Invalid IPv6"),
    ("redis://h1:6379/0", "not a sentinel Redis URL"),
])
def test_bad_urls_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match="sentinel") as info:
        parse_sentinel_url(url)
    assert problem in str(info.value)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_sentinel_url("sentinel://:hunter2@h1/m/x?sentinel_password=hunter3")
    assert "hunter" not in str(info.value) and "***" in str(info.value)
    assert redacted("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"


def test_client_for_refuses_a_bad_sentinel_url_at_once() -> None:
    with pytest.raises(ValueError, match="no master name"):
        client_for("sentinel://h1:26379")


def test_scheme_detection() -> None:
    assert is_sentinel_url(THREE) and is_sentinel_url("SENTINEL://h/m")
    assert not is_sentinel_url("redis://h:6379/0") and not is_sentinel_url("rediss://h/0")


def test_plain_redis_url_is_the_broker_as_it_is() -> None:
    assert celery_broker("redis://127.0.0.1:6379/3") == ("redis://127.0.0.1:6379/3", {})
    app = make_celery("redis://127.0.0.1:6379/3", 42.0)
    assert app.conf.broker_transport_options == {"visibility_timeout": 42.0}


def test_sentinel_url_becomes_kombus_sentinel_transport() -> None:
    broker, options = celery_broker(
        "sentinel://:p%40ss@h1:26379,h2:26380,[::1]/magnus/2?sentinel_password=sp")
    assert broker == ("sentinel://:p%40ss@h1:26379/2;sentinel://:p%40ss@h2:26380/2;"
                      "sentinel://:p%40ss@[::1]:26379/2")
    assert options["master_name"] == "magnus"
    assert options["sentinel_kwargs"]["password"] == "sp"
    app = make_celery("sentinel://h1:26379,h2:26380/magnus/2", 42.0)
    assert app.conf.broker_transport_options["master_name"] == "magnus"
    assert app.conf.broker_transport_options["visibility_timeout"] == 42.0
    # What kombu makes of it: its Sentinel transport, every Sentinel as an alternate, the db and
    # the primary's password from the URL.
    with app.connection_for_write() as conn:
        assert conn.transport_cls == "sentinel"
        assert conn.alt == ["sentinel://h1:26379/2", "sentinel://h2:26380/2"]
        assert conn.virtual_host == "2"
    with make_celery("sentinel://:p%40ss@h1/m").connection_for_write() as conn:
        assert conn.password == "p@ss" and conn.hostname == "h1" and conn.port == 26379


@pytest.mark.parametrize(("url", "configured", "wanted"), [
    ("redis://h:6379/0", None, 0),
    (THREE, None, 1),
    (THREE, 0, 0),
    (THREE, 2, 2),
    ("redis://h:6379/0", 1, 1),
])
def test_replicas_an_accept_waits_for(url: str, configured: int | None, wanted: int) -> None:
    assert default_wait_replicas(url, configured) == wanted


@pytest.mark.parametrize(("present", "acked", "wanted", "outcome"), [
    (True, 1, 1, Durability.REPLICATED),
    (True, 2, 1, Durability.REPLICATED),
    (True, 0, 1, Durability.PRIMARY_ONLY),
    (False, 0, 1, Durability.LOST),
    (False, 1, 1, Durability.LOST),
])
def test_durability_of_a_write(present: bool, acked: int, wanted: int,
                               outcome: Durability) -> None:
    assert durability(present, acked, wanted) is outcome


def test_settings_take_a_sentinel_url_and_wait_settings() -> None:
    s = MagnusSettings(redis_url=THREE)
    assert s.redis_url == THREE and s.redis_wait_replicas is None
    assert s.redis_wait_timeout_ms > 0


class _FakeRedis:
    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    def hincrby(self, name: str, key: str, amount: int) -> int:
        self.counters[key] = self.counters.get(key, 0) + amount
        return self.counters[key]


def _accept_with(monkeypatch: pytest.MonkeyPatch, outcome: Durability | Exception,
                 url: str = THREE) -> _FakeRedis:
    """Run ingress's durability wait for one request whose WAIT comes out as `outcome`."""
    from types import SimpleNamespace
    from typing import cast

    from services.ingress import core
    from shared import redis_conn
    from shared.schemas import QueuedRequest

    def wait(*args: object, **kwargs: object) -> Durability:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(redis_conn, "wait_for_replicas", wait)
    fake = _FakeRedis()
    ingress = cast(core.IngressState, SimpleNamespace(
        settings=IngressSettings(redis_url=url), redis=fake))
    req = QueuedRequest(request_id="req-1", app_id="qa", user_id="u", instruction="", input="x",
                        max_tokens=8, input_tokens=3, queued_at=0.0)
    core.await_replicas(ingress, req)
    return fake


def test_accept_replicated_or_primary_only_is_a_202(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _accept_with(monkeypatch, Durability.REPLICATED).counters == {}
    fake = _accept_with(monkeypatch, Durability.PRIMARY_ONLY)
    assert fake.counters == {"requests_accepted_unreplicated": 1}
    # A single server: no wait at all (a WAIT would raise here).
    _accept_with(monkeypatch, RuntimeError("no wait expected"), url="redis://h:6379/0")


def test_accept_lost_or_unknown_is_a_503_saying_what_to_do(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from services.ingress.core import ApiError

    with pytest.raises(ApiError) as info:
        _accept_with(monkeypatch, Durability.LOST)
    assert info.value.status_code == 503 and "nothing was accepted" in info.value.message
    assert info.value.headers and "Retry-After" in info.value.headers
    with pytest.raises(ApiError) as info:
        _accept_with(monkeypatch, redis.ConnectionError("gone"))
    assert info.value.status_code == 503
    assert "GET /v1/requests/req-1 answers 404" in info.value.message
