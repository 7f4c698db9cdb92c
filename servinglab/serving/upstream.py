"""One backend response on its way through the router: passed on, ended with an error event if
the backend fails or stays silent mid-stream, and accounted for exactly once however it ends.

Two clocks, on purpose: before the first byte a request may wait as long as its backend
stays in the pool (a busy backend queues it; a frozen one fails its health probes and the
request moves); after it, ``read_timeout`` seconds without a byte end the stream.

Used by :mod:`servinglab.serving.router` (the routes and the failover loop live there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse

from servinglab.serving import protocol as P
from servinglab.serving.router_state import RouterState

DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks for its client


def complete_events(buffer: bytes) -> int:
    """Length of the prefix of ``buffer`` made of whole SSE events (each ends in a blank line)."""
    return max(buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0, buffer.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in buffer else 0)


def error_event(status: int, message: str) -> bytes:
    """An SSE event carrying an OpenAI-style error body (what vLLM sends when a stream fails)."""
    return b"data: " + json.dumps(P.APIError(status, message).body()).encode() + b"\n\n"


class ProxiedResponse(StreamingResponse):
    """A streamed backend response whose accounting is settled exactly once, however it ends
    (finished, backend died or went silent, client went away before or during the body).

    An event stream is passed on in whole events, so that when the backend fails mid-event
    the error event the router adds is never glued to half an event.
    """

    def __init__(self, state: RouterState, url: str, upstream: httpx.Response, chunks: Any, first: bytes) -> None:
        self.state, self.url, self.upstream, self.settled = state, url, upstream, False
        self.status = "499"  # until the body ends: a client that leaves first is counted as 499
        sse = (upstream.headers.get("content-type") or "").startswith("text/event-stream")

        async def chained():
            if first:
                yield first
            while True:  # the read timeout counts from here: a queued request may wait long for its first byte
                try:
                    chunk = await asyncio.wait_for(anext(chunks, b""), state.read_timeout)
                except TimeoutError:
                    raise httpx.ReadTimeout(f"no data for {state.read_timeout:g} s") from None
                if not chunk:
                    return
                yield chunk

        async def body():
            pending = b""
            try:
                async for chunk in chained():
                    if sse:  # pass on whole events only; keep the rest of the last one
                        pending += chunk
                        cut = complete_events(pending)
                        chunk, pending = pending[:cut], pending[cut:]
                    if chunk:
                        yield chunk
            except httpx.TransportError as exc:  # died or went silent mid-stream: out of the pool, and tell the client
                state.balancer.report_failure(url)
                timed_out = isinstance(exc, httpx.TimeoutException)
                self.status = "504" if timed_out else "502"
                if not sse:
                    raise
                why = f"no data for {state.read_timeout:g} s" if timed_out else f"{type(exc).__name__}: {exc}"
                yield error_event(int(self.status), f"the backend failed mid-stream ({why}); the response is incomplete")
                return
            if pending:
                yield pending
            self.status = str(upstream.status_code)  # counted before the client can see the end

        super().__init__(body(), status_code=upstream.status_code, media_type=upstream.headers.get("content-type"))

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await settle(self.state, self.url, self.upstream, self, self.status)


async def settle(state: RouterState, url: str, upstream: httpx.Response | None, holder: Any = None, status: str | None = None) -> None:
    """Count the outcome and give the request's load back (synchronously first: a cancelled task
    may not get to await anything), then close the backend connection, which aborts its request
    if unfinished."""
    if holder is not None:
        if holder.settled:
            return
        holder.settled = True
    if status is not None:
        state.metrics.requests.labels(url, status).inc()
    state.balancer.finish_request(url)
    if upstream is not None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await upstream.aclose()


async def open_upstream(state: RouterState, url: str, raw: bytes, headers: dict[str, str], opened: dict[str, Any]) -> bytes:
    """Send the request and read the backend's first body chunk (``b""`` for an empty body).

    The response goes into ``opened["upstream"]`` (and its chunk iterator into
    ``opened["chunks"]``) as soon as its headers arrive, so the caller can close it however
    this ends. A non-streaming answer sends its headers only when it is complete.
    """
    upstream = opened["upstream"] = await state.client.send(state.client.build_request("POST", url, content=raw, headers=headers), stream=True)
    opened["chunks"] = upstream.aiter_raw()
    return await anext(opened["chunks"], b"")


class BackendLeftPool(httpx.TransportError):
    """The backend left the pool (its health probes failed) before sending a byte: try another."""


async def while_connected(request: Request, work: Any, backend: Any) -> Any:
    """Await ``work`` (a coroutine) unless the client goes away first (then cancel it and return
    ``None``) or ``backend`` leaves the pool (then raise :class:`BackendLeftPool`: a frozen
    backend's queued requests move elsewhere). Checked about twice a second, as the lab server
    does for non-streaming requests."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
            if not backend.healthy:
                raise BackendLeftPool(f"{backend.url} left the pool before its first byte")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
