"""Driving engine requests and streaming them out (the server's half that is not routes).

Every engine request is driven by its own asyncio task (:class:`Jobs`), not by the HTTP
handler: when a client disconnects, the framework cancels the handler in a way that would
also cancel any clean-up it awaits, so the handler only *cancels the task*, and the task's
own clean-up (abort the request, free its blocks) runs to the end. :func:`sse_response`
and :func:`stream_chunks` turn engine snapshots into OpenAI's SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sse_starlette.sse import EventSourceResponse

from servinglab.engine.outputs import EngineDeadError, RequestOutput
from servinglab.serving import protocol as P
from servinglab.serving.metrics import ServerMetrics

if TYPE_CHECKING:  # torch-heavy modules load only when a server starts, not for `servinglab --help`
    from servinglab.engine.async_engine import SimpleContinuousBatching
    from servinglab.engine.sampling import SamplingParams

DEFAULT_MAX_PENDING = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt that fits max_model_len


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


async def start_jobs(state: ServerState, prompts: list[list[int]], params: list[SamplingParams], rid: str) -> Jobs:
    """Admit every prompt of one HTTP request (429 past ``max_pending``, 400 for what the engine rejects)."""
    if state.num_pending() + len(prompts) > state.max_pending:
        raise P.APIError(429, f"the server's queue is full ({state.max_pending} pending requests): retry later")
    jobs = Jobs(state, prompts, params, rid)
    try:
        await jobs.wait_admitted()
    except ValueError as exc:
        raise P.APIError(400, str(exc), P.param_of(str(exc), set())) from None
    except EngineDeadError as exc:
        raise P.APIError(503, str(exc)) from None
    except BaseException:  # the handler itself was cancelled (client gone): do not leave orphans running
        jobs.cancel()
        raise
    return jobs


def sse_response(chunks: AsyncIterator[dict], jobs: Jobs) -> EventSourceResponse:
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


async def stream_chunks(jobs: Jobs, rid: str, model: str, n: int, chat: bool, include_usage: bool, hold: int) -> AsyncIterator[dict]:
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
