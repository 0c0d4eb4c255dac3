"""Shared fixtures: a real Redis server per test session on a free port, and a clean db per test.

Tests never use a Redis that happens to run on this machine, and never disturb it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import redis

from offline.launcher import free_port, redis_server_binary
from services.predictor.features import EMBEDDING_DIM, EmbedderConfig, F32Array

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

    from offline.launcher import Stack

StackFactory = Callable[..., "Stack"]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    data_dir: Path = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(data_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on an emptied database, so tests do not see each other's keys."""
    client: redis.Redis = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


# Every stack the session started, in order (stack_factory appends, _stacks_end_with_their_module
# stops those of a module when it ends).
_started_stacks: list[Stack] = []


def _stop_checked(stack: Stack) -> None:
    """Stop a stack and check no process group of it is left."""
    pgids = [c.proc.pid for c in stack.children]
    stack.stop()
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process group {pgid} survived Stack.stop()")


@pytest.fixture(scope="module", autouse=True)
def _stacks_end_with_their_module() -> Iterator[None]:
    """A module's stacks stop when it ends, so later modules (and the browser test) do not run
    beside idle engines, workers and predictors left by earlier ones."""
    first = len(_started_stacks)
    yield
    for stack in _started_stacks[first:]:
        _stop_checked(stack)


@pytest.fixture(scope="session")
def stack_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFactory]:
    """Starts whole stacks (Redis, engines, workers, predictor, scheduler, ingress) on free ports;
    each is stopped, and checked to leave no process, when its module ends (and again, a no-op,
    at the end of the session)."""
    from offline.launcher import Stack
    from shared.settings import LauncherSettings

    started = _started_stacks

    def make(model_dir: Path, gpus: int = 1, service_env: dict[str, str] | None = None,
             **settings: object) -> Stack:
        ingress_port, engine_port = free_port(), free_port()
        while engine_port in range(ingress_port - gpus, ingress_port + 1):
            engine_port = free_port()
        launcher_settings = LauncherSettings(
            redis_url=None, model_dir=model_dir, gpus=gpus, ingress_port=ingress_port,
            engine_base_port=engine_port, run_dir=tmp_path_factory.mktemp("stack"),
            metrics_base_port=0,
            **settings,  # type: ignore[arg-type]
        )
        stack = Stack(launcher_settings, service_env=dict(service_env or {}))
        started.append(stack)
        stack.start()
        return stack

    yield make
    for stack in started:
        _stop_checked(stack)


# Debian's chromium and its driver (scripts/setup.sh installs both).
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture()
def headless_chromium(tmp_path: Path) -> Iterator[WebDriver]:
    """A real headless chromium driven through its chromedriver. Missing, it fails the test
    (never a skip): the status page is only shown to work in a real browser."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, (f"{missing} not installed: `make setup` installs Debian's chromium and "
                         "chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars", "--window-size=1280,1500", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    # An explicit driver: Selenium Manager would otherwise try to download one. Its log says
    # why a browser did not start.
    log = tmp_path / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log),
                      service_args=["--verbose"])
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        raise AssertionError(f"chromium did not start: {exc}\nchromedriver log:\n{tail}") from exc
    try:
        yield driver
    finally:
        driver.quit()


class FakeEmbedder:
    """Stands in for the sentence-transformers embedder in predictor tests: a deterministic
    pseudo-random vector per text (same text, same vector), and a count of texts embedded."""

    def __init__(self, config: EmbedderConfig | None = None) -> None:
        self.config = config or EmbedderConfig()
        self.texts = 0

    def encode(self, texts: Sequence[str]) -> F32Array:
        self.texts += len(texts)
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big")
            out[i] = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM)
        return out


class RecordingCelery:
    """Stands in for the Celery producer in scheduler tests: records what would be sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], str]] = []

    def send_task(self, name: str, args: list[str], queue: str) -> None:
        self.sent.append((name, args, queue))


@pytest.fixture()
def recording_celery() -> RecordingCelery:
    return RecordingCelery()


# --- CI guard: the engine tests must run, not be skipped or deselected -------------------------
_engine_outcomes: dict[str, list[str]] = {"passed": [], "skipped": [], "failed": []}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if ("engine" in report.keywords and report.when == "call") or (
            "engine" in report.keywords and report.skipped):
        _engine_outcomes[report.outcome].append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from shared.settings import TestRunSettings

    if not TestRunSettings().ci:
        return
    if _engine_outcomes["skipped"] or not _engine_outcomes["passed"]:
        print(f"\nCI: engine tests must run on the real engine; ran "
              f"{len(_engine_outcomes['passed'])}, skipped {_engine_outcomes['skipped']}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- figures the fault tests report -----------------------------------------------------------
# Requests submitted / completed / lost when a node, a Redis primary... is killed: printed in the
# run's summary (a passing test's own output is captured and never shown).
_reported: list[str] = []
Report = Callable[[str], None]


@pytest.fixture()
def report(request: pytest.FixtureRequest) -> Report:
    def add(line: str) -> None:
        _reported.append(f"{request.node.name}: {line.strip()}")
    return add


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _reported:
        terminalreporter.section("figures the fault tests report")
        for line in _reported:
            terminalreporter.write_line(line)
