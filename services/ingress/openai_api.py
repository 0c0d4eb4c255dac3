"""The OpenAI-compatible routes, for clients that speak OpenAI's API (the official client,
LangChain, `vllm bench serve`):

    POST /v1/chat/completions    chat; `stream: true` answers with server-sent events
    POST /v1/completions         text completion, the same way
    GET  /v1/models              the served model

Magnus serves each request as an app-level instruction plus a user's input: a chat's system (or
developer) messages are the instruction, its last user message the input, and `model` names the
app (so the predictor learns per app). A completion's prompt is the input with no instruction, run
through the model's chat template like every request. Only `n` = 1 is served (a 422 otherwise).
Every error of these routes has OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Streaming: the worker writes the text as the engine generates it to the request's text stream
(keys.request_text); the route forwards each new piece as a chunk, and when the request is final
it sends what the stream missed from the final result, the finish reason, the usage if asked
(`stream_options.include_usage`) and `data: [DONE]`. The result is the record: a piece lost to a
Redis blip is sent from it. If a run fails after some text was sent and the request runs again
(its engine died), the rerun generates a different text: the stream then ends with an error
event naming the request, whose final answer stays readable at GET /v1/requests/{id}. A client
that hangs up cancels its request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # vLLM's extension (what `vllm bench serve --ignore-eos` sends): generate exactly the token
    # budget. Benchmark-only, so an admin key's (403 otherwise), as on /v1/requests.
    ignore_eos: bool = False


class ChatCompletionRequest(_OpenAIRequest):
    """The part of OpenAI's chat request Magnus serves (other fields are ignored)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_OpenAIRequest):
    """The part of OpenAI's completion request Magnus serves (other fields are ignored)."""

    prompt: str | list[str]


# Where a submit field comes from in an OpenAI request: errors name the field the client sent.
_OPENAI_FIELD = {"instruction": "messages", "app_id": "model", "user_id": "user"}


def _submit_body(body: _OpenAIRequest, instruction: str, user_input: str, input_field: str,
                 max_tokens: int) -> SubmitRequest:
    if body.n != 1:
        raise ApiError(422, "n", "only n=1 is served")
    try:
        return SubmitRequest(
            app_id=body.model if valid_id(body.model) else "openai",
            instruction=instruction, input=user_input,
            user_id=body.user if body.user and valid_id(body.user) else "anonymous",
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            ignore_eos=body.ignore_eos,
        )
    except ValidationError as exc:  # e.g. a system prompt over the instruction limit
        first = exc.errors()[0]
        submit_field = str(first["loc"][0]) if first["loc"] else "body"
        field = input_field if submit_field == "input" else submit_field
        raise ApiError(422, _OPENAI_FIELD.get(field, field), str(first["msg"])) from None


def chat_submit_body(body: ChatCompletionRequest) -> SubmitRequest:
    """The submit body a chat request maps to; `ApiError` naming the chat field that does not
    fit."""
    users = [m.text() for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "messages", "messages must contain a user message")
    if not users[-1].strip():
        raise ApiError(422, "messages", "the last user message must contain non-whitespace text")
    instruction = "\n".join(m.text() for m in body.messages if m.role in ("system", "developer"))
    return _submit_body(body, instruction, users[-1], "messages",
                        body.max_completion_tokens or body.max_tokens or 256)


def completion_submit_body(body: CompletionRequest) -> SubmitRequest:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(422, "prompt", "exactly one prompt is served per request")
    if not prompts[0].strip():
        raise ApiError(422, "prompt", "prompt must contain non-whitespace text")
    # OpenAI's default for completions is 16 tokens.
    return _submit_body(body, "", prompts[0], "prompt", body.max_tokens or 16)


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
    while True:
        view = await _view(ingress, req.request_id)
        if view is not None and view.is_final:
            return view
        if await request.is_disconnected():
            # Nobody is listening: the answer would go nowhere, so the request is cancelled
            # (its generation aborted if it runs).
            await asyncio.to_thread(cancel_request, ingress, req.request_id,
                                    "the client disconnected")
            return openai_error(499, f"client disconnected; request {req.request_id} cancelled")
        if time.monotonic() > deadline:
            return openai_error(
                504, f"no answer within {ingress.settings.chat_timeout_s:g} s; request "
                f"{req.request_id} continues: GET /v1/requests/{req.request_id}",
                code="timeout")
        await asyncio.sleep(0.05)


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
                return
    finally:
        if not finished:
            # The client hung up (the server cancels this generator): the answer would go
            # nowhere, so its request is cancelled and its generation aborted. Shielded: this
            # task is being cancelled, and an unshielded await would be cancelled too.
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
