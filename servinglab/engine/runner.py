"""Turn a scheduled step into tensors and run the model (nano-vllm's ``model_runner``).

The scheduler (Part 4) decides *which* tokens run this step: for each scheduled sequence,
``num_new_tokens`` tokens starting at ``seq.num_computed_tokens``. The runner flattens
them into one batch of ``T`` tokens, computes where each token's K/V goes (the slot
mapping, through the sequence's block table from Part 2), runs the model once, and
returns logits only for the sequences whose step reaches their last token, i.e. those
that sample a token now. A chunk in the middle of a chunked prefill samples nothing.

Speculative decoding (:mod:`servinglab.engine.spec_decode`) appends ``d`` draft tokens to a
decoding sequence before scheduling, so the step computes ``1 + d`` tokens for it; the
runner then returns one logits row per position from the last real token on, so the
target's distributions at every draft position come out of the same forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from servinglab.engine.step_protocol import TokenPatch
from servinglab.interfaces import AttentionMetadata, SchedulerOutput
from servinglab.model.llama import KVCache, LlamaForCausalLM
from servinglab.sequence import Sequence


@dataclass
class PreparedBatch:
    """One step's model inputs.

    Attributes:
        input_ids: ``[T]`` int64 token ids of every scheduled token, sequence after sequence.
        positions: ``[T]`` int64 position of each token in its sequence.
        metadata: what Part 3 needs (slot mapping, block tables, lengths).
        logits_indices: int64 rows of the batch whose logits are computed, sequence after sequence.
        sample_seqs: the ``S`` sequences those rows belong to, in the same order.
        num_logits: logits rows per sample sequence (1, or ``1 + drafts verified`` with
            speculation); empty means one row each.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    logits_indices: torch.Tensor
    sample_seqs: list[Sequence]
    num_logits: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class ModelRunner:
    """Runs :class:`~servinglab.model.LlamaForCausalLM` on scheduled batches over a paged KV cache.

    Args:
        model: the model (its parameters already on ``device``).
        kv_caches: one ``(k_cache, v_cache)`` per layer, each ``[num_blocks, block_size, kv_heads, head_dim]``.
        block_size: tokens per block; must match the cache tensors.
        device: where the step's index tensors are built.
    """

    def __init__(self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int, device: torch.device | str) -> None:
        if not kv_caches or kv_caches[0][0].shape[1] != block_size:
            raise ValueError(f"block_size {block_size} does not match the KV cache tensors")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_blocks = int(kv_caches[0][0].shape[0])
        self.device = torch.device(device)
        # Part 2's ``get_slot(seq_id, position)``; the engine sets it to its block manager's.
        self.slot_of: Callable[[int, int], int] | None = None
        # preemption_mode="swap": the host pool (the engine sets it) and blocks moved so far, both ways.
        self.host_caches: list[KVCache] | None = None
        self.num_swapped_blocks = 0

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def prepare_inputs(
        self, out: SchedulerOutput, block_tables: dict[int, list[int]], num_draft_tokens: Mapping[int, int] | None = None
    ) -> PreparedBatch:
        """Flatten ``out.scheduled`` into model inputs.

        Args:
            out: the step; each entry computes tokens
                ``seq.token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]``.
            block_tables: ``seq_id -> block ids`` (Part 2's tables), covering at least the
                positions written this step.
            num_draft_tokens: ``seq_id -> d`` for sequences whose last ``d`` tokens are
                speculative drafts. Such a sequence samples once the step reaches its last
                *real* token, and gets a logits row for that token and for every draft the
                step computed (``end - real_len + 1`` rows). ``None``: no speculation.

        Returns:
            The :class:`PreparedBatch`; ``context_lens = num_computed_tokens + num_new_tokens``.
        """
        if out.is_empty:
            raise ValueError("cannot prepare an empty step (SchedulerOutput.scheduled is empty)")
        bs = self.block_size
        token_ids: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        num_logits: list[int] = []
        num_rows = 0
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n <= 0 or end > seq.num_tokens:
                raise ValueError(
                    f"num_new_tokens must be in 1..{seq.num_uncomputed_tokens} for {seq}, got {n}"
                )
            table = block_tables.get(seq.seq_id)
            needed = -(-end // bs)
            if table is None or len(table) < needed:
                have = "no block table" if table is None else f"{len(table)} blocks"
                raise ValueError(f"{seq} needs {needed} blocks for {end} tokens, has {have}")
            prompt_len = seq.num_prompt_tokens
            if end <= prompt_len:
                token_ids.extend(seq.prompt_token_ids[start:end])
            elif start >= prompt_len:  # decode: avoid building prompt + output every step
                token_ids.extend(seq.output_token_ids[start - prompt_len : end - prompt_len])
            else:
                token_ids.extend(seq.token_ids[start:end])
            q_lens.append(n)
            ctx_lens.append(end)
            tables.append(table[:needed])
            num_rows += n
            if num_draft_tokens is None:
                if end == seq.num_tokens:  # the step reaches the last token: sample the next one
                    logits_rows.append(num_rows - 1)
                    sample_seqs.append(seq)
            else:
                real_end = seq.num_tokens - num_draft_tokens.get(seq.seq_id, 0)
                if end >= real_end:  # rows for the last real token and each computed draft
                    rows = end - real_end + 1
                    logits_rows.extend(range(num_rows - rows, num_rows))
                    sample_seqs.append(seq)
                    num_logits.append(rows)

        num_seqs = len(q_lens)
        q_lens_np = np.asarray(q_lens, dtype=np.int64)
        ctx_np = np.asarray(ctx_lens, dtype=np.int64)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens_np, out=query_start_loc[1:])
        # Position of every token: its row index minus its sequence's first row, plus the
        # sequence's first new position (num_computed = context_len - query_len).
        seq_of_row = np.repeat(np.arange(num_seqs), q_lens_np)
        positions = np.arange(num_rows) - query_start_loc[:-1][seq_of_row] + (ctx_np - q_lens_np)[seq_of_row]
        max_blocks = max(len(t) for t in tables)
        table_np = np.zeros((num_seqs, max_blocks), dtype=np.int64)  # padded with block 0
        for b, t in enumerate(tables):
            table_np[b, : len(t)] = t
        # Every new token's cache slot comes from the student's Part 2 (``get_slot``:
        # block_table[p // block_size] * block_size + p % block_size, vLLM paper section 4.1);
        # without a block manager (tests that drive the runner alone) the same formula runs here.
        if self.slot_of is not None:
            ids_of_row = [item.seq.seq_id for item in out.scheduled for _ in range(item.num_new_tokens)]
            slots = np.fromiter(map(self.slot_of, ids_of_row, positions.tolist()), dtype=np.int64, count=num_rows)
        else:
            slots = table_np[seq_of_row, positions // bs] * bs + positions % bs

        t = self.upload({
            "slot_mapping": slots, "block_tables": table_np.astype(np.int32), "context_lens": ctx_np.astype(np.int32),
            "query_start_loc": query_start_loc.astype(np.int32), "input_ids": np.asarray(token_ids, dtype=np.int64),
            "positions": positions, "logits_indices": np.asarray(logits_rows, dtype=np.int64),
        })
        metadata = AttentionMetadata(
            slot_mapping=t["slot_mapping"],
            block_tables=t["block_tables"],
            context_lens=t["context_lens"],
            query_start_loc=t["query_start_loc"],
            max_query_len=max(q_lens),
            max_context_len=max(ctx_lens),
            context_lens_list=ctx_lens,
            query_lens_list=q_lens,
        )
        return PreparedBatch(
            input_ids=t["input_ids"],
            positions=t["positions"],
            metadata=metadata,
            logits_indices=t["logits_indices"],
            sample_seqs=sample_seqs,
            num_logits=num_logits,
        )

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The step's index arrays as tensors on the runner's device (one call per step).

        On a CPU this wraps the arrays without a copy; the CUDA runner
        (:mod:`servinglab.engine.cuda_runner`) packs them into one pinned buffer and one copy.
        """
        return {name: self._tensor(array) for name, array in arrays.items()}

    def move_blocks(self, out: SchedulerOutput) -> None:
        """All of a step's block moves, in the order that keeps every one correct.

        Swap-outs first: the blocks they free may be handed to another sequence in this
        very step (as a fresh block or a copy-on-write target). Then swap-ins, then the
        copy-on-write copies. (A step that swaps out admits nobody, so it swaps nothing in.)
        """
        self.swap_blocks(out.blocks_to_swap_out, to_host=True)
        self.swap_blocks(out.blocks_to_swap_in, to_host=False)
        self.copy_blocks(out.block_copies)

    def swap_blocks(self, pairs: list[tuple[int, int]], to_host: bool) -> None:
        """Copy K/V blocks device -> host (``(device, host)`` pairs) or host -> device (``(host, device)``)."""
        if not pairs:
            return
        if self.host_caches is None:
            raise ValueError("this runner has no host pool: build the engine with preemption_mode='swap'")
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long)
        with torch.inference_mode():
            for (k_dev, v_dev), (k_host, v_host) in zip(self.kv_caches, self.host_caches):
                if to_host:  # gather on the device, one transfer per tensor, scatter on the host
                    k_host.index_copy_(0, dst, k_dev.index_select(0, src.to(self.device)).to("cpu"))
                    v_host.index_copy_(0, dst, v_dev.index_select(0, src.to(self.device)).to("cpu"))
                else:
                    d = dst.to(self.device)
                    k_dev.index_copy_(0, d, k_host.index_select(0, src).to(self.device, non_blocking=True))
                    v_dev.index_copy_(0, d, v_host.index_select(0, src).to(self.device, non_blocking=True))
        self.num_swapped_blocks += len(pairs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: for each ``(src, dst)``, copy block ``src`` into ``dst`` in every layer's K and V."""
        if not pairs:
            return
        if any(not (0 <= b < self.num_blocks) for pair in pairs for b in pair):
            raise ValueError(f"block ids in {pairs} must be in 0..{self.num_blocks - 1}")
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            for k_cache, v_cache in self.kv_caches:
                # index_select makes a copy first, so a dst that is also a src reads the old data.
                k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
                v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def patch_positions(self, out: SchedulerOutput, patch: TokenPatch | None, rows_per_lane: int | None = None
                        ) -> dict[str, torch.Tensor] | None:
        """:meth:`TokenPatch.positions` as device tensors ``{"rows", "src"}`` (through :meth:`upload`:
        pinned and non-blocking on CUDA, so the host never waits for the step in flight), or ``None``."""
        found = None if patch is None else patch.positions(out, rows_per_lane)
        return None if found is None else self.upload({"rows": found[0], "src": found[1]})

    def execute(self, out: SchedulerOutput, block_tables: dict[int, list[int]], patch: TokenPatch | None = None
                ) -> tuple[list[Sequence], torch.Tensor]:
        """Run one step: block copies, then the model.

        ``patch``: input tokens still on the device (overlap scheduling, :class:`TokenPatch`).

        Returns:
            ``(sample_seqs, logits)`` with float32 ``logits[i]`` (``[vocab]``) for the next
            token of ``sample_seqs[i]``; ``([], [0, vocab])`` when no sequence samples.
        """
        self.move_blocks(out)
        batch = self.prepare_inputs(out, block_tables)
        where = self.patch_positions(out, patch)
        if where is not None:
            batch.input_ids[where["rows"]] = patch.tokens[where["src"]].to(batch.input_ids.dtype)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, batch.metadata, self.kv_caches)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        return batch.sample_seqs, logits

    def execute_speculative(
        self, out: SchedulerOutput, block_tables: dict[int, list[int]], num_draft_tokens: Mapping[int, int]
    ) -> tuple[list[Sequence], torch.Tensor, list[int]]:
        """Like :meth:`execute`, with several logits rows per speculating sequence.

        Returns:
            ``(sample_seqs, logits, num_logits)``: ``logits`` stacks ``num_logits[i]`` float32
            rows for ``sample_seqs[i]``, the target's next-token logits after its last real
            token and after each of its first ``num_logits[i] - 1`` drafts.
        """
        self.move_blocks(out)
        batch = self.prepare_inputs(out, block_tables, num_draft_tokens)
        with torch.inference_mode():
            hidden = self.model(batch.input_ids, batch.positions, batch.metadata, self.kv_caches)
            logits = self.model.compute_logits(hidden[batch.logits_indices])
        return batch.sample_seqs, logits, batch.num_logits
