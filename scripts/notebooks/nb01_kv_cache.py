"""Build notebooks/day51/01_kv_cache.ipynb: Part 1, KV-cache memory math."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("01_kv_cache")
nb.md("""
# Part 1 - KV-cache memory math

> **Needs:** nothing before it: this is the first part. Everything you write here is used
> later: the lab engine sizes its KV pool with your `num_kv_blocks` whenever it is given
> `kv_cache_memory_gib` (notebooks 04, 06 and 10 run it that way).

A serving engine spends most of its GPU memory on two things: the model's weights and the
**KV cache**, the keys and values of every token each running request has seen so far.
How many requests run at once, and so the throughput, is decided by how many KV caches fit
next to the weights (Kwon et al., *PagedAttention*, SOSP 2023, section 3).

You implement `exercises/kv_cache.py`: `ModelShape.num_parameters`, `kv_bytes_per_token`,
`calculate_kv_cache_memory`, `seed_formula_kv_bytes`, `num_kv_blocks` and
`max_concurrent_sequences`. Check yourself with `pytest tests/graded/test_part1_kv_cache.py`.
The setup cell below loads your module as `kv` (`load_part("kv_cache")`). The autograded
cells grade that module; the cells you complete here put it to work, and the answers you
assign there are checked against it.

Nothing here needs the prepared model, vLLM or a GPU. In later notebooks, code cells
starting with `# requires: ...` print why they skip on a machine without it (a GPU runner
without the model, a laptop without vLLM); the set-up cell prints what this machine has.
""")
nb.setup()
nb.code('kv = load_part("kv_cache")\nimport math\nimport matplotlib.pyplot as plt')

nb.md("""
## 1. Two phases: prefill and decode

**Prefill** runs the whole prompt through the model in one forward pass: every weight
matrix multiplies `n` prompt tokens at once. **Decode** then produces one token per step
per request: every step reads *all* the weights (and the request's KV cache) to do about
2 FLOPs per weight.

The *arithmetic intensity* (FLOPs per byte moved from memory) tells which limit binds. A
bf16 linear layer `d x d` applied to `n` tokens does `2 n d^2` FLOPs and moves `2 d^2`
bytes of weights plus `2 x 2 n d` bytes of activations, so its intensity is about `n`.
An H100 SXM does about 989 dense bf16 TFLOP/s and reads 3.35 TB/s (vendor datasheet,
`docs/references.md`): below about 295 FLOP/byte (its *ridge point*) the GPU waits on memory.
""")
nb.code("""
H100_FLOPS, H100_BW = 989e12, 3.35e12  # dense bf16 FLOP/s, HBM3 bytes/s (H100 SXM datasheet)
ridge = H100_FLOPS / H100_BW
print(f"H100 ridge point: {ridge:.0f} FLOP/byte")
d = 4096  # Llama-2-7B / Llama-3.1-8B hidden size
for n in (1, 8, 32, 128, 512, 2048):
    flops = 2 * n * d * d
    bytes_moved = 2 * d * d + 2 * 2 * n * d  # bf16 weights + input and output activations
    ai = flops / bytes_moved
    print(f"{n:5d} tokens per pass: {ai:7.1f} FLOP/byte -> {'compute' if ai > ridge else 'memory'}-bound")
""")
nb.md("""
Decode at batch 1 is one token per pass (about 1 FLOP/byte): hopelessly memory-bound.
Batching many requests into one decode step reuses each weight read for every request,
which is why serving engines want as many requests running as memory allows. Attention
is different: each request reads *its own* KV cache, so those reads never batch away.

## 2. Latency metrics: TTFT and TPOT

- **TTFT** (time to first token): from the request's arrival to its first output token.
  Queueing plus prefill, so it grows with the prompt length.
- **TPOT** (time per output token): `(end-to-end latency - TTFT) / (output tokens - 1)`,
  the mean gap between later tokens; decode steps set it.
- **Throughput**: output tokens per second over all requests together.

vLLM exports them as the histograms `vllm:time_to_first_token_seconds` (TTFT),
`vllm:request_time_per_output_token_seconds` (TPOT, one value per request) and
`vllm:inter_token_latency_seconds` (every gap between two tokens; older releases called it
`vllm:time_per_output_token_seconds`). Part 6 measures them on a real engine.
""")
nb.code("""
arrival = 0.000
token_times = [0.180, 0.205, 0.231, 0.254, 0.280]  # seconds at which each output token appeared
ttft = token_times[0] - arrival
tpot = (token_times[-1] - token_times[0]) / (len(token_times) - 1)
print(f"TTFT = {ttft * 1000:.0f} ms, TPOT = {tpot * 1000:.0f} ms, e2e = {(token_times[-1] - arrival) * 1000:.0f} ms")
""")

nb.md("""
## 3. How big is the KV cache?

Each layer stores, for every token, one key and one value vector per **KV head**:

`bytes per token = 2 (K and V) x num_layers x num_kv_heads x head_dim x bytes per element`

The course's original guide used `2 x num_layers x hidden_size x bytes` (see
`docs/references.md`, section 2). That equals the
above only when every query head has its own KV head. With grouped-query attention
(GQA) `num_attention_heads / num_kv_heads` query heads share one KV head, and the guide's
formula overstates the cache by that factor: 8x for Llama-2-70B, 4x for Llama-3.1-8B.

The shapes below are from each model's `config.json` (table in `docs/references.md`,
section 1).
""")
nb.code("""
# name: (layers, hidden, heads, kv heads, head_dim, vocab, intermediate, tied embeddings)
CONFIGS = {
    "SmolLM2-135M": (30, 576, 9, 3, 64, 49152, 1536, True),
    "SmolLM2-1.7B": (24, 2048, 32, 32, 64, 49152, 8192, True),
    "Llama-2-7B": (32, 4096, 32, 32, 128, 32000, 11008, False),
    "Llama-2-13B": (40, 5120, 40, 40, 128, 32000, 13824, False),
    "Llama-2-70B": (80, 8192, 64, 8, 128, 32000, 28672, False),
    "Llama-3.1-8B": (32, 4096, 32, 8, 128, 128256, 14336, False),
}
MAX_POS = {"SmolLM2-135M": 8192, "SmolLM2-1.7B": 8192, "Llama-2-7B": 4096, "Llama-2-13B": 4096,
           "Llama-2-70B": 4096, "Llama-3.1-8B": 131072}
DTYPE = {"SmolLM2-135M": "bf16", "SmolLM2-1.7B": "bf16", "Llama-2-7B": "fp16", "Llama-2-13B": "fp16",
         "Llama-2-70B": "fp16", "Llama-3.1-8B": "bf16"}  # the published checkpoints' dtypes (both 2 bytes)
MODELS = {name: kv.ModelShape(*cfg, name=name) for name, cfg in CONFIGS.items()}
GPU_80GB = 80 * 1024**3  # an "80GB" A100/H100 carries 80 GiB of HBM
""")
nb.solution("""
# Using your kv_cache functions, compute:
#   llama31_bytes_per_token: KV bytes per token of Llama-3.1-8B in bf16 (an int)
#   seed_overstatement_70b:  seed formula's bytes / the right bytes for Llama-2-70B in fp16 (a number)
### BEGIN SOLUTION
llama31_bytes_per_token = kv.calculate_kv_cache_memory(MODELS["Llama-3.1-8B"], seq_len=1, dtype="bf16").bytes_per_token
seed_overstatement_70b = (
    kv.seed_formula_kv_bytes(MODELS["Llama-2-70B"], 4096, dtype="fp16")
    / kv.calculate_kv_cache_memory(MODELS["Llama-2-70B"], 4096, dtype="fp16").total_bytes
)
### END SOLUTION
print(llama31_bytes_per_token, seed_overstatement_70b)
""", "kv_per_token")
nb.tests("""
# Grades your kv_cache module; the names from the cell above are checked too once you define them.
per_token_31 = kv.calculate_kv_cache_memory(MODELS["Llama-3.1-8B"], seq_len=1, dtype="bf16").bytes_per_token
assert isinstance(per_token_31, int)
assert per_token_31 != 2 * 32 * 4096 * 2, "that is the hidden_size formula: use kv heads x head_dim"
if "llama31_bytes_per_token" in globals():
    assert llama31_bytes_per_token == per_token_31
### BEGIN HIDDEN TESTS
assert per_token_31 == 2 * 32 * 8 * 128 * 2 == 131072
s70 = MODELS["Llama-2-70B"]
right70 = kv.calculate_kv_cache_memory(s70, 4096, dtype="fp16").total_bytes
assert kv.seed_formula_kv_bytes(s70, 4096, dtype="fp16") == 8 * right70 == 8 * 2 * 80 * 8 * 128 * 2 * 4096
if "seed_overstatement_70b" in globals():
    assert seed_overstatement_70b == 8
### END HIDDEN TESTS
""", "kv_per_token_test", points=2)
nb.code("""
print(f"{'model':14s} {'KiB/token':>10s} {'seed KiB/token':>15s} {'overstated':>11s}")
for name, shape in MODELS.items():
    right = kv.calculate_kv_cache_memory(shape, 1, dtype=DTYPE[name]).bytes_per_token
    seed = kv.seed_formula_kv_bytes(shape, 1, dtype=DTYPE[name])
    print(f"{name:14s} {right / 1024:10.1f} {seed / 1024:15.1f} {seed / right:10.0f}x")
""")
nb.md("""
The prediction must match what the engine really allocates. `servinglab.model.cache` builds
one `[num_blocks, block_size, num_kv_heads, head_dim]` tensor for K and one for V per
layer; here are 64 blocks of 16 tokens for SmolLM2-135M in bf16:
""")
nb.code("""
import torch
from servinglab.model.cache import KVCacheSpec, allocate_kv_cache, kv_cache_nbytes
spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64)
real = kv_cache_nbytes(allocate_kv_cache(spec, num_blocks=64, block_size=16, dtype=torch.bfloat16))
predicted = kv.calculate_kv_cache_memory(MODELS["SmolLM2-135M"], seq_len=16, batch_size=64, dtype=torch.bfloat16)
print(f"allocated {real:,} bytes, predicted {predicted.total_bytes:,} bytes")
assert real == predicted.total_bytes
""")

nb.md("""
## 4. KV memory against context length

The cache grows linearly with the tokens in flight. For a batch of `B` sequences of `L`
tokens it takes `B x L x bytes per token`; past some `L` it is bigger than the weights
themselves (parameters x 2 bytes in bf16/fp16). In the right-hand plot below a star marks
that crossover for a batch of 32; Llama-2-70B (GQA, 138 GB of weights) would cross only at
13,156 tokens, past its 4,096-token context.
""")
nb.solution("""
# crossover_tokens: the smallest context length L (tokens per sequence) at which the KV cache
# of a batch of 32 Llama-3.1-8B sequences in bf16 takes MORE bytes than its bf16 weights.
# Use MODELS["Llama-3.1-8B"].num_parameters() and your KV functions.
### BEGIN SOLUTION
weights = MODELS["Llama-3.1-8B"].num_parameters() * 2
batch_bytes_per_token = kv.calculate_kv_cache_memory(MODELS["Llama-3.1-8B"], seq_len=1, batch_size=32, dtype="bf16").total_bytes
crossover_tokens = weights // batch_bytes_per_token + 1
### END SOLUTION
print(crossover_tokens)
""", "crossover")
nb.tests("""
# Grades your kv_cache module; crossover_tokens from the cell above is checked too once you define it.
w31 = MODELS["Llama-3.1-8B"].num_parameters() * 2
batch_tok = kv.calculate_kv_cache_memory(MODELS["Llama-3.1-8B"], seq_len=1, batch_size=32, dtype="bf16").total_bytes
assert 1000 < w31 // batch_tok + 1 < 10000
if "crossover_tokens" in globals():
    assert crossover_tokens * batch_tok > w31 >= (crossover_tokens - 1) * batch_tok
### BEGIN HIDDEN TESTS
assert w31 == 8_030_261_248 * 2  # Llama-3.1-8B: 8.03B parameters in bf16
assert batch_tok == 32 * 131072
assert w31 // batch_tok + 1 == 3830
### END HIDDEN TESTS
""", "crossover_test", points=2)
nb.code("""
BATCH = 32
fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
for i, (name, shape) in enumerate(MODELS.items()):
    color = f"C{i}"
    lengths = [2**k for k in range(8, 18) if 2**k <= MAX_POS[name]]
    per_seq = [kv.calculate_kv_cache_memory(shape, L, dtype=DTYPE[name]).total_gib for L in lengths]
    left.plot(lengths, per_seq, "o-", color=color, label=name)
    per_token = kv.calculate_kv_cache_memory(shape, 1, BATCH, DTYPE[name]).total_bytes
    weights = shape.num_parameters() * 2
    xs = [256, min(MAX_POS[name], 16384)]
    right.plot(xs, [L * per_token / 2**30 for L in xs], "-", color=color, label=name)
    right.axhline(weights / 2**30, color=color, ls="--", lw=1)
    cross = weights // per_token + 1
    if cross <= MAX_POS[name]:
        right.plot([cross], [cross * per_token / 2**30], "*", color=color, ms=14)
        right.annotate(f"{cross}", (cross, cross * per_token / 2**30), textcoords="offset points", xytext=(6, -12))
for ax in (left, right):
    ax.set_xscale("log", base=2); ax.set_yscale("log"); ax.set_xlabel("context length (tokens per sequence)")
    ax.grid(True, which="both", alpha=0.3)
left.set_ylabel("KV cache of one sequence (GiB)"); left.set_title("KV per sequence, up to each model's max context")
right.set_ylabel(f"GiB for a batch of {BATCH}"); right.legend(fontsize=8)
right.set_title(f"KV of {BATCH} sequences (solid) vs weights (dashed)")
fig.tight_layout()
fig.savefig(OUT / "kv_vs_context.png", dpi=120)
plt.show()
""")

nb.md("""
## 5. How many 4k-token requests fit on an 80 GB GPU?

vLLM sizes its cache at start-up: it reserves `gpu_memory_utilization` (default 0.9) of
the GPU, loads the weights, measures peak activation memory, and cuts the rest into
blocks of `block_size` (16) tokens. Each request of `L` tokens holds `ceil(L / 16)`
blocks. With tensor parallelism (TP) over `t` GPUs, each GPU holds `1/t` of the weights
and `num_kv_heads / t` of the KV heads. Here activations are taken as 0 (vLLM profiles
them, typically a few GiB), so these are upper bounds.
""")
nb.solution("""
# fits: concurrent 4,096-token requests on an 80 GiB GPU (GPU_80GB), gpu_memory_utilization 0.9,
# block_size 16, weights and cache in fp16/bf16, for the keys "Llama-2-7B", "Llama-3.1-8B"
# and "Llama-2-70B (TP=4)" (Llama-2-70B split over four such GPUs).
### BEGIN SOLUTION
fits = {
    "Llama-2-7B": kv.max_concurrent_sequences(MODELS["Llama-2-7B"], GPU_80GB, 4096, dtype="fp16"),
    "Llama-3.1-8B": kv.max_concurrent_sequences(MODELS["Llama-3.1-8B"], GPU_80GB, 4096, dtype="bf16"),
    "Llama-2-70B (TP=4)": kv.max_concurrent_sequences(
        MODELS["Llama-2-70B"], GPU_80GB, 4096, dtype="fp16", tensor_parallel_size=4
    ),
}
### END SOLUTION
print(fits)
""", "fit_80gb")
nb.tests("""
# Grades your kv_cache module; fits from the cell above is checked too once you define it.
got = {
    "Llama-2-7B": kv.max_concurrent_sequences(MODELS["Llama-2-7B"], GPU_80GB, 4096, dtype="fp16"),
    "Llama-3.1-8B": kv.max_concurrent_sequences(MODELS["Llama-3.1-8B"], GPU_80GB, 4096, dtype="bf16"),
    "Llama-2-70B (TP=4)": kv.max_concurrent_sequences(
        MODELS["Llama-2-70B"], GPU_80GB, 4096, dtype="fp16", tensor_parallel_size=4
    ),
}
assert got["Llama-3.1-8B"] > got["Llama-2-7B"], "GQA (8 KV heads) should fit more requests"
if "fits" in globals():
    assert fits == got
### BEGIN HIDDEN TESTS
def _fit(layers, hidden, heads, kvh, hd, vocab, inter, tp=1):
    params = 2 * vocab * hidden + layers * (hidden * hd * (2 * heads + 2 * kvh) + 3 * hidden * inter + 2 * hidden) + hidden
    budget = int(GPU_80GB * 0.9) - math.ceil(params * 2 / tp)
    return budget // (16 * 2 * layers * (kvh // tp) * hd * 2) // 256
assert got["Llama-2-7B"] == _fit(32, 4096, 32, 32, 128, 32000, 11008) == 29
assert got["Llama-3.1-8B"] == _fit(32, 4096, 32, 8, 128, 128256, 14336) == 114
assert got["Llama-2-70B (TP=4)"] == _fit(80, 8192, 64, 8, 128, 32000, 28672, tp=4) == 127
### END HIDDEN TESTS
""", "fit_80gb_test", points=3)
nb.code("""
rows = [("Llama-2-7B", 1), ("Llama-3.1-8B", 1), ("Llama-2-70B", 4)]
print(f"{'model':12s} {'TP':>2s} {'weights/GPU':>12s} {'KV per 4k req':>14s} {'blocks/GPU':>10s} {'requests':>8s} {'seed says':>9s}")
for name, tp in rows:
    shape, dt = MODELS[name], DTYPE[name]
    weights_gpu = shape.num_parameters() * 2 / tp
    per_req = kv.calculate_kv_cache_memory(shape, 4096, dtype=dt).total_bytes
    blocks = kv.num_kv_blocks(shape, GPU_80GB, 0.9, 16, dt, tensor_parallel_size=tp)
    n = kv.max_concurrent_sequences(shape, GPU_80GB, 4096, dtype=dt, tensor_parallel_size=tp)
    seed = int((int(GPU_80GB * 0.9) - weights_gpu) // (kv.seed_formula_kv_bytes(shape, 4096, dtype=dt) / tp))
    print(f"{name:12s} {tp:2d} {weights_gpu / 2**30:9.1f} GiB {per_req / 2**30:10.2f} GiB {blocks:10d} {n:8d} {seed:9d}")
""")
nb.md("""
GQA is why Llama-3.1-8B holds about four times as many 4k requests as Llama-2-7B on the
same card. The "seed says" column sizes requests with the hidden_size formula: it misses
that gain entirely and sends 8x fewer requests to Llama-2-70B than fit.
Finally, what the batch does to decode speed: one decode step reads the weights once and
every request's KV cache, so a bandwidth-bound ceiling is
`batch x bandwidth / (weight bytes + batch x context x KV bytes per token)`.
""")
nb.code("""
shape = MODELS["Llama-3.1-8B"]
weights, per_token = shape.num_parameters() * 2, kv.calculate_kv_cache_memory(shape, 1, dtype="bf16").bytes_per_token
for batch in (1, 8, 32, kv.max_concurrent_sequences(shape, GPU_80GB, 4096, dtype="bf16")):
    step_bytes = weights + batch * 4096 * per_token
    print(f"batch {batch:4d}: at most {batch * H100_BW / step_bytes:8.0f} tokens/s "
          f"({batch * 4096 * per_token / step_bytes:.0%} of each step's reads are KV)")
""")
nb.md("""
## 6. Part 1 inside the engine

The lab engine asks your `num_kv_blocks` how many blocks its pool gets: with
`kv_cache_memory_gib=g` it passes `g` GiB as the memory, utilization 1 and no weights (they
live outside that budget), so the pool is exactly your answer. The cell builds a tiny
random model (no weights to load) and compares.
""")
nb.code("""
from servinglab import LLM
from servinglab.model.weights import random_model, tiny_llama_config
tiny_cfg = tiny_llama_config()
tiny_engine = LLM(model_obj=random_model(tiny_cfg, seed=0), hf_config=tiny_cfg, dtype="float32",
                  kv_cache_memory_gib=0.01, block_size=16).engine
mine = kv.num_kv_blocks(tiny_engine.kv_spec, int(0.01 * 2**30), gpu_memory_utilization=1.0, block_size=16,
                        dtype="float32", weight_bytes=0)
print(f"engine pool: {tiny_engine.num_kv_blocks} blocks; your num_kv_blocks: {mine}")
assert tiny_engine.num_kv_blocks == mine
""")
nb.md("""
## Recap

- Prefill is compute-bound, decode memory-bound; batching decode is where throughput comes from.
- KV bytes per token = 2 x layers x kv_heads x head_dim x bytes; GQA shrinks it by heads / kv_heads.
- The KV cache, not the weights, ends up bounding the batch, and your `num_kv_blocks`
  sizes the lab engine's pool. Part 2 builds the paged block manager that hands those
  blocks out without wasting them.

**What vLLM does differently.** vLLM does not take the KV budget as a number: at start-up
it loads the weights, runs a dummy forward pass at the largest batch to measure peak
activation memory, and gives what is left of `gpu_memory_utilization` x device memory to
the cache (on the CPU build, `VLLM_CPU_KVCACHE_SPACE` or `kv_cache_memory_bytes` set it
directly). It then refuses to start if one request of `max_model_len` tokens cannot fit,
and prints the longest length that would (notebook 10 triggers that error). Read
`vllm/v1/core/kv_cache_utils.py` (`check_enough_kv_cache_memory`, `get_kv_cache_configs`)
next.
""")

print("wrote", nb.save())
