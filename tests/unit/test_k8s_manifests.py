"""The Kubernetes manifests (infra/k8s) rendered with `kubectl kustomize` and checked offline.

Core objects are validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
an unknown or misspelt field fails), the Prometheus operator's and KEDA's objects by a small
structural check of our own (their CRD schemas are not shipped with kubernetes-validate). Then
the cross-checks that catch the mistakes a schema cannot: a MAGNUS_* variable no settings class
reads, a probe on a port nothing listens on, a Service or ServiceMonitor that selects nothing, an
autoscaler on a metric Magnus does not export, a worker on a queue the scheduler never sends to.

Nothing here talks to a cluster: what a real cluster would add (admission, CRD versions installed,
the GPU operator, whether the images start) is not checked (docs/deploy.md, "Limits").
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.ingress.app import is_loopback
from shared import keys, metrics
from shared.redis_conn import parse_sentinel_url
from shared.settings import (
    REPO_ROOT,
    IngressSettings,
    LauncherSettings,
    MagnusSettings,
    PredictorSettings,
    SchedulerSettings,
    WorkerSettings,
)

K8S = REPO_ROOT / "infra" / "k8s"
TARGETS = {"base": K8S / "base", "example overlay": K8S / "overlays" / "example"}
# The oldest Kubernetes the manifests need (native sidecars are on by default from 1.29; the
# StatefulSet pod-index label from 1.28) and a recent one.
KUBE_VERSIONS = ("1.29.0", "1.33.0")
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# Secrets the operator creates by hand (docs/deploy.md): never in the manifests, on purpose.
EXTERNAL_SECRETS = {"magnus-tenants", "magnus-metrics-key"}

# The module a container runs -> the settings class that process reads.
SERVICE_SETTINGS: dict[str, type[MagnusSettings]] = {
    "services.ingress.app": IngressSettings,
    "services.predictor.main": PredictorSettings,
    "services.scheduler.main": SchedulerSettings,
    "services.worker.main": WorkerSettings,
}
# Services that serve Prometheus metrics on MAGNUS_METRICS_PORT (shared/metrics.py: serve);
# ingress serves /metrics on its API port instead.
EXPORTER_MODULES = {"services.predictor.main", "services.scheduler.main",
                    "services.worker.main"}

Obj = dict[str, Any]


# --- rendering --------------------------------------------------------------------------------
@functools.cache
def _render(target: str) -> tuple[Obj, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render infra/k8s with "
                    "`kubectl kustomize` (install kubectl; no cluster is needed)")
    proc = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True,
                          text=True, timeout=120, check=False)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {TARGETS[target]} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


@pytest.fixture(params=sorted(TARGETS))
def objs(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    return _render(request.param)


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def workloads(objs: tuple[Obj, ...]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def config_map(objs: tuple[Obj, ...], name: str) -> Obj:
    """The ConfigMap a reference names (generated ones carry a hash suffix, and references to
    them are rewritten by kustomize, so the rendered names match exactly)."""
    return named(objs, "ConfigMap", name)


def common_env(objs: tuple[Obj, ...]) -> dict[str, str]:
    (cm,) = [c for c in of_kind(objs, "ConfigMap")
             if c["metadata"]["name"].startswith("magnus-env")]
    data: dict[str, str] = cm["data"]
    return data


# --- what a container sees ---------------------------------------------------------------------
@dataclass(frozen=True)
class Pod:
    """One pod a workload would make: its name and the labels the controller adds."""

    name: str
    namespace: str
    labels: dict[str, str]


def example_pod(workload: Obj, ordinal: int = 0) -> Pod:
    labels = dict(workload["spec"]["template"]["metadata"].get("labels", {}))
    name = workload["metadata"]["name"]
    namespace = workload["metadata"].get("namespace", "default")
    if workload["kind"] == "StatefulSet":
        labels[POD_INDEX_LABEL] = str(ordinal)
        return Pod(f"{name}-{ordinal}", namespace, labels)
    return Pod(f"{name}-5d9c7b8f4-x2x7q", namespace, labels)


def resolve_field(path: str, pod: Pod) -> str:
    """The value of an env fieldRef for `pod` (the paths Kubernetes allows in env)."""
    if path == "metadata.name":
        return pod.name
    if path == "metadata.namespace":
        return pod.namespace
    label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
    if label:
        assert label.group(1) in pod.labels, f"no label {label.group(1)} on the pod"
        return pod.labels[label.group(1)]
    raise AssertionError(f"fieldRef {path} is not resolved by this test")


def container_env(objs: tuple[Obj, ...], container: Obj, pod: Pod) -> dict[str, str]:
    """The environment the kubelet gives `container` in `pod`: envFrom, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "only ConfigMaps feed envFrom here"
        env.update(config_map(objs, source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]
            assert set(ref) == {"fieldRef"}, f"{var['name']}: only fieldRef is resolved here"
            env[var["name"]] = resolve_field(ref["fieldRef"]["fieldPath"], pod)
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of command and args ($$ escapes; unknown stays as is)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), arg)


def argv(objs: tuple[Obj, ...], container: Obj, pod: Pod) -> list[str]:
    env = container_env(objs, container, pod)
    return [expand(a, env) for a in [*container.get("command", []), *container.get("args", [])]]


def flag(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} given {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def service_module(container: Obj) -> str | None:
    words = [*container.get("command", []), *container.get("args", [])]
    found = [m for m in SERVICE_SETTINGS if m in words]
    assert len(found) <= 1, words
    return found[0] if found else None


def magnus_containers(objs: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj, str]]:
    """(workload, container, module) for every container that runs a Magnus service."""
    for w in workloads(objs):
        for c in all_containers(w):
            module = service_module(c)
            if module is not None:
                yield w, c, module


# --- settings ----------------------------------------------------------------------------------
def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: MAGNUS_<FIELD>, or a field's aliases."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c.upper() for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def service_settings_classes() -> list[type[MagnusSettings]]:
    """MagnusSettings and every subclass a service reads (the launcher's are not read in a pod)."""
    found: list[type[MagnusSettings]] = [MagnusSettings]
    stack = list(MagnusSettings.__subclasses__())
    while stack:
        cls = stack.pop()
        if not issubclass(cls, LauncherSettings):
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def load_settings(cls: type[MagnusSettings], env: dict[str, str],
                  monkeypatch: pytest.MonkeyPatch) -> MagnusSettings:
    """`cls` as a process with exactly `env` would read it (the test's own MAGNUS_* removed)."""
    for var in list(os.environ):
        if var.startswith("MAGNUS_") or var == "REDIS_URL":
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return cls()


# --- schema validation ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_objects_validate_against_the_kubernetes_schemas_strictly(
        objs: tuple[Obj, ...], version: str) -> None:
    errors = []
    for o in objs:
        if o["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {exc.message} at "
                          f"{'.'.join(str(p) for p in exc.path)}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert errors == []


def test_every_part_of_the_topology_is_rendered(objs: tuple[Obj, ...]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("Deployment", "magnus-ingress"), ("Service", "magnus-ingress"),
            ("HorizontalPodAutoscaler", "magnus-ingress"), ("Deployment", "magnus-predictor"),
            ("Deployment", "magnus-scheduler"), ("StatefulSet", "magnus-gpu"),
            ("StatefulSet", "magnus-redis"), ("Service", "magnus-redis-sentinel"),
            ("ScaledObject", "magnus-gpu"), ("PersistentVolumeClaim", "magnus-models")} <= kinds
    assert {n for k, n in kinds if k == "ServiceMonitor"} >= {
        "magnus-ingress", "magnus-predictor", "magnus-scheduler", "magnus-gpu"}
    # Leader and standby, as docker-compose.yml's scheduler and scheduler-standby.
    assert named(objs, "Deployment", "magnus-scheduler")["spec"]["replicas"] == 2
    # A sentinel majority survives one pod lost only with three.
    assert named(objs, "StatefulSet", "magnus-redis")["spec"]["replicas"] == 3


# --- the CRD objects -------------------------------------------------------------------------
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")
SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel",
                        "targetLabels", "podTargetLabels", "sampleLimit"}
SERVICE_MONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                            "honorLabels", "relabelings", "metricRelabelings", "params",
                            "authorization"}
# The operator's SafeAuthorization: a type and a key of a Secret in the monitor's namespace.
SERVICE_MONITOR_AUTHORIZATION = {"type", "credentials"}
SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                      "minReplicaCount", "maxReplicaCount", "advanced", "fallback", "triggers",
                      "initialCooldownPeriod"}
PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold",
                      "namespace", "ignoreNullValues", "unsafeSsl", "queryParameters",
                      "customHeaders"}


def test_service_monitors_are_well_formed(objs: tuple[Obj, ...]) -> None:
    monitors = of_kind(objs, "ServiceMonitor")
    assert monitors
    for m in monitors:
        name = m["metadata"]["name"]
        assert m["apiVersion"] == "monitoring.coreos.com/v1", name
        assert set(m["spec"]) <= SERVICE_MONITOR_SPEC, name
        labels = m["spec"]["selector"]["matchLabels"]
        assert labels and all(isinstance(v, str) for v in labels.values()), name
        assert m["spec"]["endpoints"], name
        for ep in m["spec"]["endpoints"]:
            assert set(ep) <= SERVICE_MONITOR_ENDPOINT, (name, ep)
            # A named Service port: the operator resolves it (a number here would be a
            # targetPort, and silently scrape the wrong thing after a port change).
            assert isinstance(ep["port"], str), (name, ep)
            assert ep.get("path", "/metrics").startswith("/"), (name, ep)
            if "authorization" in ep:
                auth = ep["authorization"]
                assert set(auth) <= SERVICE_MONITOR_AUTHORIZATION, (name, auth)
                assert auth.get("type", "Bearer") == "Bearer", (name, auth)
                assert set(auth["credentials"]) == {"name", "key"}, (name, auth)
                assert auth["credentials"]["name"] in EXTERNAL_SECRETS, (name, auth)
            assert DURATION.match(ep.get("interval", "30s")), (name, ep)


def test_scaled_object_is_well_formed(objs: tuple[Obj, ...]) -> None:
    (so,) = of_kind(objs, "ScaledObject")
    spec = so["spec"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(spec) <= SCALED_OBJECT_SPEC
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert set(behavior) <= {"scaleUp", "scaleDown"}
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert set(meta) <= PROMETHEUS_TRIGGER
        assert {"serverAddress", "query", "threshold"} <= set(meta)
        # KEDA's trigger metadata is a map of strings: a bare number is refused on apply.
        assert all(isinstance(v, str) for v in meta.values()), meta
        assert float(meta["threshold"]) > 0
        assert urlsplit(meta["serverAddress"]).scheme in {"http", "https"}
        assert meta["query"].count("(") == meta["query"].count(")")


# --- settings cross-checks ------------------------------------------------------------------
def test_every_magnus_variable_is_read_by_a_settings_class(objs: tuple[Obj, ...]) -> None:
    read_somewhere = set().union(*(settings_env_names(c) for c in service_settings_classes()))
    common = {v for v in common_env(objs) if v.startswith("MAGNUS_")}
    assert common - read_somewhere == set(), "ConfigMap variables no service reads"
    for w, c, module in magnus_containers(objs):
        own = {v["name"] for v in c.get("env", []) if v["name"].startswith("MAGNUS_")}
        unread = own - settings_env_names(SERVICE_SETTINGS[module])
        assert unread == set(), f"{w['metadata']['name']}/{c['name']} sets what it never reads"
    # vLLM reads no MAGNUS_* variable: one set on the engine alone would be a mistake.
    for w in workloads(objs):
        for c in all_containers(w):
            if service_module(c) is None:
                assert not [v for v in c.get("env", []) if v["name"].startswith("MAGNUS_")], (
                    w["metadata"]["name"], c["name"])


def test_each_service_environment_parses_as_its_settings(
        objs: tuple[Obj, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """Values too: a MAGNUS_GPUS of "four" or an unknown engine mode would stop the pod at
    start-up; here it stops the test."""
    for w, c, module in magnus_containers(objs):
        env = container_env(objs, c, example_pod(w))
        settings = load_settings(SERVICE_SETTINGS[module], env, monkeypatch)
        if isinstance(settings, IngressSettings) and not is_loopback(settings.host):
            # services/ingress/app.py refuses to bind off loopback without API keys.
            assert settings.tenants_file is not None, "ingress off loopback needs a tenants file"
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert any(str(settings.tenants_file).startswith(m + "/") for m in mounts)
        if module in EXPORTER_MODULES:
            assert settings.metrics_port is not None, f"{c['name']} exports no metrics"


def test_gpu_count_is_the_autoscaler_maximum(objs: tuple[Obj, ...]) -> None:
    (so,) = of_kind(objs, "ScaledObject")
    # The scheduler dispatches to GPU ids below MAGNUS_GPUS: a pod beyond it would idle, and a
    # MAGNUS_GPUS beyond the pods is harmless but hides a stale value.
    assert int(common_env(objs)["MAGNUS_GPUS"]) == so["spec"]["maxReplicaCount"]


# --- probes and ports ------------------------------------------------------------------------
def container_ports(container: Obj) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"]
            for p in container.get("ports", [])}


def probe_port(container: Obj, probe: Obj) -> int:
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe:
            port = probe[handler]["port"]
            ports = container_ports(container)
            if isinstance(port, str):
                assert port in ports, f"{container['name']}: probe on unnamed port {port}"
                return ports[port]
            assert port in ports.values(), f"{container['name']}: probe on undeclared {port}"
            return int(port)
    command = " ".join(probe["exec"]["command"])
    found = re.search(r"-p (\d+)", command)
    assert found, f"{container['name']}: exec probe names no port: {command}"
    assert int(found.group(1)) in container_ports(container).values(), command
    return int(found.group(1))


def listening_port(objs: tuple[Obj, ...], workload: Obj, container: Obj) -> set[int]:
    """The ports the process in `container` is told to listen on, as far as its settings or
    arguments say (an empty set: this test does not know, e.g. Redis's own images)."""
    pod = example_pod(workload)
    module = service_module(container)
    env = container_env(objs, container, pod)
    if module == "services.ingress.app":
        return {int(env["MAGNUS_PORT"])}
    if module in EXPORTER_MODULES:
        return {int(env["MAGNUS_METRICS_PORT"])}
    args = argv(objs, container, pod)
    if "vllm.entrypoints.openai.api_server" in args:
        return {int(flag(args, "--port"))}
    return set()


def test_every_probe_targets_a_port_its_container_declares_and_serves(
        objs: tuple[Obj, ...]) -> None:
    probed = 0
    for w in workloads(objs):
        for c in all_containers(w):
            declared = set(container_ports(c).values())
            served = listening_port(objs, w, c)
            # A declared port the process is not told to listen on is a port nothing serves.
            assert not served or served == declared, (w["metadata"]["name"], c["name"])
            for kind in PROBES:
                if kind in c:
                    port = probe_port(c, c[kind])
                    assert not served or port in served, (w["metadata"]["name"], c["name"],
                                                          kind)
                    probed += 1
            # Every long-running Magnus process and every engine is watched by something.
            if service_module(c) or served:
                assert any(k in c for k in PROBES), (w["metadata"]["name"], c["name"])
    assert probed


def test_probe_paths_are_the_endpoints_that_exist(objs: tuple[Obj, ...]) -> None:
    known = {"services.ingress.app": {"/healthz", "/openapi.json", "/metrics"},
             "engine": {"/health"}}
    for w in workloads(objs):
        for c in all_containers(w):
            module = service_module(c) or ("engine" if c["name"] == "engine" else None)
            for kind in PROBES:
                http = c.get(kind, {}).get("httpGet")
                if http is None:
                    continue
                paths = known.get(module or "", {"/metrics"})
                assert http["path"] in paths, (w["metadata"]["name"], c["name"], kind)
            if module == "services.ingress.app":
                # A Redis outage fails /healthz: as liveness it would restart every ingress.
                assert c["livenessProbe"]["httpGet"]["path"] != "/healthz"
                assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"


# --- selectors -------------------------------------------------------------------------------
def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_service_selects_pods_that_have_its_target_ports(objs: tuple[Obj, ...]) -> None:
    for svc in of_kind(objs, "Service"):
        selector = svc["spec"]["selector"]
        pods = [w for w in workloads(objs)
                if matches(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert pods, f"Service {svc['metadata']['name']} selects no pod template"
        for w in pods:
            ports = {n: p for c in all_containers(w) for n, p in container_ports(c).items()}
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in ports or target in ports.values(), (
                    svc["metadata"]["name"], target)


def test_workload_selectors_match_their_templates(objs: tuple[Obj, ...]) -> None:
    for w in workloads(objs):
        assert matches(w["spec"]["selector"]["matchLabels"],
                       w["spec"]["template"]["metadata"]["labels"]), w["metadata"]["name"]
        if w["kind"] == "StatefulSet":
            named(objs, "Service", w["spec"]["serviceName"])
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert [w for w in workloads(objs)
                if matches(pdb["spec"]["selector"]["matchLabels"],
                           w["spec"]["template"]["metadata"]["labels"])], pdb["metadata"]["name"]


def test_volumes_refer_to_what_exists(objs: tuple[Obj, ...]) -> None:
    claims = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    for w in workloads(objs):
        spec = pod_spec(w)
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in all_containers(w):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, (
                    w["metadata"]["name"], c["name"], mount["name"])
        for v in volumes.values():
            if "configMap" in v:
                config_map(objs, v["configMap"]["name"])
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in v:
                assert v["secret"]["secretName"] in EXTERNAL_SECRETS


def test_service_monitors_scrape_existing_service_ports(objs: tuple[Obj, ...]) -> None:
    services = of_kind(objs, "Service")
    scraped: set[tuple[str, str]] = set()
    for m in of_kind(objs, "ServiceMonitor"):
        selected = [s for s in services
                    if matches(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert selected, f"ServiceMonitor {m['metadata']['name']} selects no Service"
        for s in selected:
            names = {p["name"] for p in s["spec"]["ports"]}
            for ep in m["spec"]["endpoints"]:
                assert ep["port"] in names, (m["metadata"]["name"], s["metadata"]["name"])
                scraped.add((s["metadata"]["name"], ep["port"]))
    # Every metrics port, ingress's API port (its /metrics) and the engines' are scraped, as
    # infra/prometheus/prometheus.yml scrapes every process in docker-compose.yml.
    expected = {(s["metadata"]["name"], p["name"]) for s in services for p in s["spec"]["ports"]
                if p["name"] == "metrics"}
    expected |= {("magnus-ingress", "http"), ("magnus-gpu", "engine")}
    assert expected <= scraped


def test_ingress_metrics_are_scraped_with_an_admin_key(objs: tuple[Obj, ...]) -> None:
    """Ingress has API keys in a pod, and its /metrics needs an admin tenant's: the monitor
    sends one from a Secret, as infra/prometheus/prometheus.yml does from a file."""
    monitor = named(objs, "ServiceMonitor", "magnus-ingress")
    (endpoint,) = [ep for ep in monitor["spec"]["endpoints"] if ep["port"] == "http"]
    assert endpoint["authorization"]["credentials"]["name"] == "magnus-metrics-key"


# --- autoscaling -------------------------------------------------------------------------------
def test_gpu_autoscaler_reads_exported_metrics_and_scales_the_gpu_pods(
        objs: tuple[Obj, ...]) -> None:
    (so,) = of_kind(objs, "ScaledObject")
    ref = so["spec"]["scaleTargetRef"]
    target = named(objs, ref["kind"], ref["name"])
    assert ref["apiVersion"] == target["apiVersion"]
    assert any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
               for c in all_containers(target)), "the ScaledObject must scale the GPU pods"
    # KEDA owns the count: a replicas field would be reset by every `kubectl apply`.
    assert "replicas" not in target["spec"]
    for trigger in so["spec"]["triggers"]:
        names = set(re.findall(r"\bmagnus_[a-z_]+", trigger["metadata"]["query"]))
        assert names and names <= metrics.EXPORTED_NAMES, names
        # Exported by the schedulers (the leader's gauges), which a ServiceMonitor scrapes.
        assert names <= {"magnus_waiting_requests", "magnus_inflight_requests"}
    assert "magnus-scheduler" in {m["metadata"]["name"] for m in of_kind(objs, "ServiceMonitor")}


def test_ingress_autoscaler_has_cpu_requests_to_scale_on(objs: tuple[Obj, ...]) -> None:
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = named(objs, ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], "the HPA owns the count"
        for metric in hpa["spec"]["metrics"]:
            resource = metric["resource"]["name"]
            assert all(resource in c.get("resources", {}).get("requests", {})
                       for c in pod_spec(target)["containers"]), ref["name"]


# --- the GPU pods ------------------------------------------------------------------------------
def gpu_containers(objs: tuple[Obj, ...]) -> tuple[Obj, Obj, Obj]:
    sts = named(objs, "StatefulSet", "magnus-gpu")
    containers = {c["name"]: c for c in all_containers(sts)}
    return sts, containers["worker"], containers["engine"]


def test_each_gpu_pod_works_its_own_node_queue(objs: tuple[Obj, ...]) -> None:
    sts, worker, _ = gpu_containers(objs)
    assert service_module(worker) == "services.worker.main"
    env_refs = {v["name"]: v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                for v in worker["env"]}
    assert env_refs["MAGNUS_NODE"] == "metadata.name"
    assert env_refs["MAGNUS_GPU"] == f"metadata.labels['{POD_INDEX_LABEL}']"
    assert keys.celery_queue(0, "local") == "local.gpu.0"
    (so,) = of_kind(objs, "ScaledObject")
    for ordinal in range(so["spec"]["maxReplicaCount"]):
        pod = example_pod(sts, ordinal)
        args = argv(objs, worker, pod)
        # <node>.gpu.<gpu id>: what the scheduler sends pod N's batches to.
        assert flag(args, "-Q") == keys.celery_queue(ordinal, pod.name)
        assert flag(args, "-n") == f"gpu{ordinal}@{pod.name}"  # as the launcher names it
        env = container_env(objs, worker, pod)
        assert env["MAGNUS_GPU"] == str(ordinal) and env["MAGNUS_NODE"] == pod.name


def test_worker_pool_matches_the_engine_mode(objs: tuple[Obj, ...]) -> None:
    sts, worker, _ = gpu_containers(objs)
    args = argv(objs, worker, example_pod(sts))
    # As offline/launcher.py's start_worker: static runs one batch at a time.
    if common_env(objs)["MAGNUS_ENGINE_MODE"] == "static":
        assert (flag(args, "--pool"), flag(args, "-c")) == ("solo", "1")
    else:
        assert flag(args, "--pool") == "threads"


def test_engine_serves_what_magnus_asks_for_on_one_gpu(objs: tuple[Obj, ...]) -> None:
    sts, worker, engine = gpu_containers(objs)
    pod = example_pod(sts)
    args = argv(objs, engine, pod)
    env = common_env(objs)
    assert flag(args, "--model") == env["MAGNUS_MODEL_DIR"]
    assert flag(args, "--served-model-name") == env["MAGNUS_SERVED_MODEL_NAME"]
    assert flag(args, "--max-model-len") == env["MAGNUS_MAX_MODEL_LEN"]
    assert "--disable-log-stats" not in args  # the KV budget is read from the engine's metrics
    engine_url = urlsplit(container_env(objs, worker, pod)["MAGNUS_ENGINE_URL"])
    assert engine_url.hostname in {"127.0.0.1", "localhost"}  # the same pod
    assert engine_url.port == int(flag(args, "--port"))
    # The model folder is on a mounted volume of the engine (and of ingress, for the tokenizer).
    assert any(env["MAGNUS_MODEL_DIR"].startswith(m["mountPath"] + "/")
               for m in engine["volumeMounts"])
    limits = engine["resources"]["limits"]
    assert str(limits["nvidia.com/gpu"]) == "1"
    assert "nvidia.com/gpu" not in worker.get("resources", {}).get("limits", {})
    spec = pod_spec(sts)
    assert spec["nodeSelector"] and spec["tolerations"]
    # A native sidecar: up before the worker, down after it (see gpu.yaml).
    assert engine in spec["initContainers"] and engine["restartPolicy"] == "Always"
    assert "startupProbe" in engine


# --- Redis and Sentinel ------------------------------------------------------------------------
def test_redis_url_names_the_sentinel_service_and_its_master(objs: tuple[Obj, ...]) -> None:
    # Parsed as every service parses it (shared/redis_conn.py), so a URL the services would
    # refuse fails here, not in a crash-looping pod.
    url = parse_sentinel_url(common_env(objs)["MAGNUS_REDIS_URL"])
    for host, port in url.sentinels:
        svc = named(objs, "Service", host)
        assert port in {p["port"] for p in svc["spec"]["ports"]}
    scripts = next(c for c in of_kind(objs, "ConfigMap")
                   if c["metadata"]["name"].startswith("magnus-redis-scripts"))
    for script in scripts["data"].values():
        # Every sentinel query and the monitor line name the master Magnus asks for, through
        # the Service the URL names.
        used = re.findall(r"get-master-addr-by-name (\S+)|sentinel monitor (\S+)", script)
        assert used and all(url.master in u for u in used), used
        assert all(f"-h {host} -p {port}" in script for host, port in url.sentinels)
