"""The OpenAI wire format the lab server speaks: request models, error bodies, response shapes.

Requests are validated with pydantic; anything wrong becomes an :class:`APIError`, which
the server turns into ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status, the shape vLLM's OpenAI server returns (and the ``openai`` client parses).
Unknown fields are ignored, as vLLM does; fields that would change the output but that
the lab engine cannot honour (``logprobs``, ``echo``, penalties, ...) are refused by name
rather than silently dropped.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from servinglab.engine.outputs import CompletionOutput

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error answered to the client with ``status`` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "BadRequestError" if self.status < 500 else "InternalServerError")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat (vLLM's extra sampling fields included)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values: the lab engine has no logprobs or penalties.
    logprobs: bool | int | None = None
    echo: bool = False
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set to a value the lab engine cannot honour, if any."""
        checks = {
            "logprobs": self.logprobs not in (None, False, 0), "echo": self.echo,
            "best_of": self.best_of not in (None, 1), "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias), "tools": bool(self.tools),
        }
        return next((name for name, bad in checks.items() if bad), None)

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of :class:`servinglab.sampling.SamplingParams`."""
        return dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``; like OpenAI (and vLLM), ``max_tokens`` defaults to 16."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``; ``max_tokens`` (or ``max_completion_tokens``) defaults to the room left."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def parse_request(model: type[BaseModel], payload: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err["loc"]]
        param = loc[0] if loc else None  # the top-level field; the message carries the full path
        raise APIError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, kind: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    """The fields every completion object and chunk carries."""
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def completion_choice(index: int, text: str, finish_reason: str | None, stop_reason: int | str | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}


def chat_choice(index: int, out: CompletionOutput) -> dict:
    return {
        "index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
        "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
    }


def chat_delta(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def text_delta(sent: str, text: str, finished: bool, hold: int) -> str:
    """New text to send: while running, hold back an incomplete UTF-8 character (decoded as
    U+FFFD) and the last ``hold`` characters, which may turn out to be the start of a stop string."""
    if not finished:
        text = text.rstrip("\ufffd")
        text = text[: max(len(sent), len(text) - hold)]
    return text[len(sent):] if text.startswith(sent) else ""


def param_of(message: str, fields: set[str]) -> str | None:
    """The request field a ``ValueError`` message starts with (``"top_p must be ..."`` -> ``top_p``)."""
    first = message.split(" ", 1)[0].strip("'`:")
    if first in fields:
        return first
    return "max_tokens" if "max_tokens" in message else "prompt" if message.startswith("prompt") else None


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing oversized (413), non-UTF-8 and malformed (400) bodies."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


class APIKeyMiddleware:
    """Plain ASGI middleware (not ``BaseHTTPMiddleware``, which gets in the way of streaming and
    disconnect detection): like vLLM, only ``/v1`` needs the key; /health and /metrics stay open."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = APIError(401, "Unauthorized: a valid `Authorization: Bearer <key>` header is required").body()
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI, internal_label: str) -> None:
    """Answer every error with an OpenAI-style body and keep serving (the server's and the router's).

    An :class:`APIError` keeps its status; Starlette's own errors (404, 405...) keep
    theirs; anything else is a 500 whose message starts with ``internal_label``.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"{internal_label}: {type(exc).__name__}: {exc}").body(), status_code=500)
