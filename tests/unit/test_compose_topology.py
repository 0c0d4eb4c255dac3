"""docker-compose.yml against the local launcher (offline/launcher.py), which the test suite runs:
the same services, each told the same things, so what the suite proves on one host holds for the
compose file that nobody can start here (no Docker engine on these machines).

The launcher's side is what `Stack.start` really spawns: the test runs it against the session's
Redis with process creation replaced by a recorder (and the waits for engines and readiness
skipped), so nothing is started and no list of variables is copied into this file by hand.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from offline.launcher import Stack
from services.engine import get_engine
from services.ingress.app import is_loopback
from shared import keys
from shared.settings import (
    REPO_ROOT,
    IngressSettings,
    LauncherSettings,
    MagnusSettings,
    PredictorSettings,
    SchedulerSettings,
    WorkerSettings,
)

COMPOSE = REPO_ROOT / "docker-compose.yml"
ENGINE_DOCKERFILE = "infra/Dockerfile.engine"

# The module a service runs -> its kind and the settings class it reads.
MODULES: dict[str, tuple[str, type[MagnusSettings]]] = {
    "services.ingress.app": ("ingress", IngressSettings),
    "services.predictor.main": ("predictor", PredictorSettings),
    "services.scheduler.main": ("scheduler", SchedulerSettings),
    "services.worker.main": ("worker", WorkerSettings),
}
SETTINGS_OF_KIND = dict(MODULES.values())


# --- docker-compose.yml ------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping (YAML merges rely on it)"
    return {k: str(v) for k, v in env.items()}


def compose_kind(service: dict[str, Any]) -> str | None:
    """redis, engine, worker, predictor, scheduler, ingress; None for the rest (Prometheus...)."""
    command = service.get("command", [])
    for module, (kind, _) in MODULES.items():
        if module in command:
            return kind
    if service.get("build", {}).get("dockerfile") == ENGINE_DOCKERFILE:
        return "engine"
    if str(service.get("image", "")).split(":")[0] == "redis":
        return "redis"
    return None


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose_services().items() if compose_kind(s) == kind}


def engine_entrypoint() -> list[str]:
    """The ENTRYPOINT of infra/Dockerfile.engine (exec form), which compose's command extends."""
    text = (REPO_ROOT / ENGINE_DOCKERFILE).read_text().replace("\\\n", " ")
    found = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert found, "Dockerfile.engine has no exec-form ENTRYPOINT"
    entrypoint: list[str] = json.loads(found.group(1))
    return entrypoint


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} given {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


# --- settings ----------------------------------------------------------------------------------
def env_fields(cls: type[BaseSettings]) -> dict[str, str]:
    """Environment variable -> field name, for every variable `cls` reads."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c.upper(): name for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names[alias.upper()] = name
        else:
            names[f"{prefix}{name}".upper()] = name
    return names


def default_as_env(cls: type[BaseSettings], var: str) -> str | None:
    """The value `cls` takes for `var` when it is unset, spelt as the launcher would set it."""
    field = cls.model_fields[env_fields(cls)[var]]
    return None if field.default is None else str(field.default)


def clean_magnus_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("MAGNUS_") or var == "REDIS_URL":
            monkeypatch.delenv(var)


def load_settings(cls: type[MagnusSettings], env: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> MagnusSettings:
    """`cls` as a process with exactly `env` would read it (the test's own MAGNUS_* removed)."""
    clean_magnus_env(monkeypatch)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return cls()


# --- the launcher ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spawned:
    name: str
    cmd: list[str]
    env: dict[str, str]

    @property
    def kind(self) -> str:
        return self.name.rstrip("0123456789")


class _NotStarted:
    """What `Stack.start` uses of a child it spawned: whether it is alive."""

    def alive(self) -> bool:
        return True


def record_spawns(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, Spawned]:
    spawned: dict[str, Spawned] = {}

    def spawn(name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None
              ) -> _NotStarted:
        spawned[name] = Spawned(name, cmd, env)
        return _NotStarted()

    monkeypatch.setattr(stack, "_spawn", spawn)
    return spawned


@pytest.fixture()
def launched(redis_url: str, redis_client: redis.Redis, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> dict[str, Spawned]:
    """Every service `make run` starts for compose's GPU count, by name, as spawned."""
    clean_magnus_env(monkeypatch)
    monkeypatch.setenv("MAGNUS_REDIS_URL", redis_url)  # an emptied Redis: GPU ids 0..n-1
    settings = LauncherSettings(gpus=compose_gpus(), run_dir=tmp_path)
    stack = Stack(settings)
    spawned = record_spawns(stack, monkeypatch)
    monkeypatch.setattr(Stack, "wait_ready", lambda self, timeout_s: None)
    monkeypatch.setattr(type(get_engine(settings.engine)), "wait_ready",
                        lambda *args, **kwargs: None)
    stack.start()
    return spawned


def compose_gpus() -> int:
    return int(compose()["x-magnus-env"]["MAGNUS_GPUS"])


def launched_of_kind(launched: dict[str, Spawned], kind: str) -> list[Spawned]:
    return [s for s in launched.values() if s.kind == kind]


def pairs(launched: dict[str, Spawned]) -> Iterator[tuple[str, dict[str, Any], Spawned]]:
    """(compose name, compose service, the launcher's counterpart) for each Magnus service:
    workers paired by GPU id, every scheduler with the launcher's first."""
    for name, service in compose_services().items():
        kind = compose_kind(service)
        if kind not in SETTINGS_OF_KIND:
            continue
        mine = launched_of_kind(launched, kind)
        if kind == "worker":
            gpu = compose_env(service)["MAGNUS_GPU"]
            mine = [s for s in mine if s.env["MAGNUS_GPU"] == gpu]
        assert mine, f"{name}: the launcher starts no {kind} like it"
        yield name, service, sorted(mine, key=lambda s: s.name)[0]


# --- the tests ---------------------------------------------------------------------------------
def test_compose_runs_the_services_the_launcher_starts(launched: dict[str, Spawned]) -> None:
    ours = Counter(k for s in compose_services().values() if (k := compose_kind(s)))
    theirs = Counter(s.kind for s in launched.values())
    # The launcher was given a Redis URL (as compose's services are); it starts an embedded
    # Redis only without one, checked below.
    assert ours.pop("redis") == 1
    assert ours == theirs
    # One scheduler leads, one stands by (LauncherSettings.standby_schedulers, default 1).
    assert theirs["scheduler"] == 1 + LauncherSettings().standby_schedulers == 2
    assert ours["engine"] == ours["worker"] == compose_gpus()


def test_launcher_starts_a_redis_when_given_none(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    clean_magnus_env(monkeypatch)
    stack = Stack(LauncherSettings(run_dir=tmp_path))
    spawned = record_spawns(stack, monkeypatch)
    stack.start_redis()
    assert list(spawned) == ["redis"]
    # Durable as compose's Redis is: an append-only file fsynced every second.
    compose_redis = next(iter(of_kind("redis").values()))["command"]
    for args in (spawned["redis"].cmd, compose_redis):
        assert flag(args, "--appendonly") == "yes"
        assert flag(args, "--appendfsync") == "everysec"


def test_compose_sets_what_the_launcher_sets(launched: dict[str, Spawned]) -> None:
    """Each MAGNUS_* variable the launcher gives a service and the service reads, compose gives
    it too, unless the launcher's value is the setting's default (which compose's container then
    gets anyway)."""
    for name, service, mine in pairs(launched):
        cls = SETTINGS_OF_KIND[str(compose_kind(service))]
        env = compose_env(service)
        read = env_fields(cls)
        missing = sorted(var for var, value in mine.env.items()
                         if var in read and var.startswith("MAGNUS_") and var not in env
                         and value != default_as_env(cls, var))
        assert missing == [], f"{name} lacks what the launcher's {mine.name} is given"


def test_every_magnus_variable_in_compose_is_read_by_its_service(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The block every Magnus service gets (as the launcher's common environment): each variable
    # read by some service; what a service is given beyond it, read by that service.
    common = {k: str(v) for k, v in compose()["x-magnus-env"].items()}
    read_somewhere = set().union(*(env_fields(c) for c in SETTINGS_OF_KIND.values()))
    assert {v for v in common if v.startswith("MAGNUS_")} - read_somewhere == set()
    for name, service in compose_services().items():
        kind = compose_kind(service)
        env = compose_env(service)
        if kind not in SETTINGS_OF_KIND:
            # vLLM, Redis, Prometheus and Grafana read none: one set there is a mistake.
            assert [v for v in env if v.startswith("MAGNUS_")] == [], name
            continue
        cls = SETTINGS_OF_KIND[kind]
        own = {v for v, value in env.items()
               if v.startswith("MAGNUS_") and common.get(v) != value}
        assert own - set(env_fields(cls)) == set(), f"{name} sets what it never reads"
        # And the values parse, as the container's start-up would.
        load_settings(cls, env, monkeypatch)


def test_ingress_off_loopback_has_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in of_kind("ingress").items():
        settings = load_settings(IngressSettings, compose_env(service), monkeypatch)
        assert isinstance(settings, IngressSettings)
        if not is_loopback(settings.host):
            # services/ingress/app.py (create_app) refuses to bind off loopback without keys.
            assert settings.tenants_file is not None, (
                f"{name} binds {settings.host} without MAGNUS_TENANTS_FILE: ingress refuses to "
                "start (mount a tenants file and set MAGNUS_TENANTS_FILE)")
            mounts = [str(v).split(":")[1] for v in service.get("volumes", [])]
            assert any(str(settings.tenants_file).startswith(m.rstrip("/") + "/")
                       for m in mounts), f"{name}: the tenants file is on no mounted volume"


def test_worker_queues_are_node_gpu_queues(launched: dict[str, Spawned]) -> None:
    assert keys.celery_queue(0, "local") == "local.gpu.0"
    assert keys.celery_queue(1, "local") == "local.gpu.1"
    workers = of_kind("worker")
    gpus = sorted(int(compose_env(s)["MAGNUS_GPU"]) for s in workers.values())
    assert gpus == list(range(compose_gpus())), "one worker per GPU id"
    for name, service, mine in pairs(launched):
        if compose_kind(service) != "worker":
            continue
        env = compose_env(service)
        gpu = int(env["MAGNUS_GPU"])
        node = env.get("MAGNUS_NODE") or str(default_as_env(WorkerSettings, "MAGNUS_NODE"))
        args = [str(a) for a in service["command"]]
        # The queue the scheduler sends this GPU's batches to (shared/keys.py).
        assert flag(args, "-Q") == keys.celery_queue(gpu, node), name
        # Same Celery options as the launcher's worker for the same GPU.
        for option in ("-Q", "--pool", "-c", "-n"):
            assert flag(args, option) == flag(mine.cmd, option), (name, option)
        assert {"--without-gossip", "--without-mingle"} <= set(args), name


def test_each_worker_talks_to_its_own_engine() -> None:
    engines = {compose_env(s)["CUDA_VISIBLE_DEVICES"]: n for n, s in of_kind("engine").items()}
    port = flag(engine_entrypoint(), "--port")
    for name, service in of_kind("worker").items():
        env = compose_env(service)
        url = urlsplit(env["MAGNUS_ENGINE_URL"])
        # Worker N beside engine N, on GPU device N (as the launcher pairs them).
        assert url.hostname == engines[env["MAGNUS_GPU"]], name
        assert str(url.port) == port, name
        depends = service.get("depends_on", {})
        assert depends.get(url.hostname, {}).get("condition") == "service_healthy", name


def test_engines_serve_the_model_magnus_names_on_one_gpu_each() -> None:
    magnus = compose()["x-magnus-env"]
    entrypoint = engine_entrypoint()
    for name, service in of_kind("engine").items():
        args = [*entrypoint, *[str(a) for a in service["command"]]]
        assert flag(args, "--model") == magnus["MAGNUS_MODEL_DIR"], name
        assert flag(args, "--served-model-name") == magnus["MAGNUS_SERVED_MODEL_NAME"], name
        assert flag(args, "--max-model-len") == str(magnus["MAGNUS_MAX_MODEL_LEN"]), name
        device = compose_env(service)["CUDA_VISIBLE_DEVICES"]
        (reservation,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["device_ids"] == [device], name
        mounts = [v.split(":")[1] for v in service["volumes"]]
        assert any(magnus["MAGNUS_MODEL_DIR"].startswith(m) for m in mounts), name
        # Its health check asks the port the server listens on.
        assert f":{flag(args, '--port')}/health" in " ".join(service["healthcheck"]["test"])
    devices = sorted(compose_env(s)["CUDA_VISIBLE_DEVICES"] for s in of_kind("engine").values())
    assert devices == [str(d) for d in range(compose_gpus())]


def test_ingress_health_check_and_port_match_its_settings() -> None:
    (service,) = of_kind("ingress").values()
    port = compose_env(service)["MAGNUS_PORT"]
    assert f":{port}/healthz" in " ".join(service["healthcheck"]["test"])
    assert any(str(p).endswith(f":{port}") for p in service["ports"])
    # The tokenizer: ingress counts prompts in the served model's tokens.
    mounts = [v.split(":")[1] for v in service["volumes"]]
    model_dir = compose_env(service)["MAGNUS_MODEL_DIR"]
    assert any(model_dir.startswith(m) for m in mounts)
