"""Every Redis key and stream name Magnus uses, with the TTLs that belong to them."""

from __future__ import annotations

PREFIX = "magnus"

# Request hashes live a day after they are written so late polls still find them.
REQUEST_TTL_S = 24 * 3600
# A worker that has not beaten for this long is treated as gone.
HEARTBEAT_TTL_S = 15

STREAM_INCOMING = f"{PREFIX}:stream:incoming"
STREAM_PREDICTED = f"{PREFIX}:stream:predicted"
STREAM_COMPLETED = f"{PREFIX}:stream:completed"
# Streams are trimmed approximately to this length; consumers keep up far before it.
STREAM_MAXLEN = 100_000

GROUP_PREDICTOR = "predictor"
GROUP_SCHEDULER = "scheduler"
GROUP_PREDICTOR_TRAINING = "predictor-training"

# The scheduler's waiting pool (sorted by queued time) and its in-flight batches, kept in Redis so a
# restarted scheduler rebuilds its state instead of losing requests.
SCHEDULER_WAITING = f"{PREFIX}:scheduler:waiting"
# Holder of the scheduler leadership lock; it expires (SchedulerSettings.leader_ttl_s) unless
# renewed, so a dead leader is replaced.
SCHEDULER_LEADER = f"{PREFIX}:scheduler:leader"
METRICS = f"{PREFIX}:metrics"
# Fields of the METRICS hash that ingress counts (GET /v1/metrics reports every field).
METRIC_REQUESTS_ACCEPTED = "requests_accepted"
METRIC_REQUESTS_ACCEPTED_UNREPLICATED = "requests_accepted_unreplicated"
METRIC_REQUESTS_CANCELLED = "requests_cancelled"
# The process id of a predictor that has loaded its model and reads the incoming stream, renewed
# while it runs; it expires (HEARTBEAT_TTL_S) when no predictor does.
PREDICTOR_HEARTBEAT = f"{PREFIX}:predictor:heartbeat"
# Every accepted request not yet final (id -> queued time): what backpressure counts, whichever
# stage a request is in (an incoming stream nobody reads still fills it).
OPEN_REQUESTS = f"{PREFIX}:requests:open"
# Per tenant, the same (its open-request limit counts these); kept by the same scripts.
TENANT_OPEN_PREFIX = f"{PREFIX}:tenant-open:"


def tenant_open(tenant: str) -> str:
    return TENANT_OPEN_PREFIX + tenant


def tenant_tokens(tenant: str, minute: int) -> str:
    """Prompt + max tokens a tenant had accepted in one minute (unix time // 60)."""
    return f"{PREFIX}:tenant-tokens:{tenant}:{minute}"


# A minute's token counter is read only during that minute: it expires soon after.
TENANT_TOKENS_TTL_S = 120


# Observed batch records, the serving-time estimator's memory across scheduler restarts.
BATCH_RECORDS = f"{PREFIX}:scheduler:batch-records"
BATCH_RECORDS_MAXLEN = 2000
# Observed (app, input tokens, generated tokens) triples for online predictor training.
TRAINING_LENGTHS = f"{PREFIX}:predictor:lengths"
TRAINING_MAXLEN = 200_000


# Length queries (`POST /v1/predict`) wait here for the predictor, newest at the head; each answer
# goes to its own short-lived list, which ingress pops with a timeout.
PREDICT_QUERIES = f"{PREFIX}:predictor:queries"
PREDICT_QUERIES_MAX = 10_000
PREDICT_ANSWER_TTL_S = 60


def predict_answer(query_id: str) -> str:
    return f"{PREFIX}:predictor:answer:{query_id}"


def request(request_id: str) -> str:
    return f"{PREFIX}:req:{request_id}"


def request_payload(request_id: str) -> str:
    """The full PredictedRequest JSON of a waiting request (the pool rebuilds from these)."""
    return f"{PREFIX}:req:{request_id}:payload"


def request_text(request_id: str) -> str:
    """Stream of the text a streaming request's engine has generated so far, piece by piece
    (`TextDelta`), written by its worker and read by ingress for server-sent events."""
    return f"{PREFIX}:req:{request_id}:text"


# A request's text stream keeps at most about this many pieces (one per token or so).
TEXT_STREAM_MAXLEN = 20_000


# The cluster's GPUs: GPU id (an integer unique across nodes, what every per-GPU key and the
# scheduler's plans use) -> "<node>/<device>", the node that registered it and its device index
# there (shared/state.py: allocate_gpu_id, register_gpu). The scheduler learns GPUs from here and
# their liveness from their heartbeats.
GPU_NODES = f"{PREFIX}:gpus"
# The node name of a one-host stack (`magnus run`, docker-compose.yml).
LOCAL_NODE = "local"
# A node name: what a queue name and a Kubernetes pod name both accept.
NODE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


def gpu_inflight(gpu: int) -> str:
    """Hash of batch id -> Batch JSON dispatched to this GPU and not yet recorded as done."""
    return f"{PREFIX}:gpu:{gpu}:inflight"


def gpu_running(gpu: int) -> str:
    """Hash of batch id -> id of the worker process that started it (written when a worker
    claims a batch still in flight): a batch whose worker is gone is run again, and a batch
    delivered a second time is not."""
    return f"{PREFIX}:gpu:{gpu}:running"


def worker_heartbeat(gpu: int) -> str:
    return f"{PREFIX}:worker:{gpu}:heartbeat"


def celery_queue(gpu: int, node: str = LOCAL_NODE) -> str:
    """The Celery queue of one GPU: named by its node too, so an operator reading the broker sees
    where each queue's worker runs, and a node's queues are told apart from another's."""
    return f"{node}.gpu.{gpu}"
