"""Every failure leaves the server as OpenAI's error body, `{"error": {message, type, param, code}}`,
so clients built for OpenAI or vLLM can read it; nothing reaches the client as FastAPI's own shapes."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import RequestError

# vLLM names the error type after the OpenAI SDK exception the status maps to.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "TimeoutError",
}


class APIError(Exception):
    """A request the server answers with an error status; `param` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = status if code is None else code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """`code` is the HTTP status unless a more specific one exists (e.g. context_length_exceeded)."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "APIError"),
            "param": param,
            "code": status if code is None else code,
        }
    }


class ErrorResponse(JSONResponse):
    """JSON in ASCII: a message may quote the request (an unknown `model`), whose JSON can carry a
    lone surrogate ("\\ud800") that UTF-8 cannot encode, which made the refusal itself a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, message: str, param: str | None = None, code: str | int | None = None
) -> JSONResponse:
    return ErrorResponse(error_body(status, message, param, code), status_code=status)


# What pydantic puts in an error's location for the member of a union that refused the value
# ("literal['none','auto','required']", "dict[str,any]", "NamedToolChoice", "str"): no field.
UNION_MEMBER = re.compile(r".*[\[(].*|[A-Z]\w*|str|int|float|bool")


def field_path(loc: tuple[int | str, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; ("body", "tool_choice",
    "literal['none','auto','required']") -> "tool_choice"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and UNION_MEMBER.fullmatch(part):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """The first pydantic error as (message, param), worded for an API user rather than a developer."""
    if error.get("type") == "json_invalid":
        return f"Malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}", None
    param = field_path(tuple(error.get("loc", ())))
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if param is None and error.get("type") == "missing":
        return "The request has no body: send a JSON object", None
    if param is None:
        return f"Invalid request body: {msg}", None
    return f"{param}: {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        response = error_response(exc.status, exc.message, exc.param, exc.code)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(RequestError)
    async def _engine_refusal(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(400, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 with a list of errors; OpenAI clients expect 400 and one message.
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("Invalid request", None)
        content_type = request.headers.get("content-type", "")
        if param is None and "json" not in content_type:  # `curl -d` sends a form by default
            message = (
                "The request body must be JSON, sent with the header Content-Type: "
                f"application/json (this request's: {content_type or 'none'})"
            )
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__  # FastAPI's own wording ("error parsing the body") says not what
        if isinstance(cause, UnicodeDecodeError):
            return error_response(
                400, f"Malformed JSON body: not valid UTF-8 ({cause.reason} at byte {cause.start})"
            )
        if isinstance(cause, RecursionError):
            return error_response(400, "Malformed JSON body: nested too deeply")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so uvicorn logs the traceback and closes the
        # connection: the header tells a keep-alive client not to send its next request on it.
        response = error_response(500, f"Internal server error: {exc!r}")
        response.headers["connection"] = "close"
        return response
