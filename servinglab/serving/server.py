"""An OpenAI-compatible HTTP server over the lab engine (``servinglab serve MODEL``).

Routes mirror vLLM's OpenAI server: ``POST /v1/completions`` and ``/v1/chat/completions``
(both with SSE streaming, ending in ``data: [DONE]``), ``GET /v1/models``, ``/health`` and
``/metrics`` (Prometheus, vLLM's metric names). Requests join the running batch of one
:class:`~servinglab.async_engine.SimpleContinuousBatching`; past ``max_pending`` queued
requests the server answers 429 instead of queueing without bound.

The routes and request checks live here; driving the engine requests and streaming them
out (``Jobs``, SSE) live in :mod:`servinglab.serving.streaming`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from servinglab.serving import protocol as P
from servinglab.serving.streaming import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PENDING, ServerState, sse_response, start_jobs, stream_chunks
from servinglab.engine.outputs import RequestOutput

if TYPE_CHECKING:  # torch-heavy modules load only when a server starts, not for `servinglab --help`
    from servinglab.engine.sampling import SamplingParams

API_KEY_ENV = "SERVINGLAB_API_KEY"


def _plan(state: ServerState, req: P.SamplingFields, prompts: list[list[int]], max_tokens: int | None, what: str) -> list[SamplingParams]:
    """Check lengths against max_model_len (vLLM's wording) and build each prompt's SamplingParams."""
    if (bad := req.unsupported()) is not None:
        raise P.APIError(400, f"{bad} is not supported by the lab server", bad)
    if req.model != state.model_name:
        raise P.APIError(404, f"The model `{req.model}` does not exist.", "model")
    from servinglab.engine.sampling import SamplingParams

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


async def _respond(state: ServerState, request: Request, req: P.SamplingFields, prompts: list[list[int]], max_tokens: int | None, chat: bool) -> Response:
    what = "messages" if chat else "prompt"
    params = _plan(state, req, prompts, max_tokens, what)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    jobs = await start_jobs(state, prompts, params, rid)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        hold = max((len(s) for s in params[0].stop), default=1) - 1
        return sse_response(stream_chunks(jobs, rid, req.model, req.n, chat, include, hold), jobs)
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


def _token_ids(raw: list[str | list[int]], tokenizer, vocab: int) -> list[list[int]]:
    """Each prompt's token ids (text is tokenized; ids are checked against the vocabulary)."""
    prompts = [p if isinstance(p, list) else tokenizer(p)["input_ids"] for p in raw]
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise P.APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
    return prompts


def _chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied, then tokenized (the template already wrote any special tokens)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state.front``."""

    # Tokenizing runs off the event loop (a 1 MB prompt takes about a second, and /health must
    # answer meanwhile), in its own threads: the default pool also runs the engine's steps.
    tokenize_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenize")

    async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.front.aclose()
        tokenize_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="servinglab OpenAI-compatible server", lifespan=lifespan)
    app.state.serving = state
    tokenizer = state.engine.tokenizer

    P.install_error_handlers(app, "internal error")

    if state.api_key:
        app.add_middleware(P.APIKeyMiddleware, api_key=state.api_key)

    @app.get("/health")
    async def health() -> Response:
        if (dead := getattr(state.front, "dead", None)) is not None:  # as vLLM: the process is up, its engine is not
            return JSONResponse(P.APIError(503, f"the engine loop has died: {dead!r}").body(), status_code=503)
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
        prompts = await off_loop(_token_ids, raw, tokenizer, state.engine.hf_config.vocab_size)
        return await _respond(state, request, req, prompts, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = P.parse_request(P.ChatCompletionRequest, await P.read_json(request, state.max_body_bytes))
        if getattr(tokenizer, "chat_template", None) is None:
            raise P.APIError(400, "this model has no chat template: use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await off_loop(_chat_ids, tokenizer, messages)
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
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="overlap scheduling: prepare the next step while the GPU runs this one (vLLM's flag; "
                        "default: on for CUDA where supported, off on the CPU)")


def serve(args: argparse.Namespace) -> int:
    """Build the engine (before listening, so /health answers only when it is ready) and run uvicorn."""
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # no `*_created` series, as vLLM's server (process-wide)

    from servinglab.engine.async_engine import SimpleContinuousBatching
    from servinglab.engine.config import EngineConfig
    from servinglab.engine.engine import LLMEngine
    from servinglab.model.prepare import require_model

    for name in ("port", "max_pending", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = str(args.model or require_model())
    config = EngineConfig(model=model, dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks, block_size=args.block_size,
                          async_scheduling=args.async_scheduling)
    name = args.served_model_name or (str(args.model) if args.model else Path(model).name)
    state = ServerState(SimpleContinuousBatching(LLMEngine(config)), name,
                        api_key=args.api_key or None, max_pending=args.max_pending, max_body_bytes=args.max_body_bytes)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0
