"""The model runner on CUDA: fused kernels, CUDA-graph decode, no host stalls.

What changes against :class:`~servinglab.engine.runner.ModelRunner` (the CPU path is
untouched):

- the model runs the Triton attention backend and the fused forward
  (:func:`servinglab.model.gpu_ops.enable_gpu_kernels`);
- a step's index arrays go to the GPU in **one** non-blocking copy from a pinned host
  buffer (:class:`PinnedUploader`); from pageable memory every ``.to("cuda")`` is a
  staged, synchronous copy, one per tensor;
- decode-only steps (every sequence brings one token) whose batch fits a capture size
  run padded to that size over static buffers and replay a CUDA graph
  (:class:`~servinglab.model.cuda_graphs.CUDAGraphRunner`); with ``enforce_eager``
  (vLLM's flag) the same padded step is launched eagerly, so both modes give the same
  tokens. Prefills, mixed steps, speculative verification and batches beyond the
  largest capture size run eagerly, unpadded;
- the step's one device-to-host transfer is the sampler's ``argmax(...).tolist()``
  (and one draw per non-greedy row, as on the CPU: sampling stays exact).
"""

from __future__ import annotations

import numpy as np
import torch

from servinglab.engine.config import EngineConfig
from servinglab.engine.runner import ModelRunner
from servinglab.interfaces import SchedulerOutput
from servinglab.model.cuda_graphs import CUDAGraphRunner
from servinglab.model.llama import KVCache, LlamaForCausalLM
from servinglab.sequence import Sequence


class PinnedUploader:
    """Packs named arrays into one pinned byte buffer and sends it with one copy.

    Each array keeps its dtype (int64 slots and ids, int32 tables and lengths, as
    :class:`~servinglab.interfaces.AttentionMetadata` documents): its bytes sit at an
    8-byte-aligned offset and the device side reads them back through ``view(dtype)``.
    The pinned buffer is reused: before refilling it, :meth:`upload` waits on the event
    recorded after the previous copy, so a copy still in flight never sees new data.
    """

    def __init__(self, device: torch.device, capacity: int = 1 << 20) -> None:
        self.device = device
        self._grow(capacity)
        self.copied = torch.cuda.Event()

    def _grow(self, capacity: int) -> None:
        self.host = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        total = sum(-(-a.nbytes // 8) * 8 for a in arrays.values())
        self.copied.synchronize()
        if total > self.host.numel():
            self._grow(max(total, 2 * self.host.numel()))
        offset, spans = 0, {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            self.host_np[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
            spans[name] = (offset, array.nbytes, array.dtype, array.shape)
            offset += -(-array.nbytes // 8) * 8
        dev = self.dev[:offset]
        dev.copy_(self.host[:offset], non_blocking=True)
        self.copied.record()
        return {
            name: dev[o : o + n].view(torch.from_numpy(np.empty(0, dtype)).dtype).view(shape)
            for name, (o, n, dtype, shape) in spans.items()
        }


class CudaModelRunner(ModelRunner):
    """:class:`ModelRunner` for a CUDA device.

    Args:
        model, kv_caches, block_size, device: as for :class:`ModelRunner`.
        max_num_seqs: the scheduler's largest batch (caps the capture sizes).
        max_model_len: longest sequence (block-table width of the graphs).
        enforce_eager: never use CUDA graphs (vLLM's flag).
    """

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int, device: torch.device | str,
        max_num_seqs: int, max_model_len: int, enforce_eager: bool = False,
    ) -> None:
        super().__init__(model, kv_caches, block_size, device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaModelRunner needs a CUDA device, got {self.device}")
        from servinglab.model.gpu_ops import enable_gpu_kernels  # imports Triton: CUDA only
        from servinglab.model.triton.decode_attention import SPLIT_MIN_CONTEXT

        enable_gpu_kernels(model)
        self.uploader = PinnedUploader(self.device)
        self.enforce_eager = enforce_eager
        self.num_graph_steps = 0  # decode steps that replayed a graph
        # Decode steps run padded over static buffers in both modes (identical kernels and
        # shapes, hence identical greedy tokens); only the capture depends on enforce_eager.
        max_blocks = -(-max_model_len // block_size)
        # Two context buckets: below SPLIT_MIN_CONTEXT the decode kernel runs single-pass,
        # above it split-KV may pay; each captured size gets one graph per bucket.
        self.graphs = CUDAGraphRunner(model, kv_caches, max_num_seqs, max_blocks, max_model_len,
                                      context_buckets=[SPLIT_MIN_CONTEXT - 1])
        if not enforce_eager:
            self.graphs.capture()

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One pinned buffer, one non-blocking copy (see :class:`PinnedUploader`)."""
        return self.uploader.upload(arrays)

    def _decode_arrays(self, out: SchedulerOutput, block_tables: dict[int, list[int]]) -> tuple[np.ndarray, ...] | None:
        """Graph inputs of a decode-only step (one token per sequence, each sampling), else ``None``."""
        n = len(out.scheduled)
        if self.graphs.padded_size(n) is None:
            return None
        bs = self.block_size
        ids, pos, tables = np.empty(n, np.int64), np.empty(n, np.int64), []
        for i, item in enumerate(out.scheduled):
            seq = item.seq
            p = seq.num_computed_tokens
            if item.num_new_tokens != 1 or p + 1 != seq.num_tokens:
                return None  # a prefill chunk: the general path
            table = block_tables.get(seq.seq_id)
            if table is None or len(table) * bs <= p:
                raise ValueError(f"{seq} needs {p // bs + 1} blocks for {p + 1} tokens, has {0 if table is None else len(table)}")
            prompt_len = seq.num_prompt_tokens
            ids[i] = seq.prompt_token_ids[p] if p < prompt_len else seq.output_token_ids[p - prompt_len]
            pos[i] = p
            tables.append(table)
        width = max(len(t) for t in tables)
        if width > self.graphs.max_blocks:
            return None
        table_np = np.zeros((n, width), dtype=np.int64)
        for b, t in enumerate(tables):
            table_np[b, : len(t)] = t
        slots = table_np[np.arange(n), pos // bs] * bs + pos % bs
        return ids, pos, slots, pos + 1, table_np

    def execute(self, out: SchedulerOutput, block_tables: dict[int, list[int]]) -> tuple[list[Sequence], torch.Tensor]:
        """As :meth:`ModelRunner.execute`; a decode-only step that fits a graph replays it."""
        arrays = self._decode_arrays(out, block_tables)
        if arrays is None:
            return super().execute(out, block_tables)
        self.copy_blocks(out.block_copies)
        with torch.inference_mode():
            hidden = self.graphs.run(*arrays)
            logits = self.model.compute_logits(hidden)
        self.num_graph_steps += self.graphs.captured
        return [item.seq for item in out.scheduled], logits


def make_runner(
    model: LlamaForCausalLM, kv_caches: list[KVCache], config: EngineConfig, device: torch.device, max_model_len: int,
) -> ModelRunner:
    """The runner for ``device``: :class:`CudaModelRunner` on CUDA, :class:`ModelRunner` elsewhere."""
    if device.type == "cuda" and isinstance(model, LlamaForCausalLM):
        return CudaModelRunner(model, kv_caches, config.block_size, device, config.max_num_seqs, max_model_len,
                               config.enforce_eager)
    return ModelRunner(model, kv_caches, config.block_size, device)
