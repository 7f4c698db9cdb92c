"""Early-exit drafting on CUDA: the draft model's ``k`` steps as CUDA-graph replays over the paged cache.

Self-speculative decoding (Zhang et al., "Draft & Verify", ACL 2024; Elhoushi et al.,
"LayerSkip", ACL 2024) drafts with the target's own first ``L`` layers, its final norm and
its LM head. Inside the paged engine that draft needs no model and no cache of its own:

- its K/V for layers ``0 .. L-1`` at a position are the target's own for the same token,
  so draft step ``j`` writes them into the target's cache, at the slot the scheduler
  already reserved for draft ``j`` (the verification then writes the same tokens' K/V
  for every layer there; slots of rejected drafts are rolled back as usual);
- a draft step is a decode step of ``L`` layers: a
  :class:`~servinglab.model.cuda_graphs.CUDAGraphRunner` with ``num_layers = L`` captures
  it per batch size, and the ``k`` steps are ``k`` replays. Draft ``j``'s tokens enter
  step ``j + 1``'s inputs on the device, and all drafts enter the verification graph's
  inputs on the device too: drafting adds no device-to-host copy to the step (its one
  copy stays the verification's result);
- drafts are sampled as Part 5's ``DraftModelProposer`` samples them, for the whole batch
  at once: ``q = probabilities(draft logits, params)``, the argmax for greedy requests,
  else one draw from ``q`` with the request's generator; ``q`` goes to the verification
  (rejection sampling is exact for any ``q`` the drafts were drawn from).

The speculative decoder (:mod:`servinglab.engine.spec_decode`) appends placeholder drafts
(the last token, repeated) so the scheduler reserves the slots, then calls
:func:`draft_on_device`; when the step cannot take the verification graph (a prefill in
the batch), :meth:`DeviceDrafts.write_back` copies the drafts into the sequences for the
eager path. So the transformers copy of the target that the CPU engine drafts with
(:func:`servinglab.engine.draft_model.draft_for_engine`) is never built on a GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence as Seq
from dataclasses import dataclass
from typing import Any, Callable

import torch

from servinglab.engine.sampling import SamplingParams
from servinglab.engine.spec_verify import target_probs
from servinglab.interfaces import SchedulerOutput
from servinglab.model.cuda_graphs import CUDAGraphRunner
from servinglab.model.llama import KVCache, LlamaForCausalLM
from servinglab.sequence import Sequence


def sample_drafts(logits: torch.Tensor, params: Seq[SamplingParams], gens: Seq[torch.Generator | None]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One draft token per row of ``logits [n, V]``: ``(tokens [n], q [n, V] or None when every row is greedy)``.

    Rows without a generator share one draw (the device's default generator); a seeded
    row draws with its own, so its stream never depends on its batch. A greedy row's ``q``
    is one-hot, so its draw is its argmax.
    """
    if all(p.greedy for p in params):
        return logits.argmax(-1), None
    q = target_probs(logits.unsqueeze(1), params)[:, 0]
    if all(g is None for g in gens):
        return torch.multinomial(q, 1).view(-1), q
    tokens = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
    shared = [i for i, g in enumerate(gens) if g is None]
    groups = ([(shared, None)] if shared else []) + [([i], g) for i, g in enumerate(gens) if g is not None]
    for rows, gen in groups:
        idx = torch.tensor(rows, device=q.device)
        tokens.index_copy_(0, idx, torch.multinomial(q.index_select(0, idx), 1, generator=gen).view(-1))
    return tokens, q


class EarlyExitDrafter:
    """Captures the early exit's decode step (``num_layers`` layers) and runs ``k`` draft steps as replays.

    Args:
        model, kv_caches: the CUDA runner's (the drafts' K/V go into the target's caches).
        num_layers: ``L``, the draft's layers (``speculative_config["draft_num_layers"]``).
        k: drafts per sequence and step.
        block_size, max_num_seqs, max_model_len, capture_sizes, context_buckets, pool,
            enforce_eager: as the CUDA runner's plain graphs take them.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], num_layers: int, k: int, block_size: int,
                 max_num_seqs: int, max_model_len: int, capture_sizes: list[int] | None, context_buckets: list[int],
                 pool: object | None, enforce_eager: bool) -> None:
        self.model, self.k, self.block_size, self.num_layers = model, k, block_size, num_layers
        longest = max_model_len + k  # a draft sits at most k - 1 positions past the last real token
        self.graphs = CUDAGraphRunner(model, kv_caches, max_num_seqs, -(-longest // block_size), longest,
                                      capture_sizes=capture_sizes, context_buckets=context_buckets, pool=pool,
                                      num_layers=num_layers)
        if not enforce_eager:
            self.graphs.capture()
        self.num_steps = 0  # draft steps run (one per draft position and chunk of lanes)
        self.num_graph_steps = 0  # of those, CUDA-graph replays
        self._rows: dict[int, torch.Tensor] = {}

    def draft(self, lanes: Seq[tuple[Sequence, int]], block_tables: Mapping[int, list[int]],
              slot_of: Callable[[int, int], int] | None, params: Seq[SamplingParams], gens: Seq[torch.Generator | None]
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft ``d`` tokens for each ``(sequence, d)`` lane (``1 <= d <= k``; slots reserved).

        Returns ``(tokens [m, k] int64, q [m, k, V] float32 or None when every lane is greedy)``
        on the device; columns past a lane's ``d`` are padding.
        """
        m, device = len(lanes), self.graphs.device
        tokens = torch.zeros(m, self.k, dtype=torch.long, device=device)
        sampled = not all(p.greedy for p in params)
        q = torch.zeros(m, self.k, self.model.lm_head_weight.shape[0], device=device) if sampled else None
        width = self.graphs.max_batch
        for s in range(0, m, width):  # more lanes than the largest capture size: chunks of it
            e = min(m, s + width)
            self._draft_chunk(lanes[s:e], block_tables, slot_of, params[s:e], gens[s:e], tokens[s:e], None if q is None else q[s:e])
        return tokens, q

    def _draft_chunk(self, lanes: Seq[tuple[Sequence, int]], block_tables: Mapping[int, list[int]],
                     slot_of: Callable[[int, int], int] | None, params: Seq[SamplingParams],
                     gens: Seq[torch.Generator | None], tokens: torch.Tensor, q: torch.Tensor | None) -> None:
        n, bs, graphs = len(lanes), self.block_size, self.graphs
        size = graphs.padded_size(n)
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = torch.arange(n, device=graphs.device)
        starts = [seq.num_computed_tokens for seq, _ in lanes]  # the last real tokens' positions; draft j sits at p + j + 1
        lane_tables = [block_tables[seq.seq_id] for seq, _ in lanes]
        prev = None
        for j in range(max(d for _, d in lanes)):
            ids, pos, slots, ctx, tables = graphs.host_inputs(size)
            if j == 0:  # the last real tokens and the tables stay in the pinned buffer for the later steps
                for i, ((seq, d), p, table) in enumerate(zip(lanes, starts, lane_tables)):
                    ids[i] = seq.prompt_token_ids[p] if p < seq.num_prompt_tokens else seq.output_token_ids[p - seq.num_prompt_tokens]
                    used = (p + d - 1) // bs + 1
                    tables[i, :used] = table[:used]
            longest = 0
            for i, ((seq, d), p, table) in enumerate(zip(lanes, starts, lane_tables)):
                if j < d:  # step j computes the token at p + j (drafts its successor) and writes its K/V
                    pos[i], ctx[i] = p + j, p + j + 1
                    slots[i] = slot_of(seq.seq_id, p + j) if slot_of is not None else table[(p + j) // bs] * bs + (p + j) % bs
                    longest = max(longest, p + j + 1)
                else:  # this lane is done: writes nothing, reads nothing (context 0), output unused
                    pos[i], ctx[i], slots[i] = p, 0, -1
            with torch.inference_mode():
                hidden = graphs.replay(n, size, longest, patch=None if prev is None else (rows, prev))
                prev, probs = sample_drafts(self.model.compute_logits(hidden), params, gens)
                tokens[:, j] = prev
                if q is not None:
                    q[:, j] = probs
            self.num_steps += 1
            self.num_graph_steps += graphs.captured


@dataclass
class DeviceDrafts:
    """A step's drafts, still on the device: ``tokens [m, k]`` and ``q [m, k, V]`` (or ``None``) of
    ``lanes[i]``, which is lane ``verify_lanes[i]`` of the scheduled batch."""

    lanes: list[tuple[Sequence, int]]
    verify_lanes: list[int]
    tokens: torch.Tensor
    probs: torch.Tensor | None

    def probs_for(self, num_lanes: int) -> torch.Tensor | None:
        """``q [num_lanes, k, V]`` in the scheduled batch's lane order (zeros where a lane drafted nothing)."""
        if self.probs is None or self.verify_lanes == list(range(num_lanes)):
            return self.probs
        out = self.probs.new_zeros(num_lanes, *self.probs.shape[1:])
        out.index_copy_(0, torch.tensor(self.verify_lanes, device=out.device), self.probs)
        return out

    def write_back(self, drafts: Mapping[int, Any]) -> None:
        """Put the drafts into their sequences in place of the placeholders (the eager path reads them there).

        ``drafts``: seq_id -> the decoder's draft record (``tokens`` list, ``probs``).
        """
        values = self.tokens.tolist()  # a device-to-host copy: only steps off the graph path pay it
        for i, (seq, d) in enumerate(self.lanes):
            record = drafts[seq.seq_id]
            record.tokens[:d] = values[i][:d]
            seq.output_token_ids[len(seq.output_token_ids) - len(record.tokens) :] = record.tokens
            if self.probs is not None:
                record.probs = self.probs[i, :d]


def draft_on_device(drafter: EarlyExitDrafter, out: SchedulerOutput, drafts: Mapping[int, Any],
                    block_tables: Mapping[int, list[int]], slot_of: Callable[[int, int], int] | None,
                    params_of: Callable[[Sequence], SamplingParams], generator_of: Callable[[Sequence], torch.Generator | None]
                    ) -> DeviceDrafts | None:
    """Run the early exit for every scheduled sequence with placeholder drafts (all of them, as scheduled).

    ``drafts``: seq_id -> record whose ``tokens`` are the placeholders. ``None`` if no lane drafts.
    """
    lanes, where = [], []
    for v, item in enumerate(out.scheduled):
        record = drafts.get(item.seq.seq_id)
        if record is not None and item.num_new_tokens == 1 + len(record.tokens):
            lanes.append((item.seq, len(record.tokens)))
            where.append(v)
    if not lanes:
        return None
    tokens, probs = drafter.draft(lanes, block_tables, slot_of, [params_of(s) for s, _ in lanes],
                                  [generator_of(s) for s, _ in lanes])
    return DeviceDrafts(lanes, where, tokens, probs)
