"""An engine on its own event loop in a daemon thread, usable from any caller's loop.

Part 6's ``vLLMServingEngine`` (and notebooks, where Jupyter already runs a loop) drive
the lab engine's asyncio front or vLLM's ``AsyncLLM`` through these two helpers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from synchronous code, also inside Jupyter (whose thread
    already runs an event loop, where ``asyncio.run`` is refused): then a worker thread runs it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class EngineThread:
    """An event loop in a daemon thread that owns the engine; callers on any loop stream from it.

    Why: ``SimpleContinuousBatching``'s queues and vLLM's ``AsyncLLM`` output task belong to
    the event loop that first used them, while Jupyter, ``asyncio.run`` and :func:`run_sync`
    each bring their own loop. Keeping the engine on one private loop lets every caller use it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serving-engine-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the engine loop and wait for its result (from synchronous code)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def stream(self, make: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
        """Iterate ``make()`` on the engine loop, yielding its items on the caller's loop.

        Closing this early cancels the iteration there and waits until its clean-up (the
        abort) has run, so the caller sees the blocks freed when ``aclose`` returns.
        """
        caller, inbox, end = asyncio.get_running_loop(), asyncio.Queue(), object()
        closed = caller.create_future()
        state: dict[str, Any] = {"task": None, "stop": False}  # touched on the engine loop only

        def send(item: Any) -> None:
            caller.call_soon_threadsafe(inbox.put_nowait, item)

        async def drive() -> None:
            state["task"] = asyncio.current_task()
            try:
                if not state["stop"]:
                    async for item in make():
                        send(item)
                    send(end)
            except Exception as exc:
                send(exc)
            finally:
                caller.call_soon_threadsafe(lambda: closed.done() or closed.set_result(None))

        def cancel() -> None:
            state["stop"] = True
            if state["task"] is not None:
                state["task"].cancel()

        asyncio.run_coroutine_threadsafe(drive(), self.loop)
        try:
            while (item := await inbox.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.loop.call_soon_threadsafe(cancel)  # a no-op when drive() already ended
            await closed

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def shutdown_async_llm(engine: Any, timeout_s: float = 10.0) -> None:
    """Shut vLLM's ``AsyncLLM`` down from the event loop that runs its output task.

    ``AsyncLLM.shutdown`` stops the engine-core process and asks the output task to cancel
    on its own loop; awaiting that task here lets the cancellation finish before the
    loop stops (a task left pending on a stopped loop logs "Event loop is closed" at exit).
    """
    engine.shutdown()
    handler = getattr(engine, "output_handler", None)
    if isinstance(handler, asyncio.Task) and not handler.done():
        await asyncio.wait([handler], timeout=timeout_s)
