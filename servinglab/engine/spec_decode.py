"""Speculative decoding inside the paged engine (Part 5's pieces, served in batches).

A speculative step: every *decoding* sequence gets up to ``k`` drafted tokens (the student's
``NgramProposer`` or an early-exit draft model through ``DraftModelProposer``), appended for
the step. The scheduler sees ``1 + d`` uncomputed tokens and reserves their slots
(``append_slots``); ONE target forward over the paged cache gives logits at all of them; the
student's ``rejection_sample`` keeps the agreed prefix plus one token (Leviathan et al.,
ICML 2023). Then the step rolls back: the drafts leave the sequence, ``num_computed_tokens``
becomes the kept tokens minus one, ``trim_blocks`` frees blocks holding only rejected slots
(stale K/V in a kept block is never read and is overwritten next step), and blocks are
published to the prefix cache only after the rollback (none holds a rejected draft).

Drafts never take what the plain step would need (capped by the token budget left after the
running sequences' own tokens, free blocks beyond one per running sequence, ``max_tokens``
and ``max_model_len``): no preemption the plain engine would not have made.

On a GPU (:mod:`servinglab.engine.cuda_runner`) an all-decode step is one CUDA-graph replay
of ``1 + k`` query rows per sequence; ``rejection_sample`` verifies the batch on the device
with one device-to-host copy (:func:`servinglab.engine.spec_verify.verify_batch`); the
n-gram proposer is an incremental index (:mod:`servinglab.engine.ngram_index`) and an early-exit
draft ``k`` graph replays of its own layers (:mod:`servinglab.engine.draft_runner`); whether a
step speculates is :mod:`servinglab.engine.spec_policy`'s rule (never slower than plain);
with overlap scheduling (the CUDA default) plain steps run overlapped and a speculative step
first commits the step in flight. The decoder is the engine's step *strategy*: it sees the
engine only through :class:`~servinglab.engine.step_protocol.EngineHost`.
"""

from __future__ import annotations

import collections
import itertools
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from servinglab.engine.draft_model import cached_logits_fn, draft_for_engine
from servinglab.engine.draft_runner import draft_on_device
from servinglab.engine.ngram_index import NgramIndex
from servinglab.engine.outputs import RequestOutput
from servinglab.engine.spec_config import SpecDecodeStats, SpeculativeConfig, generate_with_speculation  # noqa: F401 (its home was here)
from servinglab.engine.spec_policy import SpecPolicy
from servinglab.engine.spec_verify import check_batched, verify_batch, verify_rows
from servinglab.engine.stall import raise_if_stalled
from servinglab.engine.step_protocol import EngineHost, RequestState
from servinglab.impl import current_impl, load_part
from servinglab.engine.sampling import SamplingParams, sample
from servinglab.sequence import Sequence, SequenceStatus

_KEEP_STATS = 4096  # finished requests whose counters stay readable (a server must not grow forever)


@dataclass
class _Draft:
    seq: Sequence
    tokens: list[int]
    probs: torch.Tensor | None  # [d, V] draft distributions, None for a deterministic proposer


class SpeculativeDecoder:
    """Runs the engine's steps with speculation (built by ``LLMEngine`` from ``speculative_config``).

    Attributes:
        not_batched: why the student's ``rejection_sample`` is not batched tensor code
            (``None`` when it is); then verification stays on the per-row path, and on a
            GPU the engine warns once at start-up.
        policy: the per-step on/off rule (:class:`~servinglab.engine.spec_policy.SpecPolicy`).
    """

    def __init__(self, raw_config: Mapping[str, Any], engine: EngineHost) -> None:
        self.config = cfg = SpeculativeConfig.from_dict(raw_config)
        self.spec = load_part("speculative")
        self.k = cfg.num_speculative_tokens
        self.stats = SpecDecodeStats(self.k)
        self.request_stats: collections.OrderedDict[str, SpecDecodeStats] = collections.OrderedDict()
        self._draft_lms: dict[int, Any] = {}  # seq_id -> DraftModelProposer with its own KV cache
        self.propose_seconds = 0.0  # wall time spent drafting: the "c" of Leviathan's speedup formula
        self._pending = False  # speculate in the next step: this one only drained the overlapped plain loop
        on_gpu = engine.device.type == "cuda"
        self.policy = SpecPolicy(cfg.disable_by_batch_size, on_gpu if cfg.adaptive is None else cfg.adaptive)
        self.not_batched = check_batched(self.spec.rejection_sample, engine.device)
        self.graph_verify = hasattr(engine.runner, "execute_verify") and self.not_batched is None
        if self.not_batched is not None and on_gpu:
            warnings.warn(f"rejection_sample in {current_impl()}/speculative.py is not batched tensor code: {self.not_batched}. "
                          "Speculative verification falls back to the eager per-row path (no CUDA graph, one device "
                          "round trip per sequence), which is slower than plain decoding on a GPU.", RuntimeWarning, stacklevel=3)
        self._indexes: dict[int, NgramIndex] = {}  # seq_id -> n-gram index (GPU path)
        if cfg.method == "ngram":
            self.ngram = self.spec.NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max, self.k)
            self.fast_ngram = on_gpu  # the incremental index proposes what the student's search would, in O(1)
        self.drafter = getattr(engine.runner, "drafter", None) if cfg.method == "draft" and cfg.model is None else None  # draft_runner.py
        if cfg.method == "draft" and self.drafter is None:
            self.draft_model = draft_for_engine(cfg, engine)

    # ------------------------------------------------------------------ proposing
    @staticmethod
    def _decoding(engine: EngineHost) -> list[Sequence]:
        return [s for s in engine.scheduler.running if s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 1
                and s.num_computed_tokens >= s.num_prompt_tokens]

    def _draft_tokens(self, seq: Sequence, room: int) -> list[int]:
        """A deterministic proposer's drafts for ``seq`` (at most ``room``)."""
        if self.config.method == "custom":
            return list(self.config.proposer.propose(seq.token_ids))[:room]
        if not self.fast_ngram:
            return list(self.ngram.propose(seq.token_ids))[:room]
        index = self._indexes.get(seq.seq_id)
        if index is None:
            cfg = self.config
            index = self._indexes[seq.seq_id] = NgramIndex(cfg.prompt_lookup_min, cfg.prompt_lookup_max, self.k)
        return index.propose(seq.token_ids)[:room]

    def _propose(self, engine: EngineHost, decoding: list[Sequence]) -> tuple[dict[int, _Draft], set[int]]:
        """Append drafts to decoding sequences; return them and the ids of all decoding sequences."""
        sched, bm, bs = engine.scheduler, engine.block_manager, engine.config.block_size
        running = list(sched.running)
        ids = {s.seq_id for s in decoding}
        # Drafts take only what the plain step leaves: its tokens, and one block per running sequence.
        budget = engine.config.max_num_batched_tokens - sum(1 if s.seq_id in ids else s.num_uncomputed_tokens for s in running)
        free_blocks = bm.num_free_blocks - len(running)
        if self.config.method == "draft":  # drop KV caches of sequences that left the batch
            self._draft_lms = {i: p for i, p in self._draft_lms.items() if i in ids}
        if self._indexes and len(self._indexes) > 2 * len(ids) + 64:  # forget finished sequences now and then
            self._indexes = {i: x for i, x in self._indexes.items() if i in ids}
        drafts: dict[int, _Draft] = {}
        for seq in decoding:
            p: SamplingParams = seq.sampling_params
            length, have = seq.num_tokens, len(bm.block_tables.get(seq.seq_id, ()))
            base = max(have, -(-length // bs))
            room = min(self.k, budget, engine.max_model_len - 1 - length, (base + free_blocks) * bs - length)
            if p.max_tokens is not None:
                room = min(room, p.max_tokens - len(seq.output_token_ids) - 1)  # the pass adds one token itself
            if room <= 0:
                continue
            probs = None
            if self.config.method != "draft":
                tokens = self._draft_tokens(seq, room)
            elif self.drafter is not None:  # placeholders reserve the slots; the early exit drafts after scheduling
                tokens = [seq.output_token_ids[-1]] * room
            else:  # one draft KV cache per sequence, rolled back to the common prefix on each call
                if seq.seq_id not in self._draft_lms:
                    self._draft_lms[seq.seq_id] = self.spec.DraftModelProposer(cached_logits_fn(self.draft_model), self.k)
                gen = engine.generator_of(seq)
                tokens, probs = self._draft_lms[seq.seq_id].propose_with_probs(seq.token_ids, p, gen, num_tokens=room)
            if not tokens:
                continue
            budget -= len(tokens)
            free_blocks -= max(0, -(-(length + len(tokens)) // bs) - base)
            seq.output_token_ids.extend(tokens)
            drafts[seq.seq_id] = _Draft(seq, list(tokens), probs)
        return drafts, ids

    @staticmethod
    def _strip(drafts: Mapping[int, _Draft]) -> None:
        for d in drafts.values():
            del d.seq.output_token_ids[len(d.seq.output_token_ids) - len(d.tokens) :]

    def step(self, engine: EngineHost) -> list[RequestOutput]:
        """One engine iteration with speculation (the plain step's contract: outputs of requests that progressed)."""
        start = time.perf_counter()
        decoding = self._decoding(engine)
        # With the measured rule (the GPU default), steps that prefill do not speculate: they run
        # eagerly, and verifying there costs a round trip per sequence (the graph path needs all-decode steps).
        running = len(engine.scheduler.running)
        prefilling = len(decoding) < running or (len(engine.scheduler.waiting) > 0 and running < engine.config.max_num_seqs)
        pending, self._pending = self._pending, False  # the last step drained the overlapped loop for this one
        if (self.policy.adaptive and prefilling) or not (bool(decoding) if pending else self.policy.should_speculate(len(decoding))):
            return self._plain(engine, decoding, start)
        if engine.async_loop is not None and engine.async_loop.in_flight is not None:
            self._pending = True  # plain steps overlap (async_scheduling.py); drafting needs the real tokens first
            return engine.async_loop.drain(engine)
        drafts, decoding_ids = self._propose(engine, decoding)
        self.propose_seconds += time.perf_counter() - start
        try:
            out = engine.scheduler.schedule()
        except Exception:
            self._strip(drafts)
            raise
        if out.is_empty:
            self._strip(drafts)
            raise_if_stalled(engine.scheduler, engine.block_manager)
            return []
        was_prefill = [s.seq.seq_id not in drafts and s.seq.is_prefill for s in out.scheduled]
        bm = engine.block_manager
        counts = {i: len(d.tokens) for i, d in drafts.items()}
        drafted = None
        if self.drafter is not None:
            drafted = draft_on_device(self.drafter, out, drafts, bm.block_tables, engine.runner.slot_of,
                                      lambda s: s.sampling_params, engine.generator_of)
        graph = engine.runner.execute_verify(out, bm.block_tables, counts, drafted) if self.graph_verify else None
        if graph is None:
            if drafted is not None:  # the eager path reads the drafts from the sequences
                drafted.write_back(drafts)
            seqs, logits, num_logits = engine.runner.execute_speculative(out, bm.block_tables, counts)
            row_start = list(itertools.accumulate(num_logits, initial=0))
            first_rows = logits[row_start[:-1]] if seqs else logits
        else:
            seqs, logits3, draft_ids, num_drafts = graph
            first_rows = logits3[:, 0]
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.seq_id not in drafts:  # speculating sequences publish after the rollback
                bm.cache_blocks(item.seq.seq_id, item.seq.token_ids, item.seq.num_computed_tokens)
        self._strip(drafts)
        if graph is None:
            emitted = self._emit_rows(engine, seqs, drafts, logits, num_logits, row_start)
        else:
            q = None if drafted is None else drafted.probs_for(len(seqs))
            emitted = self._emit_batch(engine, seqs, drafts, logits3, draft_ids, num_drafts, q)
        outputs = self._commit(engine, seqs, drafts, decoding_ids, emitted, first_rows)
        engine.num_steps += 1
        if engine.record_steps:
            engine.log_step(start, out, was_prefill)
        if not any(was_prefill) and seqs:
            self.policy.record(len(seqs), True, time.perf_counter() - start,
                               sum(len(t) for t, _, _ in emitted.values()) / len(seqs))
        return outputs

    def _plain(self, engine: EngineHost, decoding: list[Sequence], start: float) -> list[RequestOutput]:
        """A step the rule does not speculate in: the engine's own plain step, timed for the rule."""
        before = {s.seq_id: (s, s.num_tokens) for s in decoding}
        outputs = engine.plain_step() if engine.async_loop is None else engine.async_loop.step(engine)
        if decoding and not engine.last_step_had_prefill:
            self.policy.record(len(decoding), False, time.perf_counter() - start)
        for seq, n in before.values():
            if seq.num_tokens > n:
                self._record(seq.request_id, 0, 0, seq.num_tokens - n)
        return outputs

    def _emit_rows(self, engine: EngineHost, seqs: list[Sequence], drafts: Mapping[int, _Draft], logits: torch.Tensor,
                   num_logits: list[int], row_start: list[int]) -> dict[int, tuple[list[int], int, int]]:
        """Eager path: ``index -> (tokens, drafts verified, accepted)``; plain rows sampled, speculating ones verified per row."""
        plain = [i for i, n in enumerate(num_logits) if n == 1]
        spec = [i for i, n in enumerate(num_logits) if n > 1]
        emitted: dict[int, tuple[list[int], int, int]] = {}
        if plain:
            rows = [row_start[i] for i in plain]
            gens = [engine.generator_of(seqs[i]) for i in plain]
            tokens = sample(logits[rows], [seqs[i].sampling_params for i in plain], gens)
            emitted.update({i: ([t], 0, 0) for i, t in zip(plain, tokens)})
        if spec:
            items = [drafts[seqs[i].seq_id] for i in spec]
            results = verify_rows(self.spec.rejection_sample, [(d.tokens, d.probs) for d in items],
                                  [logits[row_start[i] : row_start[i + 1]] for i in spec],
                                  [seqs[i].sampling_params for i in spec], [engine.generator_of(seqs[i]) for i in spec])
            for i, (toks, acc) in zip(spec, results):
                emitted[i] = (toks, num_logits[i] - 1, acc)
        return emitted

    def _emit_batch(self, engine: EngineHost, seqs: list[Sequence], drafts: Mapping[int, _Draft], logits: torch.Tensor,
                    draft_ids: torch.Tensor, num_drafts: torch.Tensor, q: torch.Tensor | None
                    ) -> dict[int, tuple[list[int], int, int]]:
        """Graph path: the whole padded batch through the student's sampler on the device (``q``: the early exit's)."""
        if self.config.method == "draft" and self.drafter is None:
            q = torch.zeros(len(seqs), self.k, logits.shape[-1], device=logits.device)
            for i, seq in enumerate(seqs):
                d = drafts.get(seq.seq_id)
                if d is not None and d.probs is not None:
                    q[i, : len(d.tokens)] = d.probs
        results = verify_batch(self.spec.rejection_sample, logits, draft_ids, num_drafts, q,
                               [s.sampling_params for s in seqs], [engine.generator_of(s) for s in seqs])
        return {i: (toks, len(drafts[s.seq_id].tokens) if s.seq_id in drafts else 0, acc)
                for i, (s, (toks, acc)) in enumerate(zip(seqs, results))}

    def _commit(self, engine: EngineHost, seqs: list[Sequence], drafts: Mapping[int, _Draft], decoding: set[int],
                emitted: Mapping[int, tuple[list[int], int, int]], first_rows: torch.Tensor) -> list[RequestOutput]:
        """Roll speculating sequences back to their kept tokens, append the emitted tokens, fork ``n > 1`` requests."""
        bm, now = engine.block_manager, time.perf_counter()
        touched: dict[str, RequestState] = {}
        for i, seq in enumerate(seqs):
            req, (toks, verified, acc) = engine.request_of(seq), emitted[i]
            touched[req.request_id] = req
            if seq.seq_id in drafts:  # roll back: K/V is valid up to the last accepted draft
                seq.num_computed_tokens = seq.num_tokens + acc
                bm.trim_blocks(seq.seq_id, seq.num_tokens + len(toks))
                bm.cache_blocks(seq.seq_id, seq.token_ids + toks, seq.num_computed_tokens)
            kept = 0
            for t in toks:
                engine.append_token(req, seq, t, now)
                kept += 1
                if seq.is_finished:
                    break  # EOS, a stop or the length limit inside an accepted run: drop the rest
            if seq.seq_id in decoding:
                self._record(req.request_id, verified, acc, kept)
            if seq.seq_id not in drafts and len(req.seqs) < req.params.n and seq is req.seqs[0]:
                engine.fork_children(req, seq, first_rows[i : i + 1], now)
        return [engine.request_output(req) for req in touched.values() if req.stream or req.finished]

    def _record(self, request_id: str, verified: int, accepted: int, emitted: int) -> None:
        stats = self.request_stats.get(request_id)
        if stats is None:
            stats = self.request_stats[request_id] = SpecDecodeStats(self.k)
            while len(self.request_stats) > _KEEP_STATS:
                self.request_stats.popitem(last=False)
        stats.record(verified, accepted, emitted)
        self.stats.record(verified, accepted, emitted)

