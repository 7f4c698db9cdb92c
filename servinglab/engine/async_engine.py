"""``SimpleContinuousBatching``: an asyncio front over the lab engine that streams tokens.

The seed guide's ``SimpleContinuousBatching`` (``add_request`` / ``process_batch``)
made real: every caller awaits its own stream while one background loop calls
:meth:`LLMEngine.step`, so requests join and leave the running batch between any two
steps (iteration-level scheduling, Orca OSDI 2022). The engine step runs in a worker
thread, so the event loop stays free to accept requests and send tokens meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from servinglab.engine.engine import LLMEngine
from servinglab.engine.outputs import EngineDeadError, RequestOutput
from servinglab.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)


class SimpleContinuousBatching:
    """Serve many concurrent streams from one engine.

    Example::

        front = SimpleContinuousBatching(engine)
        stream = await front.add_request("Hello", SamplingParams(max_tokens=8))
        async for out in stream:
            print(out.outputs[0].token_ids)
    """

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        engine.isolate_failures = True  # one request's failure must not end its neighbours' streams
        self.dead: BaseException | None = None  # why the background loop stopped, once it has
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # the engine is not thread-safe: one step or mutation at a time
        self.num_steps = 0

    @property
    def num_active(self) -> int:
        return len(self._queues)

    async def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield a snapshot after every step that advances it.

        Raises ``ValueError`` (before yielding) for a request the engine rejects and
        :class:`EngineDeadError` once the loop has died. Closing the iterator early (a client
        that disconnects) aborts the request and frees its blocks.
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {type(self.dead).__name__}: {self.dead}")
        async with self._lock:
            rid = self.engine.add_request(prompt, params, request_id=request_id, stream=True)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[rid] = queue
        self._ensure_loop()
        self._wakeup.set()
        return self._stream(rid, queue)

    async def _stream(self, rid: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                async with self._lock:
                    self.engine.abort_request(rid)

    async def process_batch(self) -> int:
        """Run one engine step and deliver its outputs; return how many requests progressed."""
        async with self._lock:
            outputs = await asyncio.to_thread(self.engine.step)
        self.num_steps += 1
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        failed, self.engine.failed = self.engine.failed, {}
        for rid, exc in failed.items():  # attributed to one request: only its stream ends
            logger.error("request %s failed and was aborted; other requests continue: %s: %s", rid, type(exc).__name__, exc)
            if (queue := self._queues.get(rid)) is not None:
                queue.put_nowait(exc)
        return len(outputs)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._serve_forever()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the loop cannot go on: every stream ends, /health says 503
            self.dead = exc
            logger.critical("the engine loop died: %s: %s", type(exc).__name__, exc)
            for queue in self._queues.values():
                queue.put_nowait(EngineDeadError(f"the engine loop died: {type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise

    async def _serve_forever(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self.process_batch()
            except Exception as exc:  # not attributable to one request: every waiting stream gets it
                logger.error("engine step failed; aborting its %d requests: %s: %s", len(self._queues), type(exc).__name__, exc)
                for queue in self._queues.values():
                    queue.put_nowait(exc)
                async with self._lock:
                    for rid in list(self._queues):
                        self.engine.abort_request(rid)
            await asyncio.sleep(0)  # let streams and new requests run between steps

    async def aclose(self) -> None:
        """Stop the background loop (pending streams are aborted)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
