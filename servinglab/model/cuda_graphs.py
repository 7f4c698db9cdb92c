"""Decode steps as CUDA-graph replays over static input buffers (vLLM's ``CUDAGraphRunner``).

A small model's decode step is hundreds of short kernels; launched one by one from
Python, the host cannot keep the GPU busy. A CUDA graph records the whole forward once
per batch size and replays it with a single launch. A graph replays *fixed* addresses,
so every input lives in a static buffer the step copies into before the replay:

- ``input_ids``, ``positions``, ``slot_mapping``, ``context_lens`` (``[max_batch]`` each)
  and ``block_tables`` (``[max_batch, max_blocks]``) are views of **one** int32 device
  buffer, mirrored by one pinned host buffer: the step fills the host copy with NumPy
  and sends it with a single non-blocking copy (no pageable staging, no per-tensor
  copies);
- a batch of ``n`` runs the graph of the next captured size ``>= n``; the padding lanes
  get slot ``-1`` (the KV write skips them) and context length 0 (attention writes 0);
- the attention backend may specialise on ``max_context_len`` (the split-KV rule), so
  each size is captured once per *context bucket* (the engine's runner passes 256 and
  1024; ``max_model_len`` is always one), so a graph's split count fits the contexts it
  serves; a step replays the graph of the smallest bucket that holds its longest context;
- the capture sizes are vLLM's defaults, ``[1, 2, 4] + range(8, 256, 8) +
  range(256, max + 1, 16)``, capped by ``max_num_seqs``; larger batches, prefills and
  mixed steps run eagerly.

The graph holds the decoder up to the final norm; the LM head runs eagerly on the real
rows only (``n`` rows, not the padded batch). A runner built with ``num_layers`` holds an
early exit instead: the first ``num_layers`` layers, then the final norm (the draft model
of self-speculative decoding, :mod:`servinglab.engine.draft_runner`).

Speculative verification (``query_len = 1 + k``) is the same uniform shape with
``query_len`` rows per lane (the last token and up to ``k`` drafts): ids, positions and
slots hold ``query_len`` entries per lane, a lane's context length counts all of its
``query_len`` rows, and rows past a lane's real drafts are padding (slot ``-1``: nothing
written; their outputs are never read; the real rows before them never see them, since
attention is causal). The engine's CUDA runner keeps one such runner beside the plain one.

Without graphs (``enforce_eager``) the same padded step is launched eagerly over the
same buffers. So both modes run the very same kernels on the very same shapes (a
matrix product's reduction order depends on its row count, the attention split count
on the batch size) and greedy decoding gives identical tokens with and without graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from servinglab.interfaces import AttentionMetadata
from servinglab.model.llama import KVCache, LlamaForCausalLM


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's default CUDA-graph batch sizes, those ``<= max_num_seqs``, ascending."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, max_num_seqs + 1, 16)]
    return [s for s in sizes if s <= max_num_seqs]


class CUDAGraphRunner:
    """Captures the model's decode step at each batch size and replays it (or launches it eagerly).

    Args:
        model: the model on CUDA, its fused forward enabled (:mod:`servinglab.model.gpu_ops`).
        kv_caches: the engine's per-layer caches (the graphs read and write them in place).
        max_num_seqs: largest decode batch the engine schedules.
        max_blocks_per_seq: block-table width (``ceil(max_model_len / block_size)``).
        max_model_len: longest context.
        capture_sizes: batch sizes to capture (default :func:`default_capture_sizes`).
        context_buckets: ``max_context_len`` values to capture each size with (at most
            ``max_model_len``; default: ``max_model_len`` alone).
        query_len: query rows per lane (1: decode; ``1 + k``: speculative verification).
        pool: a memory pool to share (the plain runner's, for the others).
        num_layers: run only the first ``num_layers`` layers, then the final norm (the
            early-exit draft of :mod:`servinglab.engine.draft_runner`); ``None``: all.
    """

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[KVCache], max_num_seqs: int, max_blocks_per_seq: int,
        max_model_len: int, capture_sizes: list[int] | None = None, context_buckets: list[int] | None = None,
        query_len: int = 1, pool: object | None = None, num_layers: int | None = None,
    ) -> None:
        if query_len < 1:
            raise ValueError(f"query_len must be >= 1, got {query_len}")
        self.model, self.kv_caches = model, kv_caches
        self.device = kv_caches[0][0].device
        self.sizes = sorted(capture_sizes or default_capture_sizes(max_num_seqs))
        self.max_batch, self.max_blocks, self.max_model_len = self.sizes[-1], max_blocks_per_seq, max_model_len
        self.buckets = sorted({min(b, max_model_len) for b in (context_buckets or [])} | {max_model_len})
        self.query_len = q = query_len
        b = self.max_batch
        # [ids | positions | slots (query_len per lane) | context lens | block tables], one int32 layout on both sides.
        self._sections = [0, b * q, 2 * b * q, 3 * b * q, 3 * b * q + b]
        total = self._sections[4] + b * max_blocks_per_seq
        self.static = torch.zeros(total, dtype=torch.int32, device=self.device)
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self.host_np = self.host.numpy()
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=self.device) * q
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (size, context bucket)
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.copy_done = torch.cuda.Event() if self.device.type == "cuda" else None
        # The bytes a step of each size sends: everything up to its last block-table row.
        # Views made once, not per step (each slice costs host time on the critical path).
        ends = {n: self._sections[4] + n * max_blocks_per_seq for n in self.sizes}
        self._copy_spans = {n: (self.static[:e], self.host[:e]) for n, e in ends.items()}
        self.pool = pool  # a memory pool to share (the plain runner's, for the speculative one)
        self.num_layers = num_layers
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self.host_np[self._sections[2] : self._sections[3]] = -1  # slots: write nothing
        self.host_np[self._sections[3] : self._sections[4]] = 0  # context lengths: empty
        self.static.copy_(self.host)

    def _views(self, n: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids, pos, slots, ctx, tables = self._sections
        s, t = self.static, n * self.query_len
        metadata = AttentionMetadata(
            slot_mapping=s[slots : slots + t], block_tables=s[tables:].view(self.max_batch, self.max_blocks)[:n],
            context_lens=s[ctx : ctx + n], query_start_loc=self.query_start_loc[: n + 1],
            max_query_len=self.query_len, max_context_len=bucket,
        )
        return s[ids : ids + t], s[pos : pos + t], metadata

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per capture size, largest first, sharing one memory pool."""
        self._reset_buffers()
        for n in reversed(self.sizes):
            for bucket in self.buckets:
                ids, pos, metadata = self._views(n, bucket)
                self.model(ids, pos, metadata, self.kv_caches, self.num_layers)  # warm-up: Triton compiles, cuBLAS picks
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[n, bucket] = self.model(ids, pos, metadata, self.kv_caches, self.num_layers)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[n, bucket] = graph
        torch.cuda.synchronize(self.device)

    def padded_size(self, n: int) -> int | None:
        """The captured size a batch of ``n`` runs at, or ``None`` when it must run eagerly."""
        for size in self.sizes:
            if size >= n:
                return size
        return None

    def host_inputs(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Writable NumPy views of the pinned inputs of a ``size``-lane step, to fill in place.

        Returns ``(input_ids, positions, slot_mapping, context_lens, block_tables)``: the
        first three ``[size * query_len]`` (lane ``b``'s rows at ``b * query_len + i``),
        the lengths ``[size]``, the tables ``[size, max_blocks_per_seq]``. Waits first for
        the previous step's copy to leave the buffer. A table row needs entries only
        up to its context (the kernels read no further), so rows are not cleared.
        """
        if self.copy_done is not None:
            self.copy_done.synchronize()
        h, t = self.host_np, size * self.query_len
        ids, pos, slots, ctx, tables = self._sections
        return (h[ids : ids + t], h[pos : pos + t], h[slots : slots + t], h[ctx : ctx + size],
                h[tables : tables + size * self.max_blocks].reshape(size, self.max_blocks))

    def replay(self, n: int, size: int, longest: int, patch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Send the inputs filled through :meth:`host_inputs` (``n`` real lanes of ``size``) and run the step.

        Lanes ``n..size`` become padding (slot ``-1``, context 0). ``longest`` (the
        largest context length) picks the context bucket. ``patch = (rows, tokens)``: input
        ids already on the device (the previous step's samples, overlap scheduling), written
        over the uploaded ones before the replay. Returns hidden ``[n * query_len, hidden]``.
        """
        h, q = self.host_np, self.query_len
        ids, _, slots, ctx, _ = self._sections
        h[ids + n * q : ids + size * q] = 0  # a valid token id (a lane may hold an overlap placeholder from before)
        h[slots + n * q : slots + size * q] = -1
        h[ctx + n : ctx + size] = 0
        dev, host = self._copy_spans[size]
        dev.copy_(host, non_blocking=True)
        if self.copy_done is not None:
            self.copy_done.record()
        if patch is not None:  # the ids section starts at 0; stream order puts this after the copy
            self.static[patch[0]] = patch[1].to(self.static.dtype)
        bucket = next((b for b in self.buckets if b >= longest), self.max_model_len)
        graph = self.graphs.get((size, bucket))
        if graph is None:  # not captured (enforce_eager): the same padded step, launched eagerly
            with torch.inference_mode():
                ids_v, pos_v, metadata = self._views(size, bucket)
                return self.model(ids_v, pos_v, metadata, self.kv_caches, self.num_layers)[: n * q]
        graph.replay()
        return self.outputs[size, bucket][: n * q]

    def run(
        self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray, context_lens: np.ndarray,
        block_tables: np.ndarray,
    ) -> torch.Tensor:
        """Replay the step of ``n = len(context_lens)`` lanes from whole arrays; return hidden ``[n * query_len, hidden]``.

        ``block_tables`` is ``[n, w]`` with ``w <= max_blocks_per_seq``. (The engine's
        runner fills :meth:`host_inputs` directly instead, saving the copies.)
        """
        n = len(context_lens)
        size = self.padded_size(n)
        if size is None or n == 0:
            raise ValueError(f"batch of {n} is outside the captured sizes 1..{self.max_batch}")
        if block_tables.shape[1] > self.max_blocks:
            raise ValueError(f"block tables are {block_tables.shape[1]} wide, the graphs hold {self.max_blocks}")
        ids, pos, slots, ctx, tables = self.host_inputs(size)
        t = n * self.query_len
        ids[:t], pos[:t], slots[:t], ctx[:n] = input_ids, positions, slot_mapping, context_lens
        tables[:n, : block_tables.shape[1]] = block_tables
        return self.replay(n, size, int(context_lens.max()))

    @property
    def captured(self) -> bool:
        """Whether :meth:`capture` recorded the graphs (``False``: padded eager launches)."""
        return bool(self.graphs)
