"""Every Prometheus metric Magnus exports, named in one place (the Grafana dashboard's queries are
checked against these names).

Each service process keeps its own registry and serves it: ingress at `GET /metrics` on its API
port, the predictor, the schedulers and the workers on `MAGNUS_METRICS_PORT` (the launcher gives
each its own; compose uses 9100 in every container). Prometheus sums across processes, so a
counter is incremented where the event happens (a request is accepted by ingress, finished by a
worker, failed by the scheduler, cancelled by ingress), and a gauge is set by the one process that
knows it (the leading scheduler; a standby reports 0). When ingress runs several processes
(`PROMETHEUS_MULTIPROC_DIR` set), its /metrics aggregates them through prometheus-client's
multiprocess collector.

Request counters carry the tenant (shared/tenants.py) and the app.
"""

from __future__ import annotations

import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

from shared.schemas import RequestStatus

log = logging.getLogger(__name__)

# Seconds from ~10 ms to ~30 min: a tiny model's token on CPU to a deep queue's wait.
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 1800)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
# Signed: a prediction too long is positive, too short negative.
_TOKEN_ERROR = (-512, -256, -128, -64, -32, -16, -8, 0, 8, 16, 32, 64, 128, 256, 512)
_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS_ACCEPTED = Counter(
    "magnus_requests_accepted", "Requests accepted (202, or an OpenAI call queued)",
    ["tenant", "app"])
REQUESTS_REFUSED = Counter(
    "magnus_requests_refused", "Requests refused before the queue, by HTTP status",
    ["status_code"])
REQUESTS_FINISHED = Counter(
    "magnus_requests_finished", "Requests that reached a final status",
    ["status", "tenant", "app"])
REQUEST_RERUNS = Counter(
    "magnus_request_reruns", "Runs lost (worker or engine died) and run again, or batches "
    "never started on a silent GPU (cause=stranded) planned again", ["cause"])
QUEUE_WAIT = Histogram(
    "magnus_queue_wait_seconds", "From acceptance to the start of the request's last run",
    ["gpu"], buckets=_SECONDS)
TIME_TO_FIRST_TOKEN = Histogram(
    "magnus_time_to_first_token_seconds", "From acceptance to the first generated token",
    ["gpu"], buckets=_SECONDS)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "magnus_time_per_output_token_seconds", "Decode time per token after the first",
    ["gpu"], buckets=_PER_TOKEN)
REQUEST_LATENCY = Histogram(
    "magnus_request_latency_seconds", "End to end: from acceptance to the final token",
    ["gpu"], buckets=_SECONDS)
PREDICTION_ERROR = Histogram(
    "magnus_prediction_error_tokens", "Predicted minus generated tokens of a finished request",
    ["app"], buckets=_TOKEN_ERROR)
BATCH_SIZE = Histogram(
    "magnus_batch_size", "Requests per batch a worker ran", ["gpu"], buckets=_BATCH_SIZES)
BATCH_DURATION = Histogram(
    "magnus_batch_duration_seconds", "Wall time of a batch on its worker", ["gpu"],
    buckets=_SECONDS)
PREDICTIONS = Counter(
    "magnus_predictions", "Length predictions made, by predictor source", ["source"])
PREDICTION_DURATION = Histogram(
    "magnus_prediction_duration_seconds", "Time to annotate one read of the incoming stream",
    buckets=_SECONDS)
WAITING_REQUESTS = Gauge(
    "magnus_waiting_requests", "Requests in the scheduler's waiting pool (leader only)")
INFLIGHT_REQUESTS = Gauge(
    "magnus_inflight_requests", "Requests dispatched to a GPU and not finished", ["gpu"])
KV_RESERVED_TOKENS = Gauge(
    "magnus_kv_reserved_tokens", "KV-cache tokens the scheduler holds for in-flight requests",
    ["gpu"])
KV_BUDGET_TOKENS = Gauge(
    "magnus_kv_budget_tokens", "KV-cache tokens the GPU's engine has (from its heartbeat)",
    ["gpu"])
SCHEDULER_LEADING = Gauge(
    "magnus_scheduler_leading", "1 while this scheduler holds the leader lock")

# Family names (a counter's samples add `_total`, a histogram's `_bucket`, `_sum`, `_count`).
EXPORTED_NAMES = frozenset(next(iter(m.describe())).name for m in (
    REQUESTS_ACCEPTED, REQUESTS_REFUSED, REQUESTS_FINISHED, REQUEST_RERUNS, QUEUE_WAIT,
    TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN, REQUEST_LATENCY, PREDICTION_ERROR, BATCH_SIZE,
    BATCH_DURATION, PREDICTIONS, PREDICTION_DURATION, WAITING_REQUESTS, INFLIGHT_REQUESTS,
    KV_RESERVED_TOKENS, KV_BUDGET_TOKENS, SCHEDULER_LEADING))

# The vLLM engine's own metrics the dashboard reads (Prometheus scrapes the engines directly).
VLLM_METRICS_READ = frozenset({"vllm:num_requests_running", "vllm:num_requests_waiting",
                               "vllm:kv_cache_usage_perc"})


def finished(status: RequestStatus, tenant: str, app: str) -> None:
    REQUESTS_FINISHED.labels(status=status.value, tenant=tenant, app=app).inc()


def serve(port: int | None, host: str = "127.0.0.1") -> bool:
    """Serve this process's metrics on `host`:`port` (a background thread); nothing when port
    is None. A port already taken (another exporter on the host) is logged, not fatal: a
    service must not die, and be restarted in a loop, for its metrics."""
    if port is None:
        return False
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.error("metrics not served: %s:%d: %s (set MAGNUS_METRICS_BASE_PORT)", host, port,
                  exc)
        return False
    log.info("metrics on %s:%d/metrics", host, port)
    return True


def render(multiproc_dir: str | None) -> tuple[bytes, str]:
    """The exposition text of this process's registry, or of every process writing to
    `multiproc_dir` (prometheus-client's multiprocess mode)."""
    if multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
