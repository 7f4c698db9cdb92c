"""What a step strategy may use of the engine, and what the engine calls on it.

The plain step lives in :class:`~servinglab.engine.engine.LLMEngine`; speculative
decoding (:mod:`servinglab.engine.spec_decode`) is another *strategy* for the same
iteration. The engine builds the strategy and calls it through :class:`StepStrategy`;
the strategy sees the engine only through :class:`EngineHost`. Both protocols (and the
request record they share) live here, below both modules, so the import graph has no
circle, type hints included: ``engine -> spec_decode -> step_protocol`` and
``engine -> step_protocol``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from servinglab.engine.config import EngineConfig
from servinglab.engine.outputs import RequestMetrics, RequestOutput
from servinglab.engine.sampling import SamplingParams
from servinglab.interfaces import SchedulerOutput
from servinglab.sequence import Sequence


@dataclass
class StepRecord:
    """What one step ran, for timelines and utilization plots."""

    index: int
    start: float
    end: float
    scheduled: list[tuple[int, int, bool]]  # (seq_id, num_new_tokens, was_prefill)
    preempted: list[int]
    kv_usage: float
    num_waiting: int


@dataclass
class TokenPatch:
    """Input tokens that are still on the device: the previous step's samples (overlap scheduling).

    ``index[seq_id] = j``: the sequence's last token is ``tokens[j]`` (its host copy holds a
    placeholder until the previous step's tokens arrive). The runner writes those values
    into the step's input ids on the device, after the upload and before the model runs.
    """

    index: dict[int, int]
    tokens: torch.Tensor  # [previous step's sampled rows] int64, on the runner's device

    def positions(self, out: SchedulerOutput, rows_per_lane: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """``(rows, src)``: input row ``rows[i]`` of the step ``out`` takes ``tokens[src[i]]``; ``None`` if none.

        A patched sequence's placeholder is its last token; it is an input only when the step
        reaches it (a decode). ``rows_per_lane``: graph inputs, lane ``i`` at row ``i * rows_per_lane``;
        ``None``: packed rows, each item's tokens after the previous item's.
        """
        rows, src, offset = [], [], 0
        for lane, item in enumerate(out.scheduled):
            offset += item.num_new_tokens
            seq, j = item.seq, self.index.get(item.seq.seq_id)
            if j is not None and seq.num_computed_tokens + item.num_new_tokens == seq.num_tokens:
                rows.append(offset - 1 if rows_per_lane is None else lane * rows_per_lane)
                src.append(j)
        return (np.asarray(rows, dtype=np.int64), np.asarray(src, dtype=np.int64)) if rows else None


@dataclass
class RequestState:
    """The engine's record of one request: its sequences (completion i is ``seqs[i]``), generators, metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stream: bool = False
    seqs: list[Sequence] = field(default_factory=list)  # index i is completion i (forks appended later)
    generators: dict[int, torch.Generator | None] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class EngineHost(Protocol):
    """The engine as a step strategy sees it: its parts, and the hooks that commit tokens."""

    config: EngineConfig
    scheduler: Any  # Part 4 (servinglab.interfaces.Scheduler)
    block_manager: Any  # Part 2 (servinglab.interfaces.BlockManager)
    runner: Any  # servinglab.engine.runner.ModelRunner or its CUDA subclass
    model: torch.nn.Module
    hf_config: Any
    device: torch.device
    max_model_len: int
    num_steps: int
    record_steps: bool
    last_step_had_prefill: bool

    def plain_step(self) -> list[RequestOutput]:
        """One iteration without speculation."""
        ...

    def request_of(self, seq: Sequence) -> RequestState:
        """The request a live sequence belongs to."""
        ...

    def generator_of(self, seq: Sequence) -> torch.Generator | None:
        """The sequence's seeded generator (``None`` when unseeded)."""
        ...

    def append_token(self, req: RequestState, seq: Sequence, token: int, now: float) -> None:
        """Commit one token (metrics, stop check; a finished sequence frees its blocks)."""
        ...

    def fork_children(self, req: RequestState, parent: Sequence, logits_row: torch.Tensor, now: float) -> None:
        """Start the other ``n - 1`` completions of a parallel-sampling request."""
        ...

    def log_step(self, start: float, out: SchedulerOutput, was_prefill: list[bool]) -> None:
        """Append this step's :class:`StepRecord`."""
        ...

    def request_output(self, req: RequestState) -> RequestOutput:
        """The request's snapshot (a finished one leaves the engine's tables)."""
        ...


class StepStrategy(Protocol):
    """One engine iteration done another way (speculative decoding)."""

    def step(self, engine: EngineHost) -> list[RequestOutput]:
        """Run one iteration; return the outputs of requests that progressed (the plain step's contract)."""
        ...
