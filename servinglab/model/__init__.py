"""The model room: tensors only (vLLM's ``vllm/model_executor``).

- :mod:`.llama` the Llama-family decoder over the paged KV cache; attention goes
  through the student's Part 3 (``paged_attention``);
- :mod:`.weights` loads a Hugging Face folder into it; :mod:`.prepare` makes the
  course's model folder from the offline GGUF (``servinglab prepare-model``);
- :mod:`.cache` allocates the per-layer KV blocks; :mod:`.cpu_gemm` the CPU matrix
  product kernels;
- on CUDA: :mod:`.triton` the Triton kernels (KV write, paged decode with split-KV,
  prefill/extend over block tables, fused RMSNorm / RoPE / SiLU-and-mul),
  :mod:`.attention_backend` Part 3's two functions served by them, :mod:`.gpu_ops` the
  fused forward, :mod:`.cuda_graphs` decode steps as CUDA-graph replays.

May import: :mod:`servinglab.interfaces`, :mod:`servinglab.sequence`,
:mod:`servinglab.impl`. Knows nothing of requests, scheduling or serving.
"""

# Triton reads TRITON_INTERPRET once, when it is first imported, and importing
# transformers imports it (through torch._dynamo); so on a machine without CUDA the
# interpreter is switched on here, before any module of this package imports either.
from servinglab.model.triton.interpret import use_interpreter_without_gpu as _use_interpreter

_use_interpreter()
