"""Ingress behind several processes (PROMETHEUS_MULTIPROC_DIR set, as prometheus-client's
multiprocess mode wants): /metrics adds up what every process counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.settings import REPO_ROOT

pytestmark = pytest.mark.integration

COUNT = """
from shared import metrics
for _ in range({n}):
    metrics.REQUESTS_ACCEPTED.labels(tenant="t", app="a").inc()
"""

RENDER = """
import os
from prometheus_client.parser import text_string_to_metric_families
from shared import metrics
body, _ = metrics.render(os.environ["PROMETHEUS_MULTIPROC_DIR"])
total = sum(s.value for f in text_string_to_metric_families(body.decode())
            for s in f.samples if s.name == "magnus_requests_accepted_total")
print(int(total))
"""


def run(code: str, multiproc_dir: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip()


def test_metrics_render_the_sum_of_every_process(tmp_path: Path) -> None:
    for n in (3, 4):  # two ingress processes, each counting its own requests
        run(COUNT.format(n=n), tmp_path)
    assert run(RENDER, tmp_path) == "7"
