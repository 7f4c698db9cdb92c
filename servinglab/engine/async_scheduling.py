"""Overlap scheduling: the host prepares step ``n + 1`` while the device runs step ``n``.

In the synchronous loop every step is *schedule -> prepare inputs -> launch -> wait for
the sampled tokens -> commit them (stop checks, outputs)*, and the GPU idles during the
host's part: on an H100 the 1.7B config's batch-1 step spends about 0.15 ms of its 2 ms
on the host, and the 135M config about a third. vLLM's ``async_scheduling`` and SGLang's
overlap scheduler hide that work behind the device's. With ``async_scheduling=True`` one
:meth:`AsyncScheduling.step` does::

    schedule step n+1            (every sequence of step n assumed to get its token)
    launch step n+1              (its inputs uploaded; step n's samples written into them
                                  on the device: no host round trip)
    wait for step n's tokens     (the device is busy with n+1 meanwhile)
    commit step n                (placeholders replaced, stop checks, outputs)

A sampled token is known to the host only a step later, so when step ``n`` is launched
each of its sampling sequences gets a *placeholder* token: its lengths, block slots and
the scheduler's decisions are already right for step ``n + 1``, and the token's value
reaches step ``n + 1``'s inputs through a :class:`~servinglab.engine.step_protocol.TokenPatch`.
A sequence that finished at step ``n`` has already been launched in step ``n + 1``: that
lane's token is discarded (it wrote one K/V entry into a block that is freed now; the
device runs steps in order, so a later owner of the block overwrites it). Blocks are
published to the prefix cache once the tokens in them are real.

The student's scheduler and block manager run unchanged. Greedy and seeded outputs are the
synchronous loop's (:func:`~servinglab.engine.sampling.sample_tensor` draws what ``sample``
draws); unseeded sampling draws from the shared generator in a different order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from servinglab.engine.outputs import RequestOutput
from servinglab.engine.sampling import sample_each, sample_tensor
from servinglab.engine.stall import raise_if_stalled
from servinglab.engine.step_protocol import TokenPatch
from servinglab.interfaces import SchedulerOutput
from servinglab.sequence import Sequence

PLACEHOLDER = -1  # a sampled token whose value is still on the device


@dataclass
class InFlight:
    """A launched step whose tokens the host has not seen yet."""

    out: SchedulerOutput
    seqs: list[Sequence]  # the sampling sequences, row i of `tokens`
    logits: torch.Tensor  # kept for parallel sampling's forks (n > 1)
    tokens: torch.Tensor  # [len(seqs)] int64 on the device
    host: torch.Tensor  # its copy on the host (pinned on CUDA), valid once `copied` has completed
    copied: torch.cuda.Event | None
    was_prefill: list[bool]
    start: float
    failures: dict[int, Exception] = field(default_factory=dict)  # rows whose sampling failed (isolate_failures)
    live: set[int] = field(default_factory=set)  # seq ids that carry this step's placeholder


class AsyncScheduling:
    """The engine's step with the host one step ahead of the device (see the module docstring)."""

    def __init__(self) -> None:
        self.in_flight: InFlight | None = None
        self.num_overlapped = 0  # steps launched before the previous step's tokens reached the host
        self.num_launched = 0
        self.num_discarded = 0  # lanes whose sequence had finished when its token arrived (one step late)

    def step(self, engine) -> list[RequestOutput]:
        """Schedule and launch the next step, then commit the previous one; return its outputs."""
        prev, self.in_flight = self.in_flight, None
        start = time.perf_counter()
        out = engine.scheduler.schedule()
        launched = None if out.is_empty else self._launch(engine, out, prev, start)
        outputs = [] if prev is None else self._commit(engine, prev, launched)
        if launched is not None:
            self._after_commit(engine, launched)
        self.in_flight = launched
        if out.is_empty and prev is None:
            raise_if_stalled(engine.scheduler, engine.block_manager)
        return outputs

    def drain(self, engine) -> list[RequestOutput]:
        """Commit the step in flight and launch none (before a step that needs every token on the host:
        speculative decoding's proposers read them); return its outputs."""
        prev, self.in_flight = self.in_flight, None
        return [] if prev is None else self._commit(engine, prev, None)

    def _launch(self, engine, out: SchedulerOutput, prev: InFlight | None, start: float) -> InFlight:
        was_prefill = [s.seq.is_prefill for s in out.scheduled]
        engine.last_step_had_prefill = any(was_prefill)
        patch = None
        if prev is not None:
            patch = TokenPatch({seq.seq_id: row for row, seq in enumerate(prev.seqs) if seq.seq_id in prev.live}, prev.tokens)
            self.num_overlapped += 1
        seqs, logits = engine.runner.execute(out, engine.block_manager.block_tables, patch)
        self.num_launched += 1
        for item in out.scheduled:  # computed now; published to the prefix cache once their tokens are real
            item.seq.num_computed_tokens += item.num_new_tokens
        params, gens = [s.sampling_params for s in seqs], [engine.generator_of(s) for s in seqs]
        failures: dict[int, Exception] = {}
        try:
            tokens = sample_tensor(logits, params, gens)
        except Exception:
            if not engine.isolate_failures:
                raise
            rows = sample_each(logits, params, gens)  # a row's failure fails its request alone (the server's rule)
            failures = {i: r for i, r in enumerate(rows) if isinstance(r, Exception)}
            tokens = torch.tensor([0 if i in failures else r for i, r in enumerate(rows)], dtype=torch.long, device=logits.device)
        cuda = tokens.device.type == "cuda"
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        copied = None
        if cuda:
            copied = torch.cuda.Event()
            copied.record()
        return InFlight(out, seqs, logits, tokens, host, copied, was_prefill, start, failures)

    def _commit(self, engine, step: InFlight, launched: InFlight | None) -> list[RequestOutput]:
        """Step ``n``'s tokens replace its placeholders and are committed as the synchronous loop does."""
        if step.copied is not None:
            step.copied.synchronize()
        tokens: list[int | Exception | None] = step.host.tolist()
        parents: dict[int, tuple[Sequence, int, int]] = {}  # row -> (parent, its request's seq count, its count before the step in flight)
        for row, seq in enumerate(step.seqs):
            req = engine._seq_to_request.get(seq.seq_id)
            if seq.seq_id not in step.live or req is None or seq.is_finished:
                self.num_discarded += 1  # finished or aborted after it was launched: its extra token is dropped
                tokens[row] = None
                continue
            seq.output_token_ids.pop()  # the placeholder (the last token: later ones are appended after this)
            tokens[row] = step.failures.get(row, tokens[row])
            if len(req.seqs) < req.params.n and seq is req.seqs[0]:
                parents[row] = (seq, len(req.seqs), seq.num_computed_tokens - _launched_since(launched, seq))
        outputs = engine.commit_tokens(step.out, step.seqs, tokens, step.logits, step.was_prefill, step.start)
        for parent, count, computed in parents.values():  # forks copied the parent's count, which ran one step ahead
            req = engine._seq_to_request.get(parent.seq_id)
            for child in [] if req is None else req.seqs[count:]:
                child.num_computed_tokens = computed
        return outputs

    def _after_commit(self, engine, step: InFlight) -> None:
        """Step ``n + 1``'s full blocks hold real tokens now: publish them; its samplers get placeholders."""
        for item in step.out.scheduled:
            seq = item.seq
            if not seq.is_finished and seq.seq_id in engine._seq_to_request:
                engine.block_manager.cache_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
        for seq in step.seqs:
            if not seq.is_finished and seq.seq_id in engine._seq_to_request:
                seq.output_token_ids.append(PLACEHOLDER)
                step.live.add(seq.seq_id)


def _launched_since(step: InFlight | None, seq: Sequence) -> int:
    """Tokens of ``seq`` computed by the step launched after the one being committed (0 or its new tokens)."""
    if step is None:
        return 0
    return next((item.num_new_tokens for item in step.out.scheduled if item.seq is seq), 0)
