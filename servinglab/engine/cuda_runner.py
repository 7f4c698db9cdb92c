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
  tokens. Speculative verification steps whose sequences all decode (each brings its
  last token and ``d <= k`` drafts) replay the graphs of a second runner with ``1 + k``
  query rows per lane (:meth:`CudaModelRunner.execute_verify`; lanes with fewer drafts
  are padded). Prefills, mixed steps and batches beyond the largest capture size run
  eagerly, unpadded;
- the step's one device-to-host transfer is the sampler's ``argmax(...).tolist()``
  (and one draw per non-greedy row, as on the CPU: sampling stays exact).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from servinglab.engine.config import EngineConfig
from servinglab.engine.draft_model import early_exit_layers
from servinglab.engine.draft_runner import DeviceDrafts, EarlyExitDrafter
from servinglab.engine.runner import ModelRunner
from servinglab.engine.step_protocol import TokenPatch
from servinglab.interfaces import SchedulerOutput
from servinglab.model.attention_backend import MAX_DECODE_QUERY_LEN
from servinglab.model.cuda_graphs import CUDAGraphRunner
from servinglab.model.llama import KVCache, LlamaForCausalLM
from servinglab.sequence import Sequence


CONTEXT_BUCKETS = (256, 1024)  # plus max_model_len: the graphs' max_context_len values


class PinnedUploader:
    """Packs named arrays into one pinned byte buffer and sends it with one copy.

    Each array keeps its dtype (int64 slots and ids, int32 tables and lengths, as
    :class:`~servinglab.interfaces.AttentionMetadata` documents): its bytes sit at an
    8-byte-aligned offset and the device side reads them back through ``view(dtype)``.
    Pinned buffers are reused round-robin (``SLOTS`` of them): before refilling one,
    :meth:`upload` waits on the event recorded after that buffer's last copy, so a copy
    still in flight never sees new data. With overlap scheduling a step uploads while the
    previous step still runs, and its copies queue behind it: waiting on the copy just
    made would wait for that step; waiting on one ``SLOTS`` uploads back does not.
    """

    SLOTS = 3

    def __init__(self, device: torch.device, capacity: int = 1 << 20) -> None:
        self.device = device
        self.slots = [self._buffers(capacity) for _ in range(self.SLOTS)]
        self.events = [torch.cuda.Event() if device.type == "cuda" else None for _ in range(self.SLOTS)]
        self.turn = 0

    def _buffers(self, capacity: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
        host = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return host, host.numpy(), torch.empty(capacity, dtype=torch.uint8, device=self.device)

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        total = sum(-(-a.nbytes // 8) * 8 for a in arrays.values())
        slot, self.turn = self.turn, (self.turn + 1) % self.SLOTS
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        host, host_np, dev_buf = self.slots[slot]
        if total > host.numel():
            self.slots[slot] = host, host_np, dev_buf = self._buffers(max(total, 2 * host.numel()))
        offset, spans = 0, {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            host_np[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
            spans[name] = (offset, array.nbytes, array.dtype, array.shape)
            offset += -(-array.nbytes // 8) * 8
        dev = dev_buf[:offset]
        dev.copy_(host[:offset], non_blocking=True)
        if event is not None:
            event.record()
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
        num_speculative_tokens: ``k`` of ``speculative_config`` (0: none); with ``k`` the
            runner also captures verification steps of ``1 + k`` rows per sequence.
        capture_sizes: batch sizes to capture (default: vLLM's, up to ``max_num_seqs``;
            ``EngineConfig.extra["cuda_graph_sizes"]``, vLLM's ``cuda_graph_sizes``).
        draft_num_layers: ``L`` of an early-exit draft (the ``draft`` method without a
            model of its own; 0: none): the runner also captures the first ``L`` layers'
            decode step (:class:`~servinglab.engine.draft_runner.EarlyExitDrafter`).
    """

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[KVCache], block_size: int, device: torch.device | str,
        max_num_seqs: int, max_model_len: int, enforce_eager: bool = False, num_speculative_tokens: int = 0,
        capture_sizes: list[int] | None = None, draft_num_layers: int = 0,
    ) -> None:
        super().__init__(model, kv_caches, block_size, device)
        from servinglab.model.gpu_ops import enable_gpu_kernels  # imports Triton: CUDA only
        from servinglab.model.triton.interpret import interpreting

        if self.device.type != "cuda" and not (interpreting() and enforce_eager):  # CPU tests: interpreted kernels, no graphs
            raise ValueError(f"CudaModelRunner needs a CUDA device, got {self.device}")

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
                                      capture_sizes=capture_sizes, context_buckets=list(CONTEXT_BUCKETS))
        if not enforce_eager:
            self.graphs.capture()
        self.num_verify_steps = 0  # verification steps on the uniform (1 + k rows per lane) path
        self.num_verify_graph_steps = 0  # of those, steps that replayed a graph
        self.verify_graphs: CUDAGraphRunner | None = None
        if num_speculative_tokens > 0:
            q = num_speculative_tokens + 1
            # A lane's context counts all 1 + k rows, padding included: the table reaches k positions further.
            self.verify_graphs = CUDAGraphRunner(model, kv_caches, max_num_seqs, -(-(max_model_len + q) // block_size),
                                                 max_model_len + q, capture_sizes=capture_sizes, context_buckets=list(CONTEXT_BUCKETS),
                                                 query_len=q, pool=self.graphs.pool)
            if not enforce_eager:
                self.verify_graphs.capture()
        self.drafter: EarlyExitDrafter | None = None
        if num_speculative_tokens > 0 and draft_num_layers > 0:
            self.drafter = EarlyExitDrafter(model, kv_caches, draft_num_layers, num_speculative_tokens, block_size, max_num_seqs,
                                            max_model_len, capture_sizes, list(CONTEXT_BUCKETS), self.graphs.pool, enforce_eager)

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

    def execute(self, out: SchedulerOutput, block_tables: dict[int, list[int]], patch: TokenPatch | None = None
                ) -> tuple[list[Sequence], torch.Tensor]:
        """As :meth:`ModelRunner.execute`; a decode-only step that fits a graph replays it."""
        step = self._fill_decode(out, block_tables)
        if step is None:
            return super().execute(out, block_tables, patch)
        self.move_blocks(out)
        where = self.patch_positions(out, patch, rows_per_lane=1)
        with torch.inference_mode():
            hidden = self.graphs.replay(*step, patch=None if where is None else (where["rows"], patch.tokens[where["src"]]))
            logits = self.model.compute_logits(hidden)
        self.num_graph_steps += self.graphs.captured
        return [item.seq for item in out.scheduled], logits


    def _fill_verify(self, out: SchedulerOutput, block_tables: dict[int, list[int]], num_draft_tokens: Mapping[int, int]
                     ) -> tuple[int, int, int, np.ndarray] | None:
        """Write a verification step (every sequence decodes: its last token and ``d`` drafts) into the
        verify graphs' pinned buffer; ``(n, padded size, longest context, drafts per lane)`` or ``None``."""
        graphs = self.verify_graphs
        n = len(out.scheduled)
        size = None if graphs is None else graphs.padded_size(n)
        if size is None:
            return None
        q, bs, width, slot_of = graphs.query_len, self.block_size, graphs.max_blocks, self.slot_of
        ids, pos, slots, ctx, tables = graphs.host_inputs(size)
        num_drafts = np.zeros(n, dtype=np.int64)
        longest = 0
        for i, item in enumerate(out.scheduled):
            seq = item.seq
            d = num_draft_tokens.get(seq.seq_id, 0)
            p = seq.num_computed_tokens  # the last real token's position
            if item.num_new_tokens != 1 + d or p + 1 + d != seq.num_tokens or p < seq.num_prompt_tokens or d >= q:
                return None  # a prefill, a chunk or a cut-short verification: the general path
            table = block_tables.get(seq.seq_id)
            used = (p + d) // bs + 1
            if table is None or len(table) < used:
                raise ValueError(f"{seq} needs {used} blocks for {p + d + 1} tokens, has {0 if table is None else len(table)}")
            if (p + q - 1) // bs >= width:
                return None
            out_ids, first = seq.output_token_ids, p - seq.num_prompt_tokens
            for j in range(q):  # scalar writes: cheaper than NumPy slicing for a handful of rows
                row = i * q + j
                if j <= d:
                    ids[row], pos[row] = out_ids[first + j], p + j
                    slots[row] = slot_of(seq.seq_id, p + j) if slot_of is not None else table[(p + j) // bs] * bs + (p + j) % bs
                else:  # padding: writes nothing, any valid RoPE position, output never read
                    ids[row], pos[row], slots[row] = 0, p + d, -1
            ctx[i] = p + q  # rows sit at p .. p + q - 1: the real ones see only real, written positions
            tables[i, :used] = table[:used]
            num_drafts[i] = d
            longest = max(longest, p + q)
        return n, size, longest, num_drafts

    def execute_verify(self, out: SchedulerOutput, block_tables: dict[int, list[int]], num_draft_tokens: Mapping[int, int],
                       drafted: DeviceDrafts | None = None) -> tuple[list[Sequence], torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A verification step as one graph replay, or ``None`` when it must take :meth:`execute_speculative`.

        ``drafted``: drafts still on the device (the early exit's); they are written over the
        placeholders in the graph's inputs there, after the upload.

        Returns:
            ``(seqs, logits [n, 1 + k, V] float32, draft ids [n, k] int64, drafts per sequence [n] int64)``,
            all on the device: row ``j`` of ``logits[i]`` is the target's next-token logits after
            ``j`` drafts of ``seqs[i]``; rows and ids past a sequence's own drafts are padding.
        """
        step = self._fill_verify(out, block_tables, num_draft_tokens)
        if step is None:
            return None
        n, size, longest, num_drafts = step
        graphs, q = self.verify_graphs, self.verify_graphs.query_len
        self.copy_blocks(out.block_copies)  # (a second time after the drafter's: the same copy, then rewritten)
        arrays = {"num_drafts": num_drafts}
        if drafted is not None:  # lane v's draft j is input row v * q + 1 + j
            arrays["rows"] = (np.asarray(drafted.verify_lanes, dtype=np.int64)[:, None] * q + np.arange(1, q)).reshape(-1)
        uploaded = self.upload(arrays)
        with torch.inference_mode():
            patch = None if drafted is None else (uploaded["rows"], drafted.tokens[:, : q - 1].reshape(-1))
            hidden = graphs.replay(n, size, longest, patch=patch)
            logits = self.model.compute_logits(hidden).view(n, q, -1)
            ids = graphs.static[: n * q].view(n, q)[:, 1:].long()
        counts = uploaded["num_drafts"]
        self.num_verify_steps += 1
        self.num_verify_graph_steps += graphs.captured
        return [item.seq for item in out.scheduled], logits, ids, counts


def make_runner(
    model: LlamaForCausalLM, kv_caches: list[KVCache], config: EngineConfig, device: torch.device, max_model_len: int,
) -> ModelRunner:
    """The runner for ``device``: :class:`CudaModelRunner` on CUDA, :class:`ModelRunner` elsewhere."""
    if device.type == "cuda" and isinstance(model, LlamaForCausalLM):
        spec = config.speculative_config
        k = spec.get("num_speculative_tokens", 0) if isinstance(spec, Mapping) else 0
        k = k if isinstance(k, int) and not isinstance(k, bool) else 0  # a bad value: the decoder's validation names it
        k = k if 0 < k < MAX_DECODE_QUERY_LEN else 0
        early_exit = k and spec.get("method") == "draft" and spec.get("model") is None
        try:
            layers = early_exit_layers(spec.get("draft_num_layers"), len(model.model.layers)) if early_exit else 0
        except ValueError:
            layers = 0  # the decoder's validation names the parameter
        return CudaModelRunner(model, kv_caches, config.block_size, device, config.max_num_seqs, max_model_len,
                               config.enforce_eager, num_speculative_tokens=k, capture_sizes=config.extra.get("cuda_graph_sizes"),
                               draft_num_layers=layers)
    return ModelRunner(model, kv_caches, config.block_size, device)
