"""Part 6: a serving engine with one face over two backends, and how to measure it.

``vLLMServingEngine`` (the course's public class, docs/references.md section 2) runs
either the lab engine (your Parts 1-4 behind
:class:`~servinglab.engine.async_engine.SimpleContinuousBatching`) or the real vLLM
(``AsyncLLM``, its asynchronous engine) behind the same four methods:
``initialize_engine``, ``create_sampling_params``, ``generate_async`` (an async generator
of :class:`StreamEvent`, one per new piece of output) and ``benchmark_performance``.

The latency statistics (TTFT, TPOT, ITL, E2E and their percentiles) are in
:mod:`.serving_stats`; this module re-exports them. They also compute the table of
``servinglab bench serve`` (``servinglab.bench.serve.summarize``). The lab server's
``/metrics`` histograms are ``prometheus_client``'s, not these.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from servinglab.engine.engine_thread import EngineThread, run_sync, shutdown_async_llm

from .serving_stats import PERCENTILES, STATS, RequestTimestamps, compute_latency_stats, percentile

__all__ = ["BACKENDS", "PERCENTILES", "STATS", "EngineThread", "RequestTimestamps", "StreamEvent", "compute_latency_stats",
           "percentile", "run_sync", "vLLMServingEngine"]

BACKENDS = ("lab", "vllm")


class StreamEvent(NamedTuple):
    """One piece of streamed output, as ``generate_async`` yields it."""

    index: int  # which prompt (position in the list given to generate_async)
    text: str  # text new since this prompt's previous event ("" for a model without tokenizer)
    token_ids: list[int]  # token ids new since this prompt's previous event
    timestamp: float  # time.perf_counter() when generate_async received it
    finish_reason: str | None  # "stop" or "length" on the prompt's last event, else None


class vLLMServingEngine:  # noqa: N801 (the course's public name, docs/references.md)
    """One serving API over the lab engine (``backend="lab"``) or the real vLLM (``"vllm"``).

    Args:
        model: a Hugging Face model folder (``servinglab.model_prep.default_model_dir()``).
        config: engine settings. Lab: :class:`~servinglab.config.EngineConfig` fields, plus
            ``model_obj`` / ``hf_config`` / ``tokenizer`` to serve a ready model (then ``model``
            may be None). vLLM: ``vllm.AsyncEngineArgs`` fields (dtype, max_model_len, ...).
        backend: ``"lab"`` or ``"vllm"``.

    Example::

        eng = vLLMServingEngine(str(default_model_dir()), {"max_num_seqs": 32})
        eng.initialize_engine()
        params = eng.create_sampling_params(temperature=0.0, max_tokens=16)
        print(eng.benchmark_performance(["Hello", "The sky is"], num_runs=2, sampling_params=params))
    """

    def __init__(self, model: str | None, config: dict[str, Any] | None = None, backend: str = "lab") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.model, self.config, self.backend = model, dict(config or {}), backend
        self.engine: Any = None  # LLMEngine (lab) or vllm's AsyncLLM
        self.front: Any = None  # SimpleContinuousBatching over the lab engine
        self.runner: EngineThread | None = None
        self._ids = itertools.count()

    def initialize_engine(self) -> None:
        """Build the backend engine and its event-loop thread (idempotent).

        vLLM's ``AsyncLLM`` always runs its engine core in a child process: it refuses to run
        in-process under asyncio (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` does not change that),
        so a script using the vllm backend needs an ``if __name__ == "__main__":`` guard.
        """
        if self.engine is not None:
            return
        if self.backend == "lab":
            from servinglab.engine.async_engine import SimpleContinuousBatching
            from servinglab.engine.config import EngineConfig
            from servinglab.engine.engine import LLMEngine

            cfg = dict(self.config)
            ready = {k: cfg.pop(k) for k in ("model_obj", "hf_config", "tokenizer") if k in cfg}
            self.engine = LLMEngine(EngineConfig(model=self.model, **cfg), model=ready.pop("model_obj", None), **ready)
            self.front = SimpleContinuousBatching(self.engine)
        else:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            defaults = {"dtype": "bfloat16", "max_model_len": 1024, "gpu_memory_utilization": 0.3, "enforce_eager": True, "disable_log_stats": True}
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=self.model, **{**defaults, **self.config}))
        self.runner = EngineThread()

    def shutdown(self) -> None:
        """Stop the engine (vLLM: its engine-core process) and its thread."""
        if self.runner is not None:
            if self.front is not None:
                self.runner.call(self.front.aclose())
            elif self.backend == "vllm" and self.engine is not None:
                # On the engine loop, while it still runs: AsyncLLM cancels its output task
                # there, and a task left pending on a stopped loop errors at interpreter exit.
                self.runner.call(shutdown_async_llm(self.engine))
            self.runner.stop()
        elif self.backend == "vllm" and self.engine is not None:
            self.engine.shutdown()
        self.engine = self.front = self.runner = None

    def create_sampling_params(self, temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 16, **kwargs: Any) -> Any:
        """The backend's ``SamplingParams`` (``servinglab.engine.sampling`` or ``vllm``), same names and meanings.

        ``kwargs`` go through unchanged (``seed``, ``top_k``, ``stop``, ``ignore_eos``, ...).
        For vLLM set ``output_kind=RequestOutputKind.DELTA`` so each output carries only new tokens.

        Raises:
            ValueError: naming the field: ``temperature`` < 0 (or NaN), ``top_p`` outside (0, 1],
            ``max_tokens`` not an integer >= 1 (a bool is not an integer here).
        """
        ### BEGIN SOLUTION
        if not (isinstance(temperature, (int, float)) and temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if self.backend == "lab":
            from servinglab.engine.sampling import SamplingParams

            return SamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=max_tokens, **kwargs)
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs.setdefault("output_kind", RequestOutputKind.DELTA)
        return VllmSamplingParams(temperature=float(temperature), top_p=float(top_p), max_tokens=max_tokens, **kwargs)
        ### END SOLUTION

    async def request_stream(self, prompt: str | list[int], params: Any) -> AsyncIterator[tuple[str, list[int], str | None]]:
        """One request on the backend, as deltas ``(new text, new token ids, finish_reason)``.

        Closing it early (or cancelling the task iterating it) aborts the request.
        """
        if self.runner is None:
            raise RuntimeError("call initialize_engine() first")
        request_id = f"req-{id(self):x}-{next(self._ids)}"
        async for delta in self.runner.stream(lambda: self._deltas(prompt, params, request_id)):
            yield delta

    async def _deltas(self, prompt: str | list[int], params: Any, request_id: str) -> AsyncIterator[tuple[str, list[int], str | None]]:
        """Runs on the engine loop: the backend's outputs turned into deltas of completion 0."""
        if self.backend == "vllm":  # DELTA output kind: every output holds only what is new
            vllm_prompt = {"prompt_token_ids": list(prompt)} if isinstance(prompt, list) else prompt
            async for out in self.engine.generate(vllm_prompt, params, request_id):
                c = out.outputs[0]
                yield c.text, list(c.token_ids), c.finish_reason
            return
        stream = await self.front.add_request(prompt, params, request_id)
        text, num_tokens = "", 0
        try:
            async for out in stream:  # lab snapshots are cumulative: cut the new part off
                c = out.outputs[0]
                yield c.text[len(text):], list(c.token_ids[num_tokens:]), c.finish_reason
                text, num_tokens = c.text, len(c.token_ids)
        finally:
            await stream.aclose()  # aborts the request if it has not finished

    async def generate_async(self, prompts: str | list[int] | Sequence[str | list[int]], sampling_params: Any) -> AsyncIterator[StreamEvent]:
        """Submit every prompt at once (so they batch) and yield :class:`StreamEvent` s as output arrives.

        Args:
            prompts: a prompt (text or token ids) or a list of them.
            sampling_params: one params object for all prompts, or a list with one per prompt.

        Yields:
            Events in arrival order; per prompt, in generation order, its last one carrying
            ``finish_reason``. Closing the generator early aborts every unfinished request.

        Raises:
            ValueError: naming ``sampling_params`` when a list does not match the prompts.
        """
        # Hints: one asyncio task per prompt iterates self.request_stream(prompt, params) and puts
        # (index, delta) on one asyncio.Queue, then an end marker; stamp time.perf_counter() when you
        # take an item off the queue. In `finally`, cancel the tasks and await them (that aborts).
        ### BEGIN SOLUTION
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params has {len(params)} entries but there are {len(prompts)} prompts")
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int) -> None:
            try:
                async for delta in self.request_stream(prompts[index], params[index]):
                    queue.put_nowait((index, delta))
            except Exception as exc:  # hand the failure to the consumer
                queue.put_nowait((index, exc))
            finally:
                queue.put_nowait((index, done))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                now = time.perf_counter()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield StreamEvent(index, item[0], item[1], now, item[2])
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ### END SOLUTION
        return
        yield  # never reached: it makes this an async generator, in the exercise stub too

    def benchmark_performance(self, prompts: Sequence[str | list[int]], num_runs: int = 3, sampling_params: Any = None,
                              warmup: bool = True) -> dict[str, float]:
        """Send all ``prompts`` at once, ``num_runs`` times, and measure from per-token timestamps.

        Args:
            prompts: the workload (text or token ids).
            num_runs: how many times to send it (>= 1).
            sampling_params: default: greedy, 32 tokens.
            warmup: first send one prompt, unmeasured (first steps pay one-off costs).

        Returns:
            :func:`compute_latency_stats` over the requests of every run (latencies pooled), with
            ``avg_throughput_tps`` and ``request_throughput`` replaced by their mean over runs,
            and ``num_runs``.

        Raises:
            ValueError: naming ``prompts`` (empty) or ``num_runs`` (< 1).
        """
        # Hint: inside ONE coroutine run by run_sync(): per run, note the start time, then add one
        # timestamp per token id of every event (RequestTimestamps per prompt).
        ### BEGIN SOLUTION
        if len(prompts) == 0:
            raise ValueError("prompts must not be empty")
        if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
            raise ValueError(f"num_runs must be an integer >= 1, got {num_runs!r}")
        params = sampling_params if sampling_params is not None else self.create_sampling_params(temperature=0.0, max_tokens=32)

        async def one_run(batch: Sequence[str | list[int]]) -> list[RequestTimestamps]:
            records = [RequestTimestamps(time.perf_counter()) for _ in batch]
            async for ev in self.generate_async(list(batch), params):
                records[ev.index].token_times.extend([ev.timestamp] * len(ev.token_ids))
            return records

        async def all_runs() -> list[list[RequestTimestamps]]:
            if warmup:
                await one_run(prompts[:1])
            return [await one_run(prompts) for _ in range(num_runs)]

        runs = run_sync(all_runs())
        stats = compute_latency_stats([rec for run in runs for rec in run])
        per_run = [compute_latency_stats(run) for run in runs]
        for key in ("avg_throughput_tps", "request_throughput"):
            stats[key] = sum(r[key] for r in per_run) / num_runs
        stats["num_runs"] = num_runs
        return stats
        ### END SOLUTION
