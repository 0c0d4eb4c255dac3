"""The vLLM engine against a fake OpenAI server (httpx.MockTransport): streamed chat completions,
errors, abort, and the server command the launcher runs. No real engine starts here."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.engine import ENGINES, get_engine
from services.engine.base import (
    ChatRequest,
    Engine,
    EngineAborted,
    EngineError,
    ServerSpec,
    StreamChunk,
)
from services.engine.vllm import VllmEngine, chat_body
from shared.schemas import SamplingParams
from shared.settings import LauncherSettings

Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def sse(*events: object) -> list[bytes]:
    return [f"data: {json.dumps(e)}\n\n".encode() for e in events] + [b"data: [DONE]\n\n"]


def delta(text: str, finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}


def request(rid: str = "r1", continuation: str = "") -> ChatRequest:
    return ChatRequest(request_id=rid, instruction="Be brief.", user_input="hi", max_tokens=8,
                       sampling=SamplingParams(), continuation=continuation)


def client(handler: Handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url="http://engine", transport=httpx.MockTransport(handler))


class FakeServer:
    """Streams `events`, then (if `hang`) holds the connection open until the client leaves."""

    def __init__(self, *events: object, hang: bool = False) -> None:
        self.events, self.hang = events, hang
        self.bodies: list[dict[str, object]] = []
        self.sent = asyncio.Event()
        self.disconnected = asyncio.Event()

    async def __call__(self, req: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(req.content))

        async def body() -> AsyncIterator[bytes]:
            try:
                lines = sse(*self.events)
                for line in lines[:-1] if self.hang else lines:
                    yield line
                self.sent.set()
                if self.hang:
                    await asyncio.Event().wait()  # a long generation, never finishing by itself
            finally:
                self.disconnected.set()

        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body())


def test_generate_collects_a_streamed_completion() -> None:
    server = FakeServer(delta("Hel"), delta("lo", "length"), USAGE)

    async def go() -> None:
        async with client(server) as http:
            out = await VllmEngine().generate(http, "m", request())
        assert (out.text, out.finish_reason) == ("Hello", "length")
        assert (out.prompt_tokens, out.completion_tokens) == (7, 2)
        assert out.first_token_at is not None
        assert out.started_at <= out.first_token_at <= out.finished_at

    asyncio.run(go())
    body = server.bodies[0]
    assert body["stream"] is True and body["model"] == "m" and body["max_tokens"] == 8
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]


def test_a_stream_ending_without_a_finish_reason_is_an_error_not_a_completion() -> None:
    # The engine shut down mid-answer: the stream closes cleanly but never says why it stopped.
    server = FakeServer(delta("Half a sen"), USAGE)

    async def go() -> None:
        async with client(server) as http:
            with pytest.raises(EngineError, match="without a finish reason"):
                await VllmEngine().generate(http, "m", request())

    asyncio.run(go())


def test_ignore_eos_and_priority_are_sent_only_when_set() -> None:
    assert "ignore_eos" not in chat_body("m", request())
    assert "priority" not in chat_body("m", request())  # vLLM refuses it on a FCFS engine
    forced = ChatRequest(request_id="r", instruction="", user_input="hi", max_tokens=8,
                         sampling=SamplingParams(ignore_eos=True), priority=42)
    body = chat_body("m", forced)
    assert body["ignore_eos"] is True and body["priority"] == 42


def test_a_continuation_resumes_the_assistant_turn() -> None:
    server = FakeServer(delta(" more", "stop"), USAGE)

    async def go() -> None:
        async with client(server) as http:
            await VllmEngine().generate(http, "m", request(continuation="so far"))

    asyncio.run(go())
    body = server.bodies[0]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "so far"}  # type: ignore[index]


def test_stream_yields_text_as_it_comes() -> None:
    async def go() -> list[StreamChunk]:
        async with client(FakeServer(delta("a"), delta("b", "stop"), USAGE)) as http:
            return [c async for c in VllmEngine().stream(http, "m", request())]

    chunks = asyncio.run(go())
    assert [c.text for c in chunks] == ["a", "b", ""]
    assert chunks[1].finish_reason == "stop" and chunks[2].completion_tokens == 2


def test_an_engine_refusal_is_an_engine_error() -> None:
    async def refuse(req: httpx.Request) -> httpx.Response:
        return httpx.Response(400, text="max_tokens too large")

    async def go() -> None:
        async with client(refuse) as http:
            await VllmEngine().generate(http, "m", request())

    with pytest.raises(EngineError, match="400: max_tokens too large"):
        asyncio.run(go())


def test_abort_closes_the_connection_and_raises_engine_aborted() -> None:
    server = FakeServer(delta("partial"), hang=True)
    engine = VllmEngine()

    async def go() -> None:
        async with client(server) as http:
            task = asyncio.create_task(engine.generate(http, "m", request("r9")))
            await server.sent.wait()
            # From another thread, as a worker thread other than the loop's would call it.
            assert await asyncio.to_thread(engine.abort, "r9")
            with pytest.raises(EngineAborted, match="r9"):
                await asyncio.wait_for(task, 5)
            await asyncio.wait_for(server.disconnected.wait(), 5)
        assert not engine.abort("r9")  # nothing left in flight

    asyncio.run(go())


def test_abort_of_an_unknown_request_is_false() -> None:
    assert not VllmEngine().abort("nope")


def test_a_reader_that_stops_early_closes_the_connection() -> None:
    server = FakeServer(delta("a"), hang=True)

    async def go() -> None:
        async with client(server) as http:
            stream = VllmEngine().stream(http, "m", request())
            first = await anext(stream)
            assert first.text == "a"
            await stream.aclose()
            await asyncio.wait_for(server.disconnected.wait(), 5)

    asyncio.run(go())


def test_kv_budget_reads_the_metrics_endpoint() -> None:
    metrics = ('vllm:cache_config_info{block_size="16",num_cpu_blocks="None",'
               'num_gpu_blocks="100"} 1.0\n')

    async def serve(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/metrics"
        return httpx.Response(200, text=metrics)

    async def go() -> int | None:
        async with client(serve) as http:
            info = await VllmEngine().kv_budget(http)
        return None if info is None else info.kv_budget_tokens

    assert asyncio.run(go()) == 1600


def test_start_command_is_the_launchers_vllm_server(tmp_path: Path) -> None:
    settings = LauncherSettings(model_dir=tmp_path / "model", engine_base_port=9100,
                                ingress_port=9000, max_model_len=2048, cpu_kvcache_gib=2)
    spec = ServerSpec.from_settings(settings, gpu=1, work_dir=tmp_path / "engine1")
    engine = VllmEngine(python="py")
    cmd = engine.start_command(spec)
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    assert flags["--model"] == str(tmp_path / "model")
    assert flags["--served-model-name"] == settings.served_model_name
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "9101")
    assert (flags["--dtype"], flags["--max-model-len"]) == ("bfloat16", "2048")
    assert "--enforce-eager" in cmd and "--disable-log-stats" not in cmd
    assert "--scheduling-policy" not in cmd and "--num-gpu-blocks-override" not in cmd
    cut = LauncherSettings(model_dir=tmp_path / "model", engine_scheduling_policy="priority",
                           engine_num_gpu_blocks=64)
    cut_cmd = engine.start_command(ServerSpec.from_settings(cut, gpu=0))
    assert cut_cmd[cut_cmd.index("--scheduling-policy") + 1] == "priority"
    assert cut_cmd[cut_cmd.index("--num-gpu-blocks-override") + 1] == "64"
    env = engine.start_env(spec)
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["TMPDIR"] == str(tmp_path / "engine1" / "tmp")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"


def test_registry_gives_one_engine_per_name_and_refuses_unknown_names() -> None:
    engine = get_engine("vllm")
    assert isinstance(engine, Engine) and isinstance(engine, VllmEngine)
    assert get_engine("vllm") is engine  # abort must find what generate started
    with pytest.raises(ValueError, match="unknown engine 'sglang'; known: vllm"):
        get_engine("sglang")
    assert set(ENGINES) == {"vllm"}
