"""A request's state as the scheduler and engine see it: plain Python, no tensors.

One :class:`Sequence` per generated completion (a request with ``n > 1`` owns ``n``
sequences that share a ``request_id``). ``num_computed_tokens`` counts the leading tokens
whose K/V already sit in the paged cache; everything past it still needs a forward pass.
This one number drives prefill, chunked prefill, decode, prefix-cache hits and
preemption alike (the same idea as vLLM v1's ``Request.num_computed_tokens``).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # queued (new, or preempted and waiting to be recomputed)
    RUNNING = "running"  # holds KV blocks and is scheduled every step
    SWAPPED = "swapped"  # preempted by swap: its K/V wait in the host pool (preemption_mode="swap")
    FINISHED_STOPPED = "stop"  # hit EOS or a stop string
    FINISHED_LENGTH = "length"  # hit max_tokens or max_model_len
    FINISHED_ABORTED = "abort"  # cancelled by the client

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.SWAPPED)


@dataclass(eq=False)
class Sequence:
    """One token stream being generated.

    Attributes:
        prompt_token_ids: the prompt, as token ids.
        output_token_ids: tokens generated so far.
        num_computed_tokens: leading tokens whose K/V are in the cache.
        num_cached_tokens: of those, how many came from the prefix cache at admission.
        request_id: the request this sequence answers (shared by ``n`` samples).
        sampling_params: the request's sampling parameters (opaque to the scheduler).
        arrival_time: when the request arrived (``time.perf_counter()`` clock).
    """

    prompt_token_ids: list[int]
    request_id: str = ""
    sampling_params: Any = None
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens that still need a forward pass before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while part of the prompt (or a recomputed prefix) is not yet in the cache."""
        return self.num_uncomputed_tokens > 1 or self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
