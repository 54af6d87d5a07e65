"""`--api-key`: every /v1 route needs `Authorization: Bearer <key>`; /health, /metrics and /version
stay open so probes and Prometheus need no secret. A plain ASGI middleware, so it answers before
the body is parsed (a bad key is a 401 even when the JSON is malformed too)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

PROTECTED_PREFIX = "/v1"


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization")
        if given is not None and hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "Missing API key" if given is None else "Incorrect API key provided"
        response = error_response(
            401, f"{message}: send `Authorization: Bearer <key>` with the server's --api-key."
        )
        await response(scope, receive, send)
