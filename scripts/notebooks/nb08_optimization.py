"""Build notebooks/day51/08_optimization.ipynb: Part 8, quantization, compiled graphs, ONNX, TensorRT."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("08_optimization")
nb.md("""
# Part 8 - Optimization: weight-only quantization, compiled graphs, ONNX and TensorRT

**Needs:** Parts 1-4 (the engine serves the model through your KV-cache math, block
manager, paged attention and scheduler) and this part's `exercises/quantization.py`
(`quantize_int8`, `dequantize_int8`, `pack_int4`, `unpack_int4`, `quantize_int4`,
`dequantize_int4`, `QuantLinear`). Check yourself with
`pytest tests/graded/test_part8_quantization.py`.

The seed guide promises *"Quantization (INT8): 1.5-2x speedup, 50% memory reduction"* and
*"TensorRT optimization: 1.5-3x speedup"*. This notebook measures what those techniques
do for SmolLM2-135M on **your** machine, and explains the result with the roofline.

Papers and sources: LLM.int8() (Dettmers et al., NeurIPS 2022) for vector-wise INT8;
GPTQ (Frantar et al., ICLR 2023) and AWQ (Lin et al., MLSys 2024) for group-wise INT4;
torchao's README (INT8 weight-only on Llama-2-7B: wikitext perplexity 12.212 -> 12.204);
the PyTorch blog *Accelerating Generative AI 2* (gpt-fast: Llama-2-7B on an A100, 25.5
tok/s eager, 107 compiled, 157 with INT8 weights); TensorRT and TensorRT-LLM docs.

Sections 1, 3, 3b and 4 run the prepared model (their graded cells too); sections 2, 5 and 6 do
not: code cells starting with `# requires: ...` print why they skip on a machine without it
(a GPU runner without the model, a laptop without vLLM); the set-up cell prints what this
machine has. Sections 1-5 run on the CPU (the engine runs on `DEVICE`, the GPU where there is
one); section 4b (`# requires: cuda`) measures `QuantLinear` on a GPU and skips here.
""")
nb.setup()
nb.code("""
qz = load_part("quantization")
import time, math
import numpy as np
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from servinglab.model.prepare import require_model
from servinglab.model.weights import load_model
from servinglab.bench.quant import baseline_dtype, cpu_has_native_bf16
torch.manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = baseline_dtype(DEVICE)
print("baseline dtype:", DTYPE, "| native bf16 on this CPU:", cpu_has_native_bf16())
""")

nb.md("""
## 1. Symmetric quantization, one scale per row or per group

For a group of weights `w` and `b` bits (`qmax = 2**(b-1) - 1`: 127 for INT8, 7 for INT4):
`scale = max|w| / qmax`, `q = round(w / scale)`, `w_hat = q * scale`. Rounding to the
nearest code moves each weight by at most **half a step**, `scale / 2`. The step is set by
the largest magnitude in the group, so one outlier in a row coarsens the whole row: that
is why INT8 uses a scale per output channel and INT4 (only 15 levels) one per group of
32-128 input columns.

Below: the weights of layer 0's `gate_up_proj` (the fused gate and up projections), the
per-row INT8 scales, the per-group INT4 scales, and the rounding error measured in steps.
""")
nb.code("""
# requires: model
MODEL_DIR = str(require_model())
model32, config = load_model(MODEL_DIR, dtype=torch.float32)
w = model32.model.layers[0].mlp.gate_up_proj.weight.detach()
q8, s8 = qz.quantize_int8(w)
p4, s4 = qz.quantize_int4(w, 64)
err8 = (w - qz.dequantize_int8(q8, s8)) / s8[:, None]
err4 = (w - qz.dequantize_int4(p4, s4, 64)) / s4.repeat_interleave(64, dim=1)
fig, ax = plt.subplots(1, 3, figsize=(15, 3.6))
ax[0].hist(w.flatten().numpy(), bins=200, log=True); ax[0].set_title(f"layer 0 gate_up weights {tuple(w.shape)}")
ax[1].plot(np.sort(s8.numpy()), label="INT8 per-row scale"); ax[1].plot(np.sort(s4.flatten().numpy())[:: s4.shape[1]], label="INT4 per-group scale (every 9th)")
ax[1].set_yscale("log"); ax[1].set_title("scales, sorted"); ax[1].legend()
ax[2].hist(err8.flatten().numpy(), bins=100, alpha=0.6, label="INT8"); ax[2].hist(err4.flatten().numpy(), bins=100, alpha=0.6, label="INT4 g64")
ax[2].set_title("rounding error / step (within +-0.5)"); ax[2].legend()
fig.tight_layout(); fig.savefig(OUT / "weights_scales_errors.png", dpi=100)
print(f"max |error| in steps: INT8 {err8.abs().max():.4f}, INT4 {err4.abs().max():.4f}")
print(f"largest / median row scale: {float(s8.max() / s8.median()):.1f}x (what one per-tensor scale would cost the median row)")
""")
nb.tests("""
# requires: model
W = model32.model.layers[3].self_attn.qkv_proj.weight.detach()
q, s = qz.quantize_int8(W)
assert q.dtype == torch.int8 and s.shape == (W.shape[0],)
assert bool(((W - qz.dequantize_int8(q, s)).abs() <= s[:, None] / 2 + 1e-6 * s[:, None] * 127).all()), "INT8 error must stay within half a step"
assert bool((q.abs().amax(dim=1) == 127).all()), "one scale per output row: every row's largest weight maps to +-127"
### BEGIN HIDDEN TESTS
assert torch.equal(qz.quantize_int8(-W)[0], -q), "symmetric rounding"
### END HIDDEN TESTS
""", "int8_real_weights_test", points=2)
nb.tests("""
# requires: model
assert qz.pack_int4(torch.tensor([[3, -2]], dtype=torch.int8)).tolist() == [[(3 + 8) | ((-2 + 8) << 4)]], "low nibble = even column"
P, S = qz.quantize_int4(W, 64)
assert P.shape == (W.shape[0], W.shape[1] // 2) and S.shape == (W.shape[0], W.shape[1] // 64)
err = (W - qz.dequantize_int4(P, S, 64)).abs()
assert bool((err <= S.repeat_interleave(64, dim=1) * (0.5 + 1e-5)).all()), "INT4 error must stay within half a group step"
### BEGIN HIDDEN TESTS
try:
    qz.quantize_int4(W, 128)
    raise AssertionError("576 columns are not a multiple of 128: quantize_int4 must raise")
except ValueError as exc:
    assert "group_size" in str(exc)
### END HIDDEN TESTS
""", "int4_real_weights_test", points=2)

nb.md("""
## 2. Bytes per weight, and what the model really shrinks by

Write `bytes_per_weight(method, in_features, group_size)`: the storage cost of one
weight including its share of the float32 scales. INT8 stores 1 byte a weight plus one
4-byte scale per row of `in_features` weights; INT4 half a byte plus one 4-byte scale per
group. The embedding (tied to the LM head) is not quantized: it stays in the model
dtype (`servinglab/model/quant.py` says why), so count it at full size.
""")
nb.solution("""
def bytes_per_weight(method: str, in_features: int, group_size: int = 64) -> float:
    \"\"\"Bytes one weight costs in `method` ("int8" or "int4"), scales (float32) included.\"\"\"
    ### BEGIN SOLUTION
    if method == "int8":
        return 1 + 4 / in_features
    if method == "int4":
        return 0.5 + 4 / group_size
    raise ValueError(f"method must be 'int8' or 'int4', got {method!r}")
    ### END SOLUTION
""", "bytes_per_weight")
nb.tests("""
assert abs(bytes_per_weight("int8", 576) - (1 + 4 / 576)) < 1e-12
assert abs(bytes_per_weight("int4", 576, 64) - 0.5625) < 1e-12
### BEGIN HIDDEN TESTS
assert abs(bytes_per_weight("int4", 1536, 32) - 0.625) < 1e-12
### END HIDDEN TESTS
""", "bytes_per_weight_test", points=1)
nb.md("""
## 3. Quality, speed and peak memory side by side

`servinglab bench quant` measures every variant in one process: the engine loads the
model and swaps your `QuantLinear` into every decoder projection
(`LLM(..., quantization="int8")`), then it records weight bytes, peak memory, decode
tokens/s at batch 1 and 32 (the prefill subtracted), perplexity on text extracted from the
Python standard library's docstrings (`servinglab/bench/quality.py` records the extraction
and its sha256), and greedy agreement with the baseline on eight real prompts. Here with
small settings so it runs in a few minutes; the command line runs longer ones. The numbers
are your machine's, measured on a possibly busy CPU: compare ratios, not absolute values.

**Predict first:** relative to the baseline row, write down what you expect for INT8 and INT4:
weight MB, decode tokens/s at batch 1, and perplexity. (The roofline paragraph after the table
says why; read it after you have written your guesses.)
""")
nb.code("""
# requires: model
import argparse
from servinglab.bench.quality import stdlib_docstring_text, text_fingerprint, token_windows
from servinglab.bench.quant import quant_table, run_variant
from transformers import AutoTokenizer
text = stdlib_docstring_text()
print("text:", text_fingerprint(text))
windows = token_windows(AutoTokenizer.from_pretrained(MODEL_DIR)(text)["input_ids"], 128, 4)
args = argparse.Namespace(model=MODEL_DIR, random_weights=None, device=DEVICE, group_size=64, steps=4,
                          greedy_tokens=16, kv_cache_gib=0.25)
rows, baseline_tokens = [], None
for method in (None, "int8", "int4"):
    row, tokens = run_variant(args, DTYPE, method, False, windows, baseline_tokens)
    if baseline_tokens is None:
        baseline_tokens, row.greedy_identical = tokens, 1.0
    rows.append(row)
print(quant_table(rows))
fig, ax = plt.subplots(1, 3, figsize=(14, 3.4))
names = [r.name for r in rows]
ax[0].bar(names, [r.weight_bytes / 1e6 for r in rows]); ax[0].set_title("weights (MB)")
ax[1].bar(names, [r.decode_tok_s_b1 for r in rows], label="batch 1"); ax[1].bar(names, [r.decode_tok_s_b32 for r in rows], alpha=0.5, label="batch 32")
ax[1].set_title("decode tok/s"); ax[1].legend()
ax[2].bar(names, [r.perplexity for r in rows]); ax[2].set_title("perplexity (stdlib docstrings)")
fig.tight_layout(); fig.savefig(OUT / "quant_table.png", dpi=100)
""")
nb.code("""
# requires: model
base = rows[0]
print("| variant | projections MB | whole model MB | projections vs base | model vs base |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r.name} | {r.linear_bytes / 1e6:.1f} | {r.weight_bytes / 1e6:.1f} | {r.linear_bytes / base.linear_bytes:.2f} | {r.weight_bytes / base.weight_bytes:.2f} |")
""")
nb.md("""
The projections shrink by the factor the formats predict; the *model* shrinks less,
because the 28 M-parameter embedding (21% of SmolLM2-135M) is not quantized. Against a
bfloat16 baseline INT8 halves the projections, so "50% memory reduction" holds for them
and not for the whole model; against float32 (this notebook's baseline on CPUs without
bfloat16) both ratios are twice as good. Weights are not all the memory either: the KV
cache and activations are untouched by weight-only quantization.
""")

nb.code("""
# requires: model
int8, int4 = rows[1], rows[2]
print("| seed claim | measured here (vs the baseline row) |")
print("| --- | --- |")
print(f"| INT8: 50% memory reduction | projections -{1 - int8.linear_bytes / base.linear_bytes:.0%}, whole model -{1 - int8.weight_bytes / base.weight_bytes:.0%} (weights; see below for peak memory) |")
print(f"| INT8: 1.5-2x speedup | batch 1 {int8.decode_tok_s_b1 / base.decode_tok_s_b1:.2f}x, batch 32 {int8.decode_tok_s_b32 / base.decode_tok_s_b32:.2f}x |")
print(f"| (INT4 g64, not claimed) | projections -{1 - int4.linear_bytes / base.linear_bytes:.0%}, batch 1 {int4.decode_tok_s_b1 / base.decode_tok_s_b1:.2f}x |")
print(f"| perplexity {base.name} -> int8 -> int4 | {base.perplexity:.3f} -> {int8.perplexity:.3f} -> {int4.perplexity:.3f} |")
print(f"peak MB per row (not a memory saving): {', '.join(f'{r.name} {r.peak_memory_bytes / 1e6:.0f}' for r in rows)}")
""")
nb.md("""
Why the table shows no peak-memory claim: on a CPU the peak is the process's resident
memory, measured from the start of each row in one long-running process. The first row pays
for reading the model and for allocator growth the later rows reuse, and every row allocates
the same KV pool (`kv_cache_gib=0.25`, about 270 MB, larger than an INT4 model's
projections). So the int8 and int4 rows' peaks are mostly their KV pool, and their ratio to
the baseline's says nothing about quantization. The weight bytes above are the honest
memory figure; on a GPU `torch.cuda.max_memory_allocated()` per row is cleaner (the
reference table below).
""")
nb.tests("""
# requires: model
ppl = {r.name: r.perplexity for r in rows}
assert all(math.isfinite(v) and v > 1 for v in ppl.values()), ppl
assert ppl["int8"] < ppl[DTYPE] * 1.05, "INT8 per-channel should barely move perplexity"
assert ppl["int4"] < ppl[DTYPE] * 2.0, "INT4 g64 costs some perplexity, not a collapse"
""", "quality_test", points=1)
nb.md("""
**Reading the table with the roofline.** A decode step at batch `B` does about
`2 x params x B` FLOPs and reads every weight once. Weight-only quantization cuts the bytes
read, so it can only help where reading weights is the bottleneck, *and* only if the
kernel dequantizes inside the matrix product (the weights enter the registers as 4/8-bit
codes). `QuantLinear.forward` dequantizes the whole weight to the activation dtype first
and then calls `F.linear`: every step writes and re-reads a full-precision copy, so on that
path expect it to be *slower* than the baseline. That is the honest cost of the simple path.
The engine leaves it in two places. On a CPU with a bfloat16/float16 baseline, INT8 layers
run through PyTorch's `_weight_int8pack_mm`, which multiplies the int8 codes directly (no
dequantized copy): INT8 can then win at batch 1, where reading weights dominates, and still
lose at batch 32, where that kernel is slower than the library's float GEMM. On CUDA every
quantized layer runs your Part 8b fused kernel. INT4 on a CPU, and INT8 against a float32
baseline (CPUs without bfloat16), take the simple path. Your table says which your machine
took.

Even with a fused kernel, SmolLM2-135M has little to gain: its decode step is bound by
per-layer overheads (hundreds of small kernels or Python calls per step), not by the
0.27 GB of bf16 weights (about 0.06 ms of H200 bandwidth). LLM.int8() measured int8
matmuls at 0.14x of fp16 speed at hidden size 768, faster only from 13B parameters on;
Qwen2.5's benchmark shows quantized 0.5B models slower than bf16 on an A100, and 1.45x
(int8) / 1.83x (int4) at 7B. gpt-fast's Llama-2-7B went 107 -> 157 tok/s (1.47x) with int8
weights, at batch 1, *after* `torch.compile` removed the overheads. So the seed's
"1.5-2x" is a large-model, fused-kernel, memory-bound figure.

A reference run on another machine (an NVIDIA H200, **not your machine**; random weights,
bfloat16, one run, 2026-12-01), from *before* the engine ran Part 8b's fused kernel on CUDA:
every quantized layer took the simple dequantize-then-`F.linear` path, which is what this
table measures:
`servinglab bench quant --random-weights smollm2-135m --device cuda --steps 32 --compile`
and `... --random-weights smollm2-1.7b --device cuda --steps 32`:

| config | variant | weights MB | b1 tok/s | b32 tok/s | b1 vs bf16 | b32 vs bf16 |
| --- | --- | --- | --- | --- | --- | --- |
| SmolLM2-135M | bfloat16 | 269.0 | 861 | 20,436 | 1.00x | 1.00x |
| SmolLM2-135M | int8 | 163.5 | 413 | 11,373 | 0.48x | 0.56x |
| SmolLM2-135M | int4 g64 | 116.4 | 246 | 7,252 | 0.29x | 0.35x |
| SmolLM2-135M | bfloat16 + compile (MLP, projections) | 269.0 | 878 | 20,535 | 1.02x | 1.00x |
| SmolLM2-1.7B | bfloat16 | 3,422.8 | 585 | 15,555 | 1.00x | 1.00x |
| SmolLM2-1.7B | int8 | 1,814.7 | 74 | 2,262 | 0.13x | 0.15x |
| SmolLM2-1.7B | int4 g64 | 1,107.5 | 37 | 1,170 | 0.06x | 0.08x |

There, too, dequantize-then-matmul is slower, and more so for the larger model (more
weight bytes re-materialised a step). The "+ compile" row measures nothing: that bench
compiled the modules after the engine had captured its CUDA graphs, and on CUDA the engine
runs its own fused forward, never those modules; so the graphs replayed what they had
captured. `bench quant --compile` now adds compiled rows on CPUs only, and torch.compile's
GPU figures are the projections table's torchao rows.

**After Part 8b**: the same 1.7B config on an NVIDIA H100 (again **not your machine**; random
weights, bfloat16 activations, one run, 2026-12-07), every quantized layer through the
reference solution's fused kernel (or the engine's one-row GEMV where the tuner found it
faster). First the projections alone, all 24 layers' per step, each variant's speed-up over
bf16 and the roofline's prediction (bytes over bandwidth, FLOPs over peak, whichever is
longer): `servinglab bench quant --device cuda --random-weights smollm2-1.7b --projections-only`

| M (rows) | bf16 ms | int8 | int8 roofline | int4 g64 | int4 roofline | fp8 (unfused) | fp8 roofline |
| --- | --- | --- | --- | --- | --- | --- | --- |
| 1 | 1.40 | 1.51x | 2.00x | 0.92x | 3.55x | 0.48x | 2.00x |
| 8 | 1.41 | 1.45x | 1.99x | 0.83x | 3.51x | 0.46x | 1.99x |
| 32 | 1.46 | 1.06x | 1.96x | 0.40x | 3.39x | 0.45x | 1.96x |
| 128 | 1.59 | 0.78x | 1.74x | 0.14x | 1.74x | 0.46x | 1.86x |
| 512 | 2.56 | 0.53x | 1.00x | 0.06x | 1.00x | 0.47x | 2.00x |
| 8192 | 37.75 | 0.48x | 1.00x | 0.06x | 1.00x | 0.58x | 2.00x |

and the whole engine, decode tok/s (`servinglab bench quant --device cuda --random-weights smollm2-1.7b`):

| variant | weights MB | peak GPU MB | b1 tok/s | b32 tok/s | b1 vs bf16 | b32 vs bf16 |
| --- | --- | --- | --- | --- | --- | --- |
| bfloat16 | 3,423 | 4,068 | 498 | 13,712 | 1.00x | 1.00x |
| int8 | 1,815 | 2,720 | 665 | 13,725 | 1.34x | 1.00x |
| int4 g64 | 1,108 | 2,013 | 460 | 6,408 | 0.93x | 0.47x |

Read it by regime, against the seed's "INT8: 1.5-2x speedup, 50% memory reduction":

- **Memory-bound decode (M up to about 8).** Reading weights is the step, so fewer bytes
  is less time: INT8 projections run 1.45-1.51x faster than bf16 (the roofline allows 2x;
  the rest is the kernel's own overheads). The seed's 1.5x holds *for the projections at
  batch 1*. End to end it is 1.34x: attention, norms, the LM head and the host's share of
  a step are not quantized (Amdahl). Memory: INT8 weights take 0.53x of bf16's (the claim's
  50%, confirmed for weights); the GPU's peak is 0.67x, since the KV cache and activations
  do not shrink.
- **The middle (M of 32-128).** Weights are still read once, but the tensor cores now do real
  work and a dequantizing kernel pays for unpacking on every tile: INT8's win fades (1.06x
  at 32) and then reverses.
- **Compute-bound (prefill, M of 512 and more).** Weight-only quantization cannot help here (the
  roofline says 1.00x: the same FLOPs in bf16) and costs its dequantization (0.48-0.53x).
  This is where FP8 should win, with tensor cores twice as fast as bf16's; with the
  activation quantized by separate PyTorch ops it reaches only 0.58x at M = 8192, because
  quantizing the activation costs more than the faster GEMM saves (no crossover up to
  8192 in this run). Fusing that quantization into the previous RMSNorm is what vLLM does.
  A later run on an H200 (`docs/figures/h200_2026-12-07/`) times three FP8 rows: the
  activation quantized by those PyTorch ops (five passes over it, three in float32): 0.68x
  at M = 8192; by one Triton pass that reads each row once and writes one byte per element
  (`servinglab/model/triton/fp8_quant.py`): **1.46x at M = 8192, crossing over at M = 512
  (1.18x)**; and the FP8 GEMM alone, the activation quantized outside the step: 1.59x, the
  bound a quantization fused into RMSNorm would approach. Below M = 512 FP8 loses even
  fused (0.73-0.85x): at small M the GEMM reads weights, and cuBLAS's FP8 kernels are no
  faster than its bf16 ones there.
- **INT4 loses everywhere** with the reference kernel: its K loop moves one group (64
  codes, 32 bytes per weight row) per iteration and runs two tensor-core products for it,
  too little work per step to stream weights at full bandwidth; at large M it collapses
  (0.06x). Production INT4 kernels (Marlin) reach close to the 4x roofline at batch 1-16
  with wider tiles, asynchronous copies and a weight layout shuffled offline for the
  tensor cores. Which makes the point of this section: the bytes are only half the story;
  the kernel decides whether the GPU sees them. (On the H200 run, after the engine's one-row
  GEMV learnt to scale once per group and to load the activations contiguously, INT4 at
  M = 1 reached 1.27x and INT8 1.16x of a faster bf16 baseline; the 2.8x and 1.7x the
  roofline allows are still far.)
- **`quantization="fp8"` in the engine** (`servinglab/model/fp8_linear.py`, vLLM's name; GPUs
  with FP8 tensor cores, bf16 only) takes both lessons: e4m3 weights with one scale per output
  channel, and a route per regime. One row (batch-1 decode, memory-bound) runs the one-row GEMV
  on the e4m3 codes: weight-only, INT8's byte ratio, no activation rounding. Two rows and more
  quantize the activation per token in one Triton pass and multiply on the FP8 tensor cores.
  On an H100 (**not your machine**; `docs/figures/h100_2026-12-07b/`) that second route ran
  at 0.93x bf16 at M = 32, 1.12x at M = 512 and **1.40x at M = 8192**: a prefill chunk gains, a
  mid-size decode batch pays a little for holding one byte a weight. Its one-row route did not
  compile in that run (an integer fill value cannot be cast to e4m3); fixed since and tested
  on the CPU through Triton's interpreter, not yet timed on a GPU.

| source (not measured here) | setting | int8 speed | int8 quality |
| --- | --- | --- | --- |
| seed guide claim | unspecified | 1.5-2x | - |
| gpt-fast (PyTorch blog) | Llama-2-7B, A100, batch 1, compiled | 157 / 107 = 1.47x | - |
| torchao README | Llama-2-7B, A100, batch 1 | 171 / 107 = 1.60x | wikitext ppl 12.212 -> 12.204 |
| LLM.int8() Table 5 | hidden 768 | 0.14x | - |
""")

nb.md("""
## 3b. GPTQ against round-to-nearest (Part 8c)

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al., ICLR 2023)
quantizes a layer's columns one at a time and moves each column's rounding error onto the
columns not yet quantized, weighted by the inverse of the Hessian `H = 2 X^T X / n` of the
layer's inputs on calibration text, so that the layer's *outputs* on that text move as
little as possible. Your Part 8c (`gptq_quantize_int4`) writes Part 8a's INT4 format, so
the engine and Part 8b's kernel run its codes unchanged.

The cell calibrates on the last windows of the course's text and scores every variant on
the first ones (disjoint): held-out perplexity, and the KL divergence of the next-token
distributions from the unquantized model's, which sees changes that perplexity can
average away.

**Mind the model's history.** The course's SmolLM2-135M was dequantized from a Q4_1 GGUF:
blocks of 32 weights, each with a scale *and a minimum*, so at most 16 distinct values per
block. Its weights already lie on an asymmetric 4-bit grid. INT8 can nearly represent that
grid (it looks free), while a symmetric INT4 grid of another group size re-rounds values
rounded once already, which makes RTN INT4 look worse than it would on a model trained in
bf16, and leaves GPTQ less to win: part of the error is the mismatch of two grids.

**Predict first:** will GPTQ halve RTN INT4's perplexity increase here? Its KL? (The cell
calibrates on 4 windows only, to stay short; the table below the cell is a longer run.)
""")
nb.code("""
# requires: model, part8
import argparse
from transformers import AutoTokenizer
from servinglab.bench.gptq_quality import rtn_against_gptq
from servinglab.bench.quality import stdlib_docstring_text

gptq_args = argparse.Namespace(gptq_windows=4, ppl_window=256, group_size=64, model=str(require_model()))
gptq_ids = AutoTokenizer.from_pretrained(gptq_args.model)(stdlib_docstring_text())["input_ids"]
gptq_rows = rtn_against_gptq(gptq_args, gptq_ids)  # float32; 4 windows of 256 tokens each way
base_ppl, rtn_row, gptq_row = gptq_rows[0]["perplexity"], gptq_rows[2], gptq_rows[3]
print(f"GPTQ keeps {(gptq_row['perplexity'] - base_ppl) / (rtn_row['perplexity'] - base_ppl):.0%} of RTN's "
      f"perplexity increase and {gptq_row['kl'] / rtn_row['kl']:.0%} of its KL")
""")
nb.md("""
A longer run on the course's CPU machine (2026-12-08, float32, 33 calibration and 33
held-out windows of 256 tokens, the reference Part 8c; `servinglab bench quant
--gptq-windows 33`). The bench calibrates as the GPTQ reference implementation does, and the
rows below add its steps one at a time:

* **one pass**: every layer's Hessians from the unquantized model;
* **layer by layer**: layer `l`'s Hessians from inputs that went through layers `0 .. l-1`
  already quantized;
* **true-sequential**: inside a layer too, o_proj's Hessian from inputs through the quantized
  q/k/v, gate/up's through the quantized attention, down_proj's through the quantized gate/up;
* **act-order**: the columns with the largest Hessian diagonal (the loudest input channels)
  are quantized first, while many columns are still free to absorb their error. Part 8a's
  format has one scale per contiguous group, so whole groups are ordered, then the columns
  inside each group; your `gptq_quantize_int4` runs unchanged on the permuted columns and
  the codes go back in place. This is the bench's row.

| variant | held-out perplexity | increase | KL (nats/token) |
| --- | --- | --- | --- |
| unquantized (itself from Q4_1) | 15.210 | - | - |
| RTN int8 | 15.230 | +0.020 | 0.0032 |
| RTN int4 g64 | 23.556 | +8.345 | 0.556 |
| GPTQ int4 g64, one pass | 20.857 | +5.647 (68% of RTN's) | 0.329 (59%) |
| GPTQ int4 g64, layer by layer | 19.709 | +4.498 (54%) | 0.277 (50%) |
| GPTQ int4 g64, true-sequential | 19.916 | +4.706 (56%) | 0.278 (50%) |
| GPTQ int4 g64, true-sequential + act-order | 17.778 | +2.567 (31%) | 0.183 (33%) |
| RTN int4 g32 | 20.569 | +5.359 | 0.390 |
| GPTQ int4 g32, one pass | 19.158 | +3.947 (74%) | 0.256 (66%) |

With 16 windows each way the last row keeps 39% of RTN's increase and 36% of its KL.
The order of the columns matters most: act-order takes GPTQ from about half of RTN's damage
to a third. The order of calibration (one pass, layer by layer, true-sequential) moves the
shares less than the choice of calibration windows does: with 16 windows, three disjoint
calibration sets give 47-72% of the increase without act-order, 31-39% with it. Damping
(0.003 to 0.1; 0.01 is the paper's) and longer or more calibration windows did not help.
The grid mismatch above caps what any error feedback can do: no symmetric grid holds a
block's minimum offset. Smaller groups (32, Q4_1's own block) help RTN about as much as
one-pass GPTQ does. On a model trained in bf16 the comparison would be fairer to both; the
lesson that carries over is to judge a quantized model by its KL to the original, not by
perplexity alone.
""")

nb.md("""
## 4. Compiled execution: `torch.compile` vs eager

`torch.compile` traces a module into a graph and hands it to Inductor, which **fuses**
chains of elementwise operations into single generated kernels (C++/OpenMP on a CPU,
Triton on a GPU): the MLP's `silu(gate) * up` becomes one loop instead of three passes
over memory, RMSNorm's square-mean-rsqrt-multiply one more. Matrix products stay library
calls (MKL/oneDNN, cuBLAS). The win is largest where the step is made of many small
operations, i.e. batch-1 decode, where each op's fixed cost (Python dispatch, a kernel
launch) dominates; at large batch the matrix products dominate and fusion matters less.
Here one decoder MLP block, eager vs compiled, at batch 1 and 32.

**Predict first:** will the compiled block be faster at batch 1 on this CPU? One MLP block
at batch 1 is only two matrix products (576 x 3072 and 1536 x 576) and one small elementwise
chain of 1,536 numbers: fusing that chain saves a few microseconds, while a compiled module
adds its own per-call checks (guards) and calls the same oneDNN / MKL matrix products.
""")
nb.code("""
# requires: model
mlp = model32.model.layers[0].mlp
compiled = torch.compile(mlp, dynamic=False)
def bench(fn, x, n=30):
    with torch.no_grad():
        fn(x); fn(x)
        t = time.perf_counter()
        for _ in range(n): fn(x)
    return (time.perf_counter() - t) / n
compile_rows = []
for batch in (1, 32):
    x = torch.randn(batch, config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(compiled(x), mlp(x), rtol=1e-4, atol=1e-4), "compiled output must match eager"
    eager_s, comp_s = bench(mlp, x), bench(compiled, x)
    compile_rows.append((batch, eager_s, comp_s))
    print(f"batch {batch:>2}: eager {eager_s * 1e6:8.1f} us, compiled {comp_s * 1e6:8.1f} us, speed-up {eager_s / comp_s:.2f}x")
for batch, eager_s, comp_s in compile_rows:
    ratio = eager_s / comp_s
    verdict = "faster" if ratio > 1.1 else "slower" if ratio < 0.9 else "about the same (within 10%: noise on a shared CPU)"
    print(f"batch {batch}: compiled is {verdict} ({ratio:.2f}x)")
""")
nb.md("""
If your run shows no batch-1 win (a ratio near or below 1), that is the CPU story: the two
matrix products dominate the block and stay the same library calls, so there is little left
to fuse, and the compiled wrapper's per-call cost is of the same order as what fusion
saves. Fusion pays where a step has many small operations per matrix product (a whole
decoder layer with norms, RoPE and residuals) and on a GPU, where each eliminated
operation is an eliminated kernel launch. `servinglab bench quant --compile` adds compiled
rows to the engine table (the decoder's projections and MLPs compiled; attention stays eager
because it calls your paged attention, whose block-table planning is Python). On a GPU the bigger lever is a CUDA graph:
one replay of a recorded step instead of hundreds of launches (nano-vllm and vLLM capture
decode steps at fixed batch sizes).
""")

nb.md("""
## 4b. On a GPU: `QuantLinear` against a bfloat16 `nn.Linear`

Where CUDA is present, one SmolLM2-1.7B-sized projection (2048 -> 8192, random weights,
bfloat16) timed with CUDA events at batch 1 and 32: the plain `nn.Linear`, and your
`QuantLinear` in INT8 and INT4 (g64). **Predict first:** the GPU reads 4x fewer weight bytes
for INT4; will `QuantLinear` be faster? (It dequantizes the whole weight every call.)
""")
nb.code("""
# requires: cuda
lin = torch.nn.Linear(2048, 8192, bias=False, device="cuda", dtype=torch.bfloat16)
layers = {"bf16 Linear": lin, "int8 QuantLinear": qz.QuantLinear.from_linear(lin, "int8"),
          "int4 QuantLinear": qz.QuantLinear.from_linear(lin, "int4", 64)}
def gpu_ms(layer, x, n=50):
    with torch.no_grad():
        for _ in range(5): layer(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n): layer(x)
        end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / n
for batch in (1, 32):
    x = torch.randn(batch, 2048, device="cuda", dtype=torch.bfloat16)
    times = {name: gpu_ms(layer, x) for name, layer in layers.items()}
    print(f"batch {batch:>2}: " + ", ".join(f"{name} {ms:.3f} ms ({times['bf16 Linear'] / ms:.2f}x)" for name, ms in times.items()))
""")

nb.md("""
## 5. ONNX round trip

`servinglab export-onnx` exports the decoder with `torch.onnx.export(..., dynamo=True)`:
a *prefill* graph (`input_ids [B, T]` -> logits and the K/V of every layer) and a *decode*
graph (one new token a row plus the past K/V -> logits and the extended K/V), with batch,
sequence and past length as dynamic axes. Attention in the graphs is plain causal
attention over dense K/V (the paged cache's block tables are Python-side planning a static
graph cannot hold). `onnx.checker` validates both; onnxruntime runs them on the CPU. Here
on a tiny random Llama whose projections your `QuantLinear` holds in INT8 (the
dequantization becomes part of the graph), so it takes seconds; the command does the same
for SmolLM2 in float32.
""")
nb.code("""
from servinglab.model.weights import random_model, tiny_llama_config
from servinglab.model.onnx_export import DenseKVDecoder, OnnxDecoder, export_onnx, torch_greedy
from servinglab.bench.onnx_parity import LOGITS_RTOL
tiny_cfg = tiny_llama_config()
tiny = random_model(tiny_cfg, dtype=torch.float32, seed=0)
from servinglab.model.quant import quantize_model
quantize_model(tiny, "int8")
pre = export_onnx(tiny, OUT / "onnx" / "prefill.onnx", with_past=False)
dec = export_onnx(tiny, OUT / "onnx" / "decode.onnx", with_past=True)
ort_model = OnnxDecoder.load(pre, dec, tiny_cfg.num_hidden_layers)
ids = torch.randint(3, tiny_cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want = DenseKVDecoder(tiny, with_past=False)(ids)[0].numpy()
got = ort_model.run_prefill(ids)[0]
onnx_diff = float(np.abs(got - want).max())
same_tokens = torch.equal(ort_model.greedy(ids, 10), torch_greedy(tiny, ids, 10))
print(f"max |onnxruntime - pytorch| logits: {onnx_diff:.2e} (tolerance {LOGITS_RTOL * np.abs(want).max():.2e}); greedy identical: {same_tokens}")
""")
nb.tests("""
assert onnx_diff <= LOGITS_RTOL * float(np.abs(want).max()), "ONNX logits must match PyTorch in float32"
assert same_tokens, "ONNX greedy tokens must equal PyTorch's"
""", "onnx_round_trip_test", points=1)

nb.md("""
## 6. TensorRT: what would run, and what ran here

`servinglab build-trt` builds TensorRT engines from those ONNX files: a `Builder`, an
`OnnxParser`, one optimization profile (min / opt / max shapes) per dynamic input derived
from the seed's limits, a timing cache; TensorRT 10 uses `BuilderFlag.FP16`, TensorRT 11
only strongly typed networks (the precision comes from the ONNX tensor types). TensorRT
cannot be installed on the course machines (its PyPI wheels fetch the library from
NVIDIA's own index), so this cell builds only where `tensorrt` imports.
""")
nb.code("""
from servinglab.model.trt_build import TrtShapes, optimization_profiles, precision_plan, trtllm_build_args, import_tensorrt, TensorRTUnavailable
from servinglab.bench.gpu_models import random_config
shapes = TrtShapes(max_batch_size=8, opt_batch_size=4, max_input_len=2048, max_output_len=512)   # the seed guide's limits
smol = random_config("smollm2-135m")   # SmolLM2-135M's config.json values: the shapes need no weights
profiles = optimization_profiles(shapes, smol.num_hidden_layers, smol.num_key_value_heads,
                                 smol.hidden_size // smol.num_attention_heads)
print("prefill input_ids (min, opt, max):", profiles["prefill"]["input_ids"])
print("decode past.0.key (min, opt, max):", profiles["decode"]["past.0.key"])
print("TensorRT 10 fp16:", precision_plan(10, "fp16"), "| TensorRT 11 fp16:", precision_plan(11, "fp16"))
for cmd in trtllm_build_args(shapes):
    print("legacy TensorRT-LLM (<= 1.2):", " ".join(cmd))
try:
    trt = import_tensorrt()
    print("TensorRT", trt.__version__, "is importable: run `servinglab build-trt --onnx-dir <export-onnx folder>`")
except TensorRTUnavailable as exc:
    print("not built here:", exc)
""")
nb.md("""
| step | where it was verified |
| --- | --- |
| ONNX export (dynamo), `onnx.checker`, onnxruntime logits and greedy tokens | here, on CPU, and in the test suite |
| optimization profiles, precision plan, TensorRT-LLM command line | unit tests (plain Python) |
| TensorRT engine build and run, TensorRT-LLM `trtllm-build` / LLM API | **not run anywhere** by this course: needs TensorRT and an NVIDIA GPU |

The seed's "TensorRT: 1.5-3x" is therefore not tested here. What can be said: TensorRT's
gains come from the same places as `torch.compile` and CUDA graphs (fused kernels, no
per-op launch cost, tuned GEMM tactics), on a GPU.
""")

nb.md("""
## Recap

- Symmetric quantization bounds every weight's error by half a step; per-channel INT8
  and group-wise INT4 keep the steps small where magnitudes vary. Two INT4 codes share a
  byte (low nibble = even column).
- Weight-only quantization shrinks the weights it touches by 2x / ~3.6x (vs bf16, scales
  included); the embedding stays, so the whole model shrinks less.
- Quality: INT8 per channel is nearly free; INT4 g64 costs measurable perplexity.
- Speed: a dequantize-then-matmul layer is slower, and even fused kernels help only when
  decode is bound by weight bytes, which a 135M model on a CPU is not.
- `torch.compile` fuses elementwise chains; on one MLP block at batch 1 on a CPU that buys
  little or nothing (your run printed the ratio); ONNX export and onnxruntime give the same
  tokens; TensorRT needs a GPU machine with NVIDIA's libraries.

**What vLLM does differently.** vLLM never dequantizes a whole weight: each quantization
method plugs a `quant_method` into its linear layers (`vllm/model_executor/layers/linear.py`)
whose `apply()` calls a fused kernel that reads 4/8-bit codes inside the GEMM (Marlin for
GPTQ/AWQ INT4, CUTLASS for FP8/INT8 W8A8), and the weights come pre-quantized in the
checkpoint (GPTQ, AWQ, compressed-tensors) rather than being rounded at load time. Read
`vllm/model_executor/layers/quantization/gptq_marlin.py` next, then `torchao.py` in the same
folder for how vLLM runs torchao-quantized models.
""")

print("wrote", nb.save())
