"""``servinglab bench gemm``: the model's matrix products under each CPU kernel.

A decode step is mostly matrix products, so their speed bounds the engine's. For every
weight shape of the model (the fused ``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj`` and the LM head) and a few row counts (one decode row, a small and a full
decode batch, a prefill chunk), this times:

- ``torch``: bfloat16 ``F.linear`` (oneDNN, re-laying the weight on every call);
- ``onednn``: oneDNN on a weight packed once (:func:`servinglab.cpu_gemm.pack_weight`);
- ``sgemm``: bfloat16 operands widened to float32, MKL's sgemm, result rounded back;
- ``fp32``: a float32 model's product, for reference.

It reports GFLOP/s (``2 * rows * in * out`` per product) and prints which kernel
:class:`servinglab.cpu_gemm.CpuLinear` would pick, so the choice in ``cpu_gemm`` can be
checked on any machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from servinglab.model import cpu_gemm


def model_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of each matrix product in one layer, plus the LM head."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    kv_heads = hf_config.num_key_value_heads or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    return {
        "qkv_proj": (hidden, (heads + 2 * kv_heads) * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_up_proj": (hidden, 2 * hf_config.intermediate_size),
        "down_proj": (hf_config.intermediate_size, hidden),
        "lm_head": (hidden, hf_config.vocab_size),
    }


def time_call(fn: Callable[[], torch.Tensor], min_time: float = 0.2) -> float:
    """Median seconds per call over at least ``min_time`` seconds (after two warm-up calls)."""
    fn(), fn()
    samples: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(samples) < 5:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return sorted(samples)[len(samples) // 2]


def run_gemm_bench(hf_config, rows: tuple[int, ...] = (1, 8, 64, 2048)) -> list[dict]:
    """Time each kernel on each shape and row count; print a Markdown table; return the rows."""
    if not cpu_gemm.packing_supported(torch.bfloat16, torch.device("cpu")):
        raise RuntimeError("this PyTorch build cannot pack bfloat16 weights for oneDNN; nothing to compare")
    gen = torch.Generator().manual_seed(0)
    table = []
    print("| layer | rows | torch bf16 | onednn packed | sgemm on bf16 | fp32 | CpuLinear picks |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    sgemm_on = not cpu_gemm.cpu_has_amx()
    for name, (k, n) in model_shapes(hf_config).items():
        w = (torch.randn(n, k, generator=gen) * k**-0.5).to(torch.bfloat16)
        w32 = w.float()
        fast = cpu_gemm.CpuLinear.from_weight(w, None, sgemm=sgemm_on and name != "lm_head")
        for m in rows:
            if name == "lm_head" and m > 64:
                continue  # only sampling rows reach the LM head
            x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
            x32 = x.float()
            kernels = {
                "torch": lambda: F.linear(x, w),
                "onednn": lambda: fast.forward_packed(x),
                "sgemm": lambda: F.linear(x32, w32).to(torch.bfloat16),
                "fp32": lambda: F.linear(x32, w32),
            }
            with torch.inference_mode():
                gflops = {key: 2 * m * k * n / time_call(fn) / 1e9 for key, fn in kernels.items()}
            picks = "sgemm" if fast.weight_f32 is not None and m >= cpu_gemm.SGEMM_MIN_ROWS else "onednn"
            table.append({"layer": name, "rows": m, **{f"{key}_gflops": v for key, v in gflops.items()}, "picks": picks})
            cells = " | ".join(f"{gflops[key]:.0f}" for key in kernels)
            print(f"| {name} ({k}x{n}) | {m} | {cells} | {picks} |", flush=True)
    print("GFLOP/s, higher is better; one run on this machine. Compare kernels within a row.")
    return table
