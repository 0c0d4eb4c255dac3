"""A request body's size, limited before anything parses it: pure ASGI middleware (not Starlette's
BaseHTTPMiddleware, which would buffer the body it is meant to refuse).

A body whose `Content-Length` says it is over the limit is refused with 413 before a byte of it is
read. A body without one (chunked) is counted as it streams in: the first piece past the limit
answers 413 and nothing more is read (the app sees the client gone, and whatever it answers to
that is dropped: the 413 is the answer). The connection is closed after the 413, so the unread
rest of the body is never taken for a next request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import metrics


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The `Content-Length` a request declares, or None (absent, or not a number: the server
    refuses a malformed one itself)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def too_large_body(max_bytes: int, openai: bool) -> bytes:
    """The 413's JSON, naming the field `body` as every error of its route names a field:
    OpenAI's shape on OpenAI's routes, FastAPI's on Magnus's own."""
    message = f"body: the request body is larger than {max_bytes} bytes"
    if openai:
        content: dict[str, object] = {"error": {
            "message": message, "type": "invalid_request_error", "param": "body", "code": None}}
    else:
        content = {"message": message, "detail": [{
            "loc": ["body"], "msg": f"the request body is larger than {max_bytes} bytes",
            "type": "value_error"}]}
    return json.dumps(content).encode()


class BodyLimit:
    """Refuses (413) a request whose body is over `max_bytes`, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int, is_openai: Callable[[str], bool]) -> None:
        self.app, self.max_bytes, self.is_openai = app, max_bytes, is_openai

    async def _refuse(self, scope: Scope, send: Send) -> None:
        metrics.REQUESTS_REFUSED.labels(status_code="413").inc()
        body = too_large_body(self.max_bytes, self.is_openai(str(scope.get("path", ""))))
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            # The rest of the body is not read: the connection cannot carry another request.
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope.get("headers", ()))
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, send)
            return
        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(scope, send)
                    # Read no further: to the app, the client is gone.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 was the answer
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            # What the app made of a body cut short (a disconnect) after the 413 was sent.
            if not refused:
                raise
