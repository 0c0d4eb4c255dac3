"""Connecting to Redis with a retry, so services started before Redis wait instead of dying, and
to a Redis that survives its primary through Sentinel.

Two forms of MAGNUS_REDIS_URL are accepted everywhere (every service, the launcher, Celery):

    redis://[[user]:password@]host:port/db      one Redis server (redis-py's own URL form)
    sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db][?options]

The sentinel form names the Sentinels (port 26379 when left out; IPv6 in brackets), the master
name they monitor (`sentinel monitor <master-name> ...` in their configuration) and the database
(0 when left out). The user and password are the Redis servers' (primary and replicas). Options:
`sentinel_password=...` (and `sentinel_username=...`) when the Sentinels themselves require
AUTH; anything else is refused. Reserved characters in a password are percent-encoded. Example:

    sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26379,10.0.0.3:26379/magnus/0

`connect(url)` returns a client bound to the current primary (redis-py's
`Sentinel.master_for`): each new connection asks the Sentinels where the primary is, so after a
failover the client reconnects to the promoted replica, and a command that meets a dead or demoted
primary fails with a `redis.ConnectionError` that redis-py retries (then the callers' own outage
handling, `RedisOutage` and `call_retrying`, takes over). `async_client(url)` is the same for
redis.asyncio. Celery reads the same URL through `shared.tasks.celery_broker`.

Replication is asynchronous, so a failover can lose the last writes the primary acknowledged.
`wait_for_replicas` bounds that for a write that must survive (ingress's accept): it waits (Redis
WAIT) until the write reached `replicas` replicas or a timeout passes, and reports whether it did
(`Durability`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

T = TypeVar("T")

log = logging.getLogger(__name__)

SENTINEL_SCHEME = "sentinel"
SENTINEL_DEFAULT_PORT = 26379
_SENTINEL_FORM = "sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]"
_SENTINEL_OPTIONS = ("sentinel_password", "sentinel_username")
# Sentinels answer a query about the primary at once; one that does not is skipped.
_SENTINEL_SOCKET_TIMEOUT_S = 2.0
# A connection to a primary that is gone (a partition, not a refused port) fails after this long
# and the client asks the Sentinels again.
_PRIMARY_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `sentinel://` URL (see the module docstring)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def redacted(url: str) -> str:
    """`url` with its password(s) replaced by `***`, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hosts}" if ":" in userinfo else netloc
    if "password=" in tail:
        path, _, query = tail.partition("?")
        query = "&".join(f"{k}=***" if k.endswith("password") else f"{k}={v}"
                         for k, _, v in (part.partition("=") for part in query.split("&")))
        tail = f"{path}?{query}"
    return f"{scheme}{sep}{netloc}{slash}{tail}"


def _bad(url: str, problem: str) -> ValueError:
    return ValueError(f"bad sentinel Redis URL {redacted(url)!r}: {problem} "
                      f"(expected {_SENTINEL_FORM})")


def _parse_host(url: str, item: str) -> tuple[str, int]:
    if not item:
        raise _bad(url, "an empty sentinel address in the host list")
    if item.startswith("["):  # [IPv6]:port
        host, close, rest = item[1:].partition("]")
        if not close or not host or (rest and not rest.startswith(":")):
            raise _bad(url, f"sentinel address {item!r} is not [ipv6]:port")
        port_text = rest[1:]
    else:
        host, _, port_text = item.partition(":")
        if not host:
            raise _bad(url, f"sentinel address {item!r} has no host")
    if not port_text:
        return host, SENTINEL_DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"sentinel address {item!r} has no valid port (1-65535)")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The sentinels, master name, db and credentials of a `sentinel://` URL; a `ValueError`
    naming the problem for anything else."""
    if not is_sentinel_url(url):
        raise ValueError(f"not a sentinel Redis URL: {redacted(url)!r} (expected {_SENTINEL_FORM})")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # unbalanced [ ] around an IPv6 address
        raise _bad(url, str(exc)) from exc
    if parts.fragment:
        raise _bad(url, "a #fragment is not allowed")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    if not hostlist:
        raise _bad(url, "no sentinel addresses")
    sentinels = tuple(_parse_host(url, item) for item in hostlist.split(","))
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    segments = parts.path.split("/")[1:] if parts.path else []
    if not segments or not segments[0]:
        raise _bad(url, "no master name")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        raise _bad(url, f"path {parts.path!r} is not /master-name[/db]")
    master = unquote(segments[0])
    if any(c.isspace() for c in master):
        raise _bad(url, f"master name {master!r} contains whitespace")
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise _bad(url, f"db {segments[1]!r} is not a number >= 0")
        db = int(segments[1])
    options: dict[str, str] = {}
    for key, values in parse_qs(parts.query, keep_blank_values=True, strict_parsing=False).items():
        if key not in _SENTINEL_OPTIONS:
            raise _bad(url, f"unknown option {key!r} (known: {', '.join(_SENTINEL_OPTIONS)})")
        if len(values) != 1:
            raise _bad(url, f"option {key!r} given {len(values)} times")
        options[key] = values[0]
    return SentinelUrl(sentinels=sentinels, master=master, db=db, username=username,
                       password=password, sentinel_username=options.get("sentinel_username"),
                       sentinel_password=options.get("sentinel_password"))


def _sentinel_kwargs(s: SentinelUrl) -> dict[str, Any]:
    """How to talk to the Sentinels themselves (not the primary)."""
    out: dict[str, Any] = {"socket_timeout": _SENTINEL_SOCKET_TIMEOUT_S,
                           "socket_connect_timeout": _SENTINEL_SOCKET_TIMEOUT_S}
    if s.sentinel_username is not None:
        out["username"] = s.sentinel_username
    if s.sentinel_password is not None:
        out["password"] = s.sentinel_password
    return out


def _primary_kwargs(s: SentinelUrl) -> dict[str, Any]:
    """How to talk to the primary the Sentinels name."""
    return {"db": s.db, "username": s.username, "password": s.password,
            "decode_responses": True, "socket_connect_timeout": _PRIMARY_CONNECT_TIMEOUT_S,
            "socket_keepalive": True}


def client_for(url: str) -> redis.Redis:
    """A client for `url` (either form), without waiting for Redis; `connect` waits."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, decode_responses=True)
    s = parse_sentinel_url(url)
    sentinel = redis.sentinel.Sentinel(list(s.sentinels), sentinel_kwargs=_sentinel_kwargs(s))
    client: redis.Redis = sentinel.master_for(s.master, **_primary_kwargs(s))
    return client


def async_client(url: str, connect_timeout_s: float) -> redis.asyncio.Redis:
    """The redis.asyncio client for `url` (either form), following failovers like `connect`'s."""
    if not is_sentinel_url(url):
        return redis.asyncio.Redis.from_url(url, decode_responses=True,
                                            socket_connect_timeout=connect_timeout_s)
    s = parse_sentinel_url(url)
    sentinel = redis.asyncio.sentinel.Sentinel(list(s.sentinels),
                                               sentinel_kwargs=_sentinel_kwargs(s))
    kwargs = {**_primary_kwargs(s), "socket_connect_timeout": connect_timeout_s}
    client: redis.asyncio.Redis = sentinel.master_for(s.master, **kwargs)
    return client


def connect(url: str, timeout_s: float = 30.0) -> redis.Redis:
    """A client for `url` (either form) once Redis answers, waiting up to `timeout_s` for it. A
    malformed sentinel URL is a `ValueError` at once."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        client = client_for(url)
        try:
            client.ping()
            return client
        except redis.ConnectionError:  # MasterNotFoundError (no primary known yet) included
            client.close()
            if time.monotonic() >= deadline:
                raise
            log.info("waiting for redis at %s", redacted(url))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def default_wait_replicas(url: str, configured: int | None) -> int:
    """Replicas an accepted write waits for: as configured, else 1 behind Sentinel (there is a
    replica to lose the write to) and 0 (no wait) for a single server."""
    if configured is not None:
        return configured
    return 1 if is_sentinel_url(url) else 0


class Durability(Enum):
    """What became of a write after `wait_for_replicas`."""

    # On the primary and acknowledged by the replicas asked for: it survives a failover.
    REPLICATED = "replicated"
    # On the primary, but fewer replicas acknowledged it in time: a failover now can lose it.
    PRIMARY_ONLY = "primary-only"
    # Not on the primary any more: a failover lost it before it reached a replica.
    LOST = "lost"


def durability(present: bool, acked: int, wanted: int) -> Durability:
    if not present:
        return Durability.LOST
    return Durability.REPLICATED if acked >= wanted else Durability.PRIMARY_ONLY


def wait_for_replicas(r: redis.Redis, key: str, ttl_s: int, replicas: int, timeout_ms: int,
                      give_up_s: float = 30.0) -> Durability:
    """After a write that included `key` (with expiry `ttl_s`), wait up to `timeout_ms` for
    `replicas` replicas to hold it.

    Redis WAIT counts replicas that reached the last write *of its own connection*, and a pooled
    client's next command may run on another one; so this re-sets `key`'s expiry (a write that is
    always replicated, and finds out whether the key is still there) and WAITs on one connection
    in one round trip. Each stream of replication is ordered, so a replica that has the expiry has
    every earlier write. Retried through an outage (a failover) for up to `give_up_s`; then the
    `redis.ConnectionError` propagates."""

    def once() -> Durability:
        pipe = r.pipeline(transaction=False)
        pipe.expire(key, ttl_s)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        present, acked = pipe.execute()
        return durability(bool(present), int(acked), replicas)

    return call_retrying(once, give_up_s)


# Redis unreachable, restarting or still loading its append-only file: wait and retry. Any other
# Redis error (a wrong type, a script error) is a bug and propagates.
REDIS_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


class RedisOutage:
    """Backoff while Redis is unreachable, for a service loop that must ride it out: `failed`
    after each failed step (it logs the first, then waits 0.1 s doubling to `max_delay_s`),
    `recovered` after the first step that succeeds again (True once per outage, so the caller
    can resync what it keeps in memory)."""

    def __init__(self, service: str, max_delay_s: float = 5.0) -> None:
        self.service, self.max_delay_s = service, max_delay_s
        self.down_since: float | None = None
        self.delay = 0.1

    def failed(self, exc: Exception, stop: threading.Event) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("%s: redis unreachable (%s: %s); retrying with backoff", self.service,
                        type(exc).__name__, exc)
        stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.max_delay_s)

    def recovered(self) -> bool:
        if self.down_since is None:
            return False
        log.info("%s: redis back after %.1f s", self.service, time.monotonic() - self.down_since)
        self.down_since, self.delay = None, 0.1
        return True


def call_retrying(call: Callable[[], T], give_up_s: float = 120.0) -> T:
    """`call()`, retried through a Redis outage for up to `give_up_s` (0.1 s doubling to 5 s):
    a worker's write while Redis restarts is delayed, not lost."""
    deadline = time.monotonic() + give_up_s
    delay = 0.1
    while True:
        try:
            return call()
        except REDIS_DOWN as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("redis unreachable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def execute_retrying(r: redis.Redis, build: Callable[[redis.client.Pipeline], None],
                     give_up_s: float = 120.0) -> list[Any]:
    """Run the transaction `build` writes into a fresh pipeline, retrying through a Redis
    outage (rebuilt on each try: a failed pipeline forgets its commands)."""

    def once() -> list[Any]:
        pipe = r.pipeline(transaction=True)
        build(pipe)
        return list(pipe.execute())

    return call_retrying(once, give_up_s)
