"""GPU kernels in Triton for the lab engine (not graded; Part 3b is the student's version).

One kernel a file, its launch wrapper beside it:

- :mod:`.kv_write`: store a step's new K/V rows at their cache slots (vLLM's
  ``reshape_and_cache``); slot ``-1`` means "skip" (the padding lanes of a CUDA graph);
- :mod:`.decode_attention`: paged decode attention that reads K/V *through* the block
  table in place, the query heads of one KV head in one tile, online softmax; with a
  split-KV (flash-decoding) variant and the rule that picks it;
- :mod:`.split_reduce`: merges the split-KV partial results by log-sum-exp;
- :mod:`.prefill_attention`: causal attention of a ragged batch with cached prefixes
  (chunked prefill, prefix-cache hits, mixed prefill/decode steps) over block tables;
- :mod:`.rmsnorm`, :mod:`.rope`, :mod:`.silu_mul`: the fused per-token pieces of a layer;
- :mod:`.rope_cache`: RoPE on q and k plus the K/V cache write in one kernel (the CUDA
  forward's path; :mod:`.rope` and :mod:`.kv_write` stay as Part 3's two contracts);
- :mod:`.small_gemm`: the projections at batch 1..16 where cuBLAS is latency-bound
  (with SwiGLU fused into ``gate_up``), and the measured rule for when it wins.

On a machine without CUDA the kernels run through Triton's interpreter
(``TRITON_INTERPRET=1``, set here before any kernel is defined), which is how CPU CI
tests them on small shapes. The interpreter is slow: the engine never uses these
kernels on a CPU.
"""

from __future__ import annotations

from servinglab.model.triton.interpret import use_interpreter_without_gpu

use_interpreter_without_gpu()
