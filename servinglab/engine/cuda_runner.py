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


CONTEXT_BUCKETS = (256, 1024)  # plus max_model_len: the graphs' max_context_len values


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

        enable_gpu_kernels(model)
        self.uploader = PinnedUploader(self.device)
        self.enforce_eager = enforce_eager
        self.num_graph_steps = 0  # decode steps that replayed a graph
        # Decode steps run padded over static buffers in both modes (identical kernels and
        # shapes, hence identical greedy tokens); only the capture depends on enforce_eager.
        max_blocks = -(-max_model_len // block_size)
        # The decode kernel's split count follows the longest context a graph may see, so
        # each captured size gets one graph per context bucket: short contexts then run
        # few, full splits rather than many empty ones.
        self.graphs = CUDAGraphRunner(model, kv_caches, max_num_seqs, max_blocks, max_model_len,
                                      context_buckets=list(CONTEXT_BUCKETS))
        if not enforce_eager:
            self.graphs.capture()

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One pinned buffer, one non-blocking copy (see :class:`PinnedUploader`)."""
        return self.uploader.upload(arrays)

    def _fill_decode(self, out: SchedulerOutput, block_tables: dict[int, list[int]]) -> tuple[int, int, int] | None:
        """Write a decode-only step's inputs straight into the graphs' pinned buffer.

        Returns ``(n, padded size, longest context)``, or ``None`` when the step is not
        decode-only (a prefill chunk, a batch beyond the captured sizes, a table wider
        than the graphs) and must take the general path.
        """
        n = len(out.scheduled)
        size = self.graphs.padded_size(n)
        if size is None:
            return None
        bs, width, slot_of = self.block_size, self.graphs.max_blocks, self.slot_of
        # One pass: a step that turns out not to be decode-only leaves lanes written that
        # no copy sends (host_inputs waited for the previous copy), so bailing out is safe.
        ids, pos, slots, ctx, tables = self.graphs.host_inputs(size)
        longest = 0
        for i, item in enumerate(out.scheduled):
            seq = item.seq
            p = seq.num_computed_tokens
            if item.num_new_tokens != 1 or p + 1 != seq.num_tokens:
                return None  # a prefill chunk: the general path
            table = block_tables.get(seq.seq_id)
            if table is None or len(table) * bs <= p:
                raise ValueError(f"{seq} needs {p // bs + 1} blocks for {p + 1} tokens, has {0 if table is None else len(table)}")
            used = p // bs + 1  # the kernels read entries up to the context only
            if used > width:
                return None
            prompt_len = seq.num_prompt_tokens
            ids[i] = seq.prompt_token_ids[p] if p < prompt_len else seq.output_token_ids[p - prompt_len]
            pos[i] = p
            # The new token's slot: Part 2's get_slot when the engine wired it in.
            slots[i] = slot_of(seq.seq_id, p) if slot_of is not None else table[p // bs] * bs + p % bs
            ctx[i] = p + 1
            tables[i, :used] = table[:used]
            longest = max(longest, p + 1)
        return n, size, longest

    def execute(self, out: SchedulerOutput, block_tables: dict[int, list[int]]) -> tuple[list[Sequence], torch.Tensor]:
        """As :meth:`ModelRunner.execute`; a decode-only step that fits a graph replays it."""
        step = self._fill_decode(out, block_tables)
        if step is None:
            return super().execute(out, block_tables)
        self.move_blocks(out)
        with torch.inference_mode():
            hidden = self.graphs.replay(*step)
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
