"""What ``generate`` returns: vLLM's ``RequestOutput`` shape, plus per-token timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineDeadError(RuntimeError):
    """The engine's background loop has died: no request can make progress (vLLM's ``EngineDeadError``)."""


@dataclass
class RequestMetrics:
    """Timestamps of one request (``time.perf_counter()`` seconds, like vLLM's ``RequestMetrics``)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled (first sequence)
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token (s): arrival to the first sampled token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token (s) after the first: the decode rate a user sees."""
        if self.finished_time is None or self.first_token_time is None or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.first_token_time) / (len(self.token_times) - 1)

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's result (or a streaming snapshot when ``finished`` is False)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
