"""An OpenAI-compatible HTTP server over the lab engine (``servinglab serve MODEL``).

Routes mirror vLLM's OpenAI server: ``POST /v1/completions`` and ``/v1/chat/completions``
(both with SSE streaming, ending in ``data: [DONE]``), ``GET /v1/models``, ``/health`` and
``/metrics`` (Prometheus, vLLM's metric names). Requests join the running batch of one
:class:`~servinglab.async_engine.SimpleContinuousBatching`; past ``max_pending`` queued
requests the server answers 429 instead of queueing without bound.

Every engine request is driven by its own asyncio task (:class:`Jobs`), not by the HTTP
handler: when a client disconnects, the framework cancels the handler in a way that would
also cancel any clean-up it awaits, so the handler only *cancels the task*, and the task's
own clean-up (abort the request, free its blocks) runs to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from servinglab import protocol as P
from servinglab.metrics import ServerMetrics
from servinglab.outputs import RequestOutput

if TYPE_CHECKING:  # torch-heavy modules load only when a server starts, not for `servinglab --help`
    from servinglab.async_engine import SimpleContinuousBatching
    from servinglab.sampling import SamplingParams

DEFAULT_MAX_PENDING = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits max_model_len
API_KEY_ENV = "SERVINGLAB_API_KEY"


@dataclass
class ServerState:
    """What the routes share: the engine front, limits and metrics."""

    front: SimpleContinuousBatching
    model_name: str
    api_key: str | None = None
    max_pending: int = DEFAULT_MAX_PENDING
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: ServerMetrics = field(init=False)
    admitting: int = 0  # requests handed to the engine whose add_request has not returned yet
    tasks: set[asyncio.Task] = field(default_factory=set)  # strong refs: the loop keeps only weak ones

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.model_name)

    @property
    def engine(self):
        return self.front.engine

    def num_pending(self) -> int:
        """Requests queued but not yet running (the bounded queue)."""
        return len(self.engine.scheduler.waiting) + self.admitting


class Jobs:
    """The engine requests of one HTTP request (one per prompt), merged into one output queue."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: list[SamplingParams], rid: str) -> None:
        self.state, self.n = state, len(prompts)
        self.queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.admitted = [loop.create_future() for _ in prompts]
        state.admitting += len(prompts)
        self.tasks = [loop.create_task(self._pump(i, p, sp, f"{rid}-{i}")) for i, (p, sp) in enumerate(zip(prompts, params))]
        for task in self.tasks:
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

    async def _pump(self, index: int, prompt: list[int], params: SamplingParams, rid: str) -> None:
        state, finished, admitted = self.state, False, self.admitted[index]
        try:
            stream = await state.front.add_request(prompt, params, rid)
        except Exception as exc:  # the engine refused it (ValueError): the handler answers 400
            if not admitted.done():
                admitted.set_exception(exc)
            return
        finally:
            state.admitting -= 1
        if not admitted.done():
            admitted.set_result(None)
        try:
            async for out in stream:
                if out.finished:
                    finished = True
                    state.metrics.observe_finished(out)
                self.queue.put_nowait((index, out))
        except Exception as exc:  # an engine failure: report it to the handler, keep serving
            self.queue.put_nowait((index, exc))
        finally:
            if not finished:
                state.metrics.observe_aborted(params.n)

    async def wait_admitted(self) -> None:
        """Raise the first admission error (a ``ValueError`` from the engine), cancelling the rest."""
        results = await asyncio.gather(*self.admitted, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.cancel()
            raise errors[0]

    async def outputs(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt index, snapshot)`` until every prompt finished; check ``disconnected``
        about twice a second (a non-streaming client that went away stops its requests)."""
        done, next_check = 0, time.monotonic() + 0.5
        while done < self.n:
            try:
                index, item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except TimeoutError:
                index, item = -1, None
            if disconnected is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.5
                if await disconnected():
                    self.cancel()
                    return
            if item is None:
                continue
            if isinstance(item, BaseException):
                raise item
            done += item.finished
            yield index, item

    def cancel(self) -> None:
        """Abort every unfinished request: the tasks' clean-up frees their KV blocks."""
        for task in self.tasks:
            task.cancel()


def _plan(state: ServerState, req: P.SamplingFields, prompts: list[list[int]], max_tokens: int | None, what: str) -> list[SamplingParams]:
    """Check lengths against max_model_len (vLLM's wording) and build each prompt's SamplingParams."""
    if (bad := req.unsupported()) is not None:
        raise P.APIError(400, f"{bad} is not supported by the lab server", bad)
    if req.model != state.model_name:
        raise P.APIError(404, f"The model `{req.model}` does not exist.", "model")
    from servinglab.sampling import SamplingParams

    limit, params = state.engine.max_model_len, []
    for ids in prompts:
        if not ids:
            raise P.APIError(400, f"{what} must contain at least one token", what)
        if len(ids) >= limit:
            raise P.APIError(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                             f"{len(ids)} input tokens. Please reduce the length of the input.", what)
        if max_tokens is not None and max_tokens > 0 and len(ids) + max_tokens > limit:
            raise P.APIError(400, f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is {limit} "
                             f"tokens and your request has {len(ids)} input tokens ({max_tokens} > {limit} - {len(ids)}).", "max_tokens")
        try:
            params.append(SamplingParams(**req.sampling_kwargs(max_tokens if max_tokens is not None else limit - len(ids))))
        except ValueError as exc:
            raise P.APIError(400, str(exc), P.param_of(str(exc), set(type(req).model_fields))) from None
    return params


async def _start(state: ServerState, prompts: list[list[int]], params: list[SamplingParams], rid: str) -> Jobs:
    if state.num_pending() + len(prompts) > state.max_pending:
        raise P.APIError(429, f"the server's queue is full ({state.max_pending} pending requests): retry later")
    jobs = Jobs(state, prompts, params, rid)
    try:
        await jobs.wait_admitted()
    except ValueError as exc:
        raise P.APIError(400, str(exc), P.param_of(str(exc), set())) from None
    except BaseException:  # the handler itself was cancelled (client gone): do not leave orphans running
        jobs.cancel()
        raise
    return jobs


def _sse(chunks: AsyncIterator[dict], jobs: Jobs) -> EventSourceResponse:
    """Serialize chunks as SSE events; an engine error becomes an error event; always end with [DONE]."""

    async def events() -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk)}
        except Exception as exc:
            yield {"data": json.dumps(P.APIError(500, f"engine error: {exc}").body())}
        finally:
            jobs.cancel()  # no-op for finished requests; aborts them if the client went away
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), sep="\n")


async def _stream_chunks(jobs: Jobs, rid: str, model: str, n: int, chat: bool, include_usage: bool, hold: int) -> AsyncIterator[dict]:
    """OpenAI chunks from engine snapshots: text deltas per choice, a final usage chunk if asked."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent: dict[int, str] = {}
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[int, int] = {}
    async for index, out in jobs.outputs():
        prompt_tokens[index] = len(out.prompt_token_ids)
        for c in out.outputs:
            choice = index * n + c.index
            completion_tokens[choice] = len(c.token_ids)
            if chat and choice not in sent:
                yield P.envelope(rid, kind, model, [P.chat_delta(choice, {"role": "assistant", "content": ""})])
            before = sent.get(choice, "")
            delta = P.text_delta(before, c.text, c.finished, hold)
            sent[choice] = before + delta
            if delta or c.finished:
                body = P.chat_delta(choice, {"content": delta} if delta else {}, c.finish_reason) if chat else \
                    P.completion_choice(choice, delta, c.finish_reason, c.stop_reason)
                yield P.envelope(rid, kind, model, [body])
    if include_usage:
        yield P.envelope(rid, kind, model, [], usage=P.usage(sum(prompt_tokens.values()), sum(completion_tokens.values())))


async def _respond(state: ServerState, request: Request, req: P.SamplingFields, prompts: list[list[int]], max_tokens: int | None, chat: bool) -> Response:
    what = "messages" if chat else "prompt"
    params = _plan(state, req, prompts, max_tokens, what)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    jobs = await _start(state, prompts, params, rid)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        hold = max((len(s) for s in params[0].stop), default=1) - 1
        return _sse(_stream_chunks(jobs, rid, req.model, req.n, chat, include, hold), jobs)
    final: dict[int, RequestOutput] = {}
    try:
        async for index, out in jobs.outputs(request.is_disconnected):
            if out.finished:
                final[index] = out
    except Exception as exc:
        raise P.APIError(500, f"engine error: {exc}") from None
    finally:
        jobs.cancel()
    if len(final) < len(prompts):  # the client went away: nobody reads this
        return Response(status_code=499)
    choices, n_out = [], 0
    for index in sorted(final):
        for c in final[index].outputs:
            n_out += len(c.token_ids)
            i = index * req.n + c.index
            choices.append(P.chat_choice(i, c) if chat else P.completion_choice(i, c.text, c.finish_reason, c.stop_reason))
    n_in = sum(len(o.prompt_token_ids) for o in final.values())
    kind = "chat.completion" if chat else "text_completion"
    return JSONResponse(P.envelope(rid, kind, req.model, choices, usage=P.usage(n_in, n_out)))


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state.front``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.front.aclose()

    app = FastAPI(title="servinglab OpenAI-compatible server", lifespan=lifespan)
    app.state.serving = state
    tokenizer = state.engine.tokenizer

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(P.APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(P.APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    if state.api_key:
        app.add_middleware(P.APIKeyMiddleware, api_key=state.api_key)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": state.model_name, "object": "model", "created": 0, "owned_by": "servinglab",
                "root": state.engine.config.model, "parent": None, "max_model_len": state.engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = P.parse_request(P.CompletionRequest, await P.read_json(request, state.max_body_bytes))
        raw = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) else [req.prompt]
        if not raw:
            raise P.APIError(400, "prompt must not be empty", "prompt")
        prompts = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in raw]
        vocab = state.engine.hf_config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise P.APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return await _respond(state, request, req, prompts, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = P.parse_request(P.ChatCompletionRequest, await P.read_json(request, state.max_body_bytes))
        if getattr(tokenizer, "chat_template", None) is None:
            raise P.APIError(400, "this model has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template already wrote any special tokens
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await _respond(state, request, req, [ids], max_tokens, chat=True)

    return app


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """``servinglab serve`` options: server settings, then vLLM-named engine settings."""
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the prepared SmolLM2)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this bearer key on /v1 (or ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: MODEL)")
    p.add_argument("--max-pending", type=int, default=DEFAULT_MAX_PENDING, help="queued requests before answering 429")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body (413 past it)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)


def serve(args: argparse.Namespace) -> int:
    """Build the engine (before listening, so /health answers only when it is ready) and run uvicorn."""
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # no `*_created` series, as vLLM's server (process-wide)

    from servinglab.async_engine import SimpleContinuousBatching
    from servinglab.config import EngineConfig
    from servinglab.engine import LLMEngine
    from servinglab.model_prep import require_model

    for name in ("port", "max_pending", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = str(args.model or require_model())
    config = EngineConfig(model=model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks, block_size=args.block_size)
    name = args.served_model_name or (str(args.model) if args.model else Path(model).name)
    state = ServerState(SimpleContinuousBatching(LLMEngine(config)), name,
                        api_key=args.api_key or None, max_pending=args.max_pending, max_body_bytes=args.max_body_bytes)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0
