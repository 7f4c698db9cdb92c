"""Speculative decoding inside the paged engine (Part 5's pieces, served in batches).

A speculative step: every *decoding* sequence gets up to ``k`` drafted tokens (the
student's ``NgramProposer`` or an early-exit draft model through ``DraftModelProposer``),
appended to its tokens for the duration of the step. The scheduler then sees ``1 + d``
uncomputed tokens and reserves their slots with ``append_slots``; the runner computes them
all in ONE target forward over the paged cache and returns logits at every one of those
positions; the student's ``rejection_sample`` keeps the agreed prefix plus one token
(Leviathan et al., ICML 2023). Then the step rolls back: the drafts leave the sequence,
``num_computed_tokens`` becomes the kept tokens minus one (the last emitted token's K/V is
computed next step), and ``trim_blocks`` frees the blocks holding only rejected slots. Stale
K/V of rejected slots inside a kept block is never read (attention stops at the context
length) and is overwritten next step. Blocks are published to the prefix cache only after
the rollback, so no cached block holds a rejected draft.

Drafts never take what the plain step would need: they are capped by the token budget
left after the running sequences' own tokens, by free blocks beyond one per running
sequence, by ``max_tokens`` and by ``max_model_len``. So speculation never causes a
preemption the plain engine would not have made. Prefill steps are unchanged.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from servinglab.engine.draft_model import cached_logits_fn
from servinglab.engine.spec_config import SpecDecodeStats, SpeculativeConfig
from servinglab.engine.stall import raise_if_stalled
from servinglab.impl import load_part
from servinglab.engine.sampling import SamplingParams, probabilities, sample
from servinglab.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from servinglab.engine.engine import LLMEngine, RequestState
    from servinglab.engine.outputs import RequestOutput

_KEEP_STATS = 4096  # finished requests whose counters stay readable (a server must not grow forever)


@dataclass
class _Draft:
    seq: Sequence
    tokens: list[int]
    probs: torch.Tensor | None  # [d, V] draft distributions, None for a deterministic proposer


class SpeculativeDecoder:
    """Runs the engine's steps with speculation (built by ``LLMEngine`` from ``speculative_config``)."""

    def __init__(self, raw_config: Mapping[str, Any], engine: LLMEngine) -> None:
        self.config = cfg = SpeculativeConfig.from_dict(raw_config)
        self.spec = load_part("speculative")
        self.k = cfg.num_speculative_tokens
        self.stats = SpecDecodeStats(self.k)
        self.request_stats: collections.OrderedDict[str, SpecDecodeStats] = collections.OrderedDict()
        self._draft_lms: dict[int, Any] = {}  # seq_id -> DraftModelProposer with its own KV cache
        self.propose_seconds = 0.0  # wall time spent drafting: the "c" of Leviathan's speedup formula
        if cfg.method == "ngram":
            self.ngram = self.spec.NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max, self.k)
        else:
            self.draft_model = self._build_draft(cfg, engine)

    @staticmethod
    def _build_draft(cfg: SpeculativeConfig, engine: LLMEngine) -> torch.nn.Module:
        """An early exit of the target (weights copied once into transformers), or ``cfg.model``."""
        target_vocab = engine.hf_config.vocab_size
        if cfg.model is not None:
            draft = cfg.model
            if isinstance(draft, str):
                from transformers import AutoModelForCausalLM

                draft = AutoModelForCausalLM.from_pretrained(draft, dtype=engine.config.torch_dtype).to(engine.device)
            vocab = getattr(getattr(draft, "config", None), "vocab_size", None)
            if vocab != target_vocab:
                raise ValueError(f"speculative_config['model'] has vocab_size {vocab}, the target has {target_vocab}: "
                                 "rejection sampling compares the two distributions token by token")
            return draft.eval()
        from servinglab.engine.draft_model import build_draft_model
        from servinglab.model.weights import to_transformers  # imported here: only the draft method needs it

        total = engine.hf_config.num_hidden_layers
        layers = cfg.draft_num_layers if cfg.draft_num_layers is not None else max(1, total // 4)
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < total:
            raise ValueError(f"speculative_config['draft_num_layers'] must be an integer in [1, {total - 1}], got {layers!r}")
        hf = to_transformers(engine.model)
        hf.set_attn_implementation("sdpa")  # the oracle's eager attention is the slow path
        return build_draft_model(hf, layers)

    # ------------------------------------------------------------------ proposing
    def _propose(self, engine: LLMEngine) -> tuple[dict[int, _Draft], set[int]]:
        """Append drafts to decoding sequences; return them and the ids of all decoding sequences."""
        sched, bm, bs = engine.scheduler, engine.block_manager, engine.config.block_size
        running = list(sched.running)
        decoding = [s for s in running if s.status is SequenceStatus.RUNNING and s.num_uncomputed_tokens == 1
                    and s.num_computed_tokens >= s.num_prompt_tokens]
        ids = {s.seq_id for s in decoding}
        # Drafts take only what the plain step leaves: its tokens, and one block per running sequence.
        budget = engine.config.max_num_batched_tokens - sum(1 if s.seq_id in ids else s.num_uncomputed_tokens for s in running)
        free_blocks = bm.num_free_blocks - len(running)
        if self.config.method == "draft":  # drop KV caches of sequences that left the batch
            self._draft_lms = {i: p for i, p in self._draft_lms.items() if i in ids}
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
            if self.config.method == "ngram":
                tokens = list(self.ngram.propose(seq.token_ids))[:room]
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

    # ------------------------------------------------------------------ verifying
    def _verify(self, items: list[tuple[_Draft, torch.Tensor, torch.Generator | None]]) -> list[tuple[list[int], int]]:
        """Rejection-sample each ``(draft, logits [v + 1, V], generator)``; unseeded rows share one batched call,
        a seeded row gets its own so its random stream does not depend on its batch."""
        groups: dict[object, list[int]] = collections.defaultdict(list)
        for i, (d, _, gen) in enumerate(items):
            groups[("shared", d.probs is None) if gen is None else ("own", i)].append(i)
        results: list[tuple[list[int], int]] = [([], 0)] * len(items)
        for rows in groups.values():
            vs = [items[i][1].shape[0] - 1 for i in rows]
            width, (_, vocab), dev = max(vs), items[rows[0]][1].shape, items[rows[0]][1].device
            ids = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
            target = torch.zeros(len(rows), width + 1, vocab, device=dev)
            q = None if items[rows[0]][0].probs is None else torch.zeros(len(rows), width, vocab, device=dev)
            for b, (i, v) in enumerate(zip(rows, vs)):
                d, logits, _ = items[i]
                ids[b, :v] = torch.tensor(d.tokens[:v])
                target[b, : v + 1] = probabilities(logits, d.seq.sampling_params)
                if q is not None:
                    q[b, :v] = d.probs[:v]
            out, acc = self.spec.rejection_sample(ids, q, target, items[rows[0]][2], torch.tensor(vs, device=dev))
            for b, i in enumerate(rows):
                n = int(acc[b])
                results[i] = (out[b, : n + 1].tolist(), n)
        return results

    # ------------------------------------------------------------------ the step
    def step(self, engine: LLMEngine) -> list[RequestOutput]:
        """One engine iteration with speculation (the plain step's contract: outputs of requests that progressed)."""
        start = time.perf_counter()
        drafts, decoding = self._propose(engine)
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
        seqs, logits, num_logits = engine.runner.execute_speculative(out, bm.block_tables, {i: len(d.tokens) for i, d in drafts.items()})
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.seq_id not in drafts:  # speculating sequences publish after the rollback
                bm.cache_blocks(item.seq.seq_id, item.seq.token_ids, item.seq.num_computed_tokens)
        self._strip(drafts)
        now = time.perf_counter()
        row_start = list(itertools.accumulate(num_logits, initial=0))
        plain = [i for i, n in enumerate(num_logits) if n == 1]
        spec = [i for i, n in enumerate(num_logits) if n > 1]
        emitted: dict[int, tuple[list[int], int, int]] = {}  # index -> (tokens, drafts verified, accepted)
        if plain:
            rows = [row_start[i] for i in plain]
            gens = [engine.generator_of(seqs[i]) for i in plain]
            tokens = sample(logits[rows], [seqs[i].sampling_params for i in plain], gens)
            emitted.update({i: ([t], 0, 0) for i, t in zip(plain, tokens)})
        if spec:
            items = [(drafts[seqs[i].seq_id], logits[row_start[i] : row_start[i + 1]],
                      engine.generator_of(seqs[i])) for i in spec]
            for i, (toks, acc) in zip(spec, self._verify(items)):
                emitted[i] = (toks, num_logits[i] - 1, acc)
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
                engine.fork_children(req, seq, logits[row_start[i] : row_start[i] + 1], now)
        engine.num_steps += 1
        if engine.record_steps:
            engine.log_step(start, out, was_prefill)
        return [engine.request_output(req) for req in touched.values() if req.stream or req.finished]

    def _record(self, request_id: str, verified: int, accepted: int, emitted: int) -> None:
        stats = self.request_stats.get(request_id)
        if stats is None:
            stats = self.request_stats[request_id] = SpecDecodeStats(self.k)
            while len(self.request_stats) > _KEEP_STATS:
                self.request_stats.popitem(last=False)
        stats.record(verified, accepted, emitted)
        self.stats.record(verified, accepted, emitted)


def generate_with_speculation(llm: Any, prompts: Any, sampling_params: Any = None, use_tqdm: bool = False) -> tuple[list[RequestOutput], list[SpecDecodeStats]]:
    """``llm.generate`` on an ``LLM`` built with ``speculative_config``, plus each request's counters.

    Raises:
        ValueError: the engine was built without ``speculative_config``.
    """
    decoder = getattr(llm.engine, "spec_decoder", None)
    if decoder is None:
        raise ValueError("generate_with_speculation needs an LLM built with speculative_config={'method': ..., 'num_speculative_tokens': k}")
    outs = llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
    return outs, [decoder.request_stats.get(o.request_id, SpecDecodeStats(decoder.k)) for o in outs]
