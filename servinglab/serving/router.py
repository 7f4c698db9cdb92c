"""An OpenAI-compatible router over N backend servers (``servinglab router --backend URL ...``).

The shape of vLLM production-stack's router and SGLang's sgl-router, small: every
``POST /v1/completions`` or ``/v1/chat/completions`` goes to one backend chosen by the
Part 7a balancer (round robin, least outstanding, power of two, cache aware), and the
backend's answer (SSE chunks included) is passed through byte for byte with httpx.

Failover follows one rule: **retry only before the first byte reached the client.** The
router reads the backend's first body chunk before it answers; if the connection fails
before that (refused, reset, the backend died mid-prefill, or it left the pool: a frozen
backend fails its health probes), it marks the backend failed and tries another, so nothing the client saw is ever repeated.
After the first byte the router is committed: a backend that dies or stays silent past the
read timeout mid-stream ends that stream with an OpenAI-style SSE error event and no
``[DONE]`` (the client is told, never handed a spliced or silently truncated answer), and
the request is counted under status 502 (died) or 504 (timed out), never 200.

A client that goes away is never served for nobody: while the router waits for a
non-streaming answer it checks for the disconnect about twice a second and closes the
backend connection, which makes the backend abort the request.

Also served: ``GET /health`` (200 while any backend is in the pool, 503 otherwise, with
each backend's state), ``GET /metrics`` (the router's own Prometheus series, see
``router_state.ROUTER_METRICS``, then every healthy backend's ``vllm:*`` series with a
``backend`` label, as production-stack's router re-exports engine stats) and
``GET /v1/models`` (from the first healthy backend).
Errors the router raises itself use the lab server's OpenAI error body
(``protocol.APIError``); a backend's own 4xx answers pass through unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from servinglab.serving import protocol as P
from servinglab.serving.router_state import RouterState, make_balancer, no_backend_error
from servinglab.serving.upstream import ProxiedResponse, open_upstream, settle, while_connected

FORWARDED_HEADERS = ("authorization", "accept")
DEFAULT_READ_TIMEOUT_S = 60.0


def routing_key(body: dict[str, Any]) -> str | list[int] | None:
    """What ``cache_aware`` matches on: the prompt text (or token ids), or the chat transcript.

    Like sgl-router, text is matched as characters, so the router never tokenizes. A batch
    of prompts is routed by its first one.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if isinstance(m, dict):
                c = m.get("content")
                parts.append(f"{m.get('role', '')}: {c if isinstance(c, str) else json.dumps(c)}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return None


async def proxy(state: RouterState, request: Request, path: str) -> Response:
    """Route one request: pick, send, wait for the first byte, retry elsewhere if it never came."""
    payload = await P.read_json(request, state.max_body_bytes)
    if not isinstance(payload, dict):
        raise P.APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    raw, key = json.dumps(payload).encode(), routing_key(payload)
    headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    headers["content-type"] = "application/json"
    lb, excluded, arrival, no_backend = state.balancer, [], time.perf_counter(), no_backend_error()
    while True:  # at most one attempt per backend: each failure excludes its backend
        try:
            url = lb.select_instance(key, exclude=excluded).url
        except no_backend as exc:
            state.metrics.no_backend.inc()
            raise P.APIError(503, f"no healthy backend to serve this request ({exc})") from None
        lb.start_request(url)
        opened: dict[str, Any] = {}
        try:
            first = await while_connected(request, open_upstream(state, url + path, raw, headers, opened), lb.backend(url))
        except httpx.TransportError:  # nothing has reached the client: another backend may serve it
            await settle(state, url, opened.get("upstream"))
            lb.report_failure(url)
            state.metrics.retries.labels(url).inc()
            excluded.append(url)
            continue
        except BaseException:  # the client went away (cancelled) or a bug: never leak the load
            await settle(state, url, opened.get("upstream"))
            raise
        break
    if first is None:  # the client went away while the backend worked: closing the connection aborts it there
        await settle(state, url, opened.get("upstream"), status="499")
        return Response(status_code=499)
    state.metrics.ttfb.labels(url).observe(time.perf_counter() - arrival)
    return ProxiedResponse(state, url, opened["upstream"], opened["chunks"], first)


def create_router_app(state: RouterState) -> FastAPI:
    """The FastAPI application routing over ``state.balancer``'s backends."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.probe_all()  # know who is up before the first request
        checker = asyncio.create_task(state.health_loop())
        yield
        checker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checker
        await state.client.aclose()

    app = FastAPI(title="servinglab router", lifespan=lifespan)
    app.state.router = state

    P.install_error_handlers(app, "router error")

    @app.get("/health")
    async def health() -> JSONResponse:
        backends = {b.url: {"state": b.state, "load": b.load} for b in state.balancer.instances}
        if not any(b.healthy for b in state.balancer.instances):
            body = P.APIError(503, "no healthy backend").body()
            return JSONResponse({**body, "backends": backends}, status_code=503)
        return JSONResponse({"backends": backends, "probes": state.probes})

    @app.get("/metrics")
    async def metrics() -> Response:
        text = state.metrics.render(state.balancer) + await state.backend_series()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
        for b in [b for b in state.balancer.instances if b.healthy]:
            try:
                r = await state.client.get(f"{b.url}/v1/models", headers=headers, timeout=10)
            except httpx.HTTPError:
                continue
            return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))
        raise P.APIError(503, "no healthy backend to list models")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await proxy(state, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await proxy(state, request, "/v1/chat/completions")

    return app


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    """The ``servinglab router`` options (balancer options keep the balancer's names)."""
    p.add_argument("--backend", action="append", required=True, metavar="URL", help="a backend base URL (repeat for each)")
    p.add_argument("--policy", default="cache_aware", help="round_robin | least_outstanding | power_of_two | cache_aware")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between /health probes of every backend")
    p.add_argument("--failure-threshold", type=int, default=3, help="failures in a row that open a backend's circuit")
    p.add_argument("--recovery-successes", type=int, default=2, help="good probes in a row that bring a backend back")
    p.add_argument("--cooldown", type=float, default=5.0, help="seconds an open circuit ignores good probes")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help="seconds without a byte from a backend, once its response has begun, before the stream ends with an "
                        "error event (a frozen backend); before the first byte a request waits while its backend stays in the pool")
    p.add_argument("--cache-threshold", type=float, default=0.3)
    p.add_argument("--balance-abs-threshold", type=int, default=64)
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument("--max-tree-size", type=int, default=1 << 20, help="characters each backend's prefix tree keeps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-level", default="warning")


def run_router(args: argparse.Namespace) -> int:
    """Build the balancer (bad options exit with its message) and serve with uvicorn."""
    import prometheus_client
    import uvicorn

    prometheus_client.disable_created_metrics()  # no `*_created` series, as the lab server
    if args.port < 1 or args.health_interval <= 0 or args.read_timeout <= 0:
        raise SystemExit(f"error: --port must be >= 1, --health-interval > 0 and --read-timeout > 0, "
                         f"got {args.port}, {args.health_interval}, {args.read_timeout}")
    try:
        balancer = make_balancer(args.backend, args.policy, seed=args.seed, cache_threshold=args.cache_threshold,
                                 balance_abs_threshold=args.balance_abs_threshold, balance_rel_threshold=args.balance_rel_threshold,
                                 max_tree_size=args.max_tree_size, failure_threshold=args.failure_threshold,
                                 recovery_successes=args.recovery_successes, cooldown_s=args.cooldown)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    state = RouterState(balancer, health_interval=args.health_interval, read_timeout=args.read_timeout)
    uvicorn.run(create_router_app(state), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def router_command(backends: list[str], port: int, policy: str, *options: str) -> list[str]:
    """argv that runs the router in a child process (without the full CLI's imports)."""
    return [sys.executable, "-m", "servinglab.serving.router", "--port", str(port), "--policy", policy,
            *[a for url in backends for a in ("--backend", url)], *options]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="servinglab router", description=__doc__.splitlines()[0])
    add_router_arguments(parser)
    raise SystemExit(run_router(parser.parse_args()))
