"""Build notebooks/day51/09_tensor_parallel.ipynb: Part 9, Megatron-style tensor parallelism."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("09_tensor_parallel")
nb.md("""
# Part 9 - Tensor parallelism: one model, several ranks

**Needs:** Part 1 (`kv_cache`, for the capacity question at the end) and Parts 2-4 (the
engine runs your block manager and scheduler), plus this part's
`exercises/tensor_parallel.py` (the shards) and `exercises/tp_collectives.py` (the
collectives). Check yourself with
`pytest tests/graded/test_part9_tensor_parallel.py`.

A 70B-parameter model does not fit on one 80 GB GPU in fp16 (140 GB of weights), and
even a model that fits decodes faster when several GPUs read its weights in parallel.
**Tensor parallelism** splits every large matrix of every layer across `k` ranks
(Shoeybi et al., *Megatron-LM*, 2019, arXiv 1909.08053). You implement the splitting
rules and the three collectives they need; the engine then runs your shards on `k`
real processes talking through `torch.distributed` (gloo here on the CPU, NCCL on
GPUs): `LLM(model, tensor_parallel_size=k)`, as in vLLM.

The setup cell loads your module as `tp` (`load_part("tensor_parallel")`).

Nothing here needs the prepared model, vLLM or a GPU (the model has random weights).
**CPU only, on purpose:** the ranks run on the CPU over gloo on every machine, because the
exact float32 equality of section 4 needs CPU arithmetic and a one-GPU runner has no second
GPU for rank 1; the GPU run (NCCL, where TP pays) is one command, given in section 6, so
there is no `# requires: cuda` section. In the other notebooks, code cells starting with `# requires: ...` print why they skip on a machine
without it (a GPU runner without the model, a laptop without vLLM); the set-up cell prints
what this machine has.
""")
nb.setup()
nb.code("""
tp = load_part("tensor_parallel")
kv = load_part("kv_cache")
import numpy as np
import torch
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
""")

nb.md("""
## 1. How the matrices split

PyTorch stores a linear layer `y = x W^T` as `W` of shape `[out, in]`.

* **Column-parallel** (split the *output* features, rows of `W`): every rank has the
  whole `x` and computes its own slice of `y`. No communication.
* **Row-parallel** (split the *input* features, columns of `W`): every rank has a slice
  of `x`, exactly the slice a column-parallel layer left on it, and computes a partial
  `y`; one `all_reduce` (sum) gives every rank the full `y`.

Megatron pairs them: q/k/v column-parallel **by whole heads** (attention heads are
independent), o_proj row-parallel; gate/up column-parallel (SwiGLU is element-wise),
down_proj row-parallel. The engine fuses q/k/v into one `qkv_proj` (rows `[q | k | v]`)
and gate/up into `gate_up_proj`, so a rank's shard is *its slice of each part*. The
pictures below come from your functions: each cell is coloured by the rank that holds
it (tiny shape: 4 heads, 2 KV heads, head_dim 8, intermediate 48, hidden 32).
""")
nb.code("""
TINY = tp.TPShape(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=64)
K = 2

def owner_of_rows(shard_fn, rows, cols):
    \"\"\"[rows, cols] map of which rank holds each row, using row ids stored in the matrix.\"\"\"
    ids = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, cols).clone()
    owner = torch.full((rows, cols), -1.0)
    for r in range(K):
        owner[shard_fn(ids, r)[:, 0].long()] = r
    return owner

def owner_of_cols(rows, cols):
    ids = torch.arange(cols, dtype=torch.float32)[None, :].expand(rows, cols).clone()
    owner = torch.full((rows, cols), -1.0)
    for r in range(K):
        owner[:, tp.row_shard(ids, r, K)[0].long()] = r
    return owner

q_rows = TINY.num_heads * TINY.head_dim
kv_rows = TINY.num_kv_heads * TINY.head_dim
panels = [
    ("qkv_proj [q|k|v rows, hidden]: column-parallel", owner_of_rows(lambda w, r: tp.shard_qkv(w, TINY, r, K), q_rows + 2 * kv_rows, 32), [q_rows, q_rows + kv_rows]),
    ("o_proj [hidden, heads*head_dim]: row-parallel", owner_of_cols(32, q_rows), []),
    ("gate_up_proj [gate|up rows, hidden]: column-parallel", owner_of_rows(lambda w, r: tp.shard_gate_up(w, TINY, r, K), 2 * 48, 32), [48]),
    ("down_proj [hidden, intermediate]: row-parallel", owner_of_cols(32, 48), []),
]
cmap = ListedColormap(["#dddddd", "C0", "C1"])
fig, axes = plt.subplots(1, 4, figsize=(15, 4.2))
for ax, (title, owner, cuts) in zip(axes, panels):
    ax.imshow(owner.numpy(), cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    for c in cuts:
        ax.axhline(c - 0.5, color="k", lw=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("input features (columns)")
    ax.set_ylabel("output features (rows)")
fig.suptitle("blue: rank 0, orange: rank 1, grey: nobody (a bug); black lines: q|k|v and gate|up boundaries")
fig.tight_layout()
fig.savefig(OUT / "matrix_splits.png", dpi=110)
plt.show()
""")
nb.md("""
In `qkv_proj` each rank holds *two blocks of q rows, one of k and one of v*: its query
heads and the KV heads they attend with, so grouped-query attention runs locally, and
each rank's KV cache holds only its own KV heads. Cutting the fused matrix into two
contiguous halves instead would hand rank 0 all of q and rank 1 only k and v.

Not every `k` works: a rank must get whole heads, whole KV heads, and equal shares of the
MLP and the vocabulary. SmolLM2-135M has 9 heads and 3 KV heads: TP=3 works, TP=2 does not.
""")
nb.tests("""
smol = tp.TPShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152)
tp.check_tp_size(smol, 3)
try:
    tp.check_tp_size(smol, 2)
    raise AssertionError("TP=2 on SmolLM2 must raise ValueError (9 heads do not split in two)")
except ValueError as err:
    print("TP=2:", err)
    assert "num_attention_heads" in str(err)
assert all((panel[1] >= 0).all() for panel in panels), "every row/column must belong to exactly one rank"
### BEGIN HIDDEN TESTS
rows0 = tp.shard_qkv(torch.arange(64.0)[:, None], TINY, 0, 2)[:, 0].long().tolist()
assert rows0 == list(range(16)) + list(range(32, 40)) + list(range(48, 56))
assert (panels[1][1][:, :16] == 0).all() and (panels[1][1][:, 16:] == 1).all()
### END HIDDEN TESTS
""", "splits_test", points=2)

nb.md("""
## 2. How many collectives per step

Per decoder layer: one all-reduce after o_proj and one after down_proj, each of `T x
hidden` elements for `T` tokens in the step (Megatron, section 3). Per step also: one
all-reduce for the vocabulary-parallel embedding (each rank looks up the ids it holds,
zeros elsewhere) and one all-gather of the logits of the `S` rows that sample (each rank
computed `V/k` columns of them). Complete the function below; it is checked against the
counts the engine's ranks really make in section 4.
""")
nb.solution("""
def collectives_per_step(num_layers: int, hidden_size: int, vocab_size: int, num_tokens: int, num_sampled: int) -> dict:
    \"\"\"Collectives one rank makes in one engine step of `num_tokens` tokens, `num_sampled` of them sampling.

    Returns {"all_reduce_calls", "all_reduce_elements", "all_gather_calls", "all_gather_elements_out"}:
    the embedding's and the layers' all-reduces (their elements summed), and the logits gather
    (0 calls when nothing samples) with the number of elements it assembles on each rank.
    \"\"\"
    ### BEGIN SOLUTION
    reduces = 2 * num_layers + 1
    return {
        "all_reduce_calls": reduces,
        "all_reduce_elements": reduces * num_tokens * hidden_size,
        "all_gather_calls": 1 if num_sampled else 0,
        "all_gather_elements_out": num_sampled * vocab_size,
    }
    ### END SOLUTION

print(collectives_per_step(30, 576, 49152, num_tokens=64, num_sampled=64))   # SmolLM2, a decode step of 64 sequences
""", "collectives")
nb.tests("""
c = collectives_per_step(30, 576, 49152, num_tokens=64, num_sampled=64)
assert c["all_reduce_calls"] == 61, "2 per layer (o_proj, down_proj) plus 1 for the embedding"
### BEGIN HIDDEN TESTS
assert c["all_reduce_elements"] == 61 * 64 * 576
assert c["all_gather_calls"] == 1 and c["all_gather_elements_out"] == 64 * 49152
assert collectives_per_step(2, 64, 256, num_tokens=10, num_sampled=0)["all_gather_calls"] == 0
### END HIDDEN TESTS
""", "collectives_test", points=2)

nb.md("""
## 3. Your shards on real ranks

`run_on_ranks` starts two processes (the `spawn` method, so the function it runs must
live in an importable module: `servinglab.course.tp_demo.layer_rank`), joins them into a
gloo process group on loopback, and runs one tiny decoder layer on each: whole (full
weights) and sharded (your `shard_state_dict` and `row_parallel_linear`, which calls
`torch.distributed.all_reduce`). In float32 the two agree to rounding: the only
difference is the order in which the partial sums are added.
""")
nb.code("""
from servinglab.model.distributed import run_on_ranks
from servinglab.course.tp_demo import layer_rank

ranks = run_on_ranks(layer_rank, 2, current_impl(), timeout_s=300)
for r in ranks:
    print(f"rank {r['rank']}: max |sharded - whole| = {r['max_abs_error']:.2e}, all_reduce calls {r['all_reduce_calls']}, "
          f"weights held {r['local_weight_elements']:,} of {r['whole_weight_elements']:,} elements")
""")
nb.tests("""
assert all(r["max_abs_error"] < 1e-5 for r in ranks), "the 2-rank layer must equal the whole layer in float32"
assert all(r["all_reduce_calls"] == 2 for r in ranks), "one all-reduce after o_proj, one after down_proj"
### BEGIN HIDDEN TESTS
assert all(r["all_reduce_elements"] == 2 * 8 * 64 for r in ranks)
assert all(r["local_weight_elements"] < r["whole_weight_elements"] for r in ranks)
### END HIDDEN TESTS
""", "ranks_test", points=2)

nb.md("""
## 4. The engine at `tensor_parallel_size=2`

The engine's driver process runs your scheduler and block manager unchanged and sends
each step's inputs to two worker ranks; each rank holds its shard of the weights and
its share of the KV cache (1 of the 2 KV heads), and rank 0 hands back the gathered
logits (`servinglab/engine/tp_executor.py`). A tiny random Llama in float32 must give
*exactly* the same greedy tokens at TP=1 and TP=2. Starting the ranks takes a while on
a small machine (each process imports torch and transformers).
""")
nb.code("""
import time
from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

cfg = tiny_llama_config()
gen = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in (3, 9, 17, 30, 44, 5)]
greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# CPU ranks over gloo on every machine: a one-GPU runner has no second GPU for rank 1, and
# the exact float32 equality below needs CPU arithmetic (section 6 gives the NCCL run on GPUs).
common = dict(hf_config=cfg, dtype="float32", device="cpu", block_size=4, num_kv_blocks=20, max_num_batched_tokens=16,
              max_model_len=64)

llm1 = LLM(model_obj=random_model(cfg, dtype=torch.float32, seed=0), **common)
warm = SamplingParams(temperature=0.0, max_tokens=2)  # a first call pays one-off set-up: keep it out of the timing
llm1.generate(prompts[:1], warm)
t0 = time.perf_counter()
tokens1 = [o.outputs[0].token_ids for o in llm1.generate(prompts, greedy)]
seconds1 = time.perf_counter() - t0  # the same prompts and tokens at TP=1 and TP=2: section 6 compares them
llm2 = LLM(model_obj=random_model(cfg, dtype=torch.float32, seed=0), tensor_parallel_size=2,
           extra={"tp_profile_collectives": True}, **common)
llm2.generate(prompts[:1], warm)
steps0 = llm2.engine.num_steps
llm2.engine.tp_executor.rank_stats(reset=True)  # count the timed run's collectives only
t0 = time.perf_counter()
outs2 = llm2.generate(prompts, greedy)
seconds2 = time.perf_counter() - t0  # ranks already started: start-up is not counted
tokens2 = [o.outputs[0].token_ids for o in outs2]
steps = llm2.engine.num_steps - steps0
stats = llm2.engine.tp_executor.rank_stats()
llm2.engine.tp_executor.shutdown()
print("TP=2 tokens equal TP=1:", tokens2 == tokens1, "| preemptions:", sum(o.metrics.num_preemptions for o in outs2))
params1 = dict(llm1.engine.model.named_parameters())
w1 = sum(p.numel() * p.element_size() for p in params1.values())
kv1 = sum(k.numel() * k.element_size() * 2 for k, _ in llm1.engine.runner.kv_caches)
print(f"{'':8s} {'weights B':>10s} {'of which replicated':>20s} {'KV cache B':>11s} {'KV heads':>9s}")
print(f"{'TP=1':8s} {w1:10,d} {'':>20s} {kv1:11,d} {cfg.num_key_value_heads:9d}")
for s in stats:
    print(f"{'rank ' + str(s['rank']):8s} {s['weight_bytes']:10,d} {s['replicated_bytes']:20,d} {s['kv_bytes']:11,d} {s['num_kv_heads']:9d}")
""")
nb.code("""
fig, ax = plt.subplots(figsize=(6.5, 3.6))
labels = ["TP=1"] + [f"TP=2 rank {s['rank']}" for s in stats]
weights = [w1] + [s["weight_bytes"] for s in stats]
kvs = [kv1] + [s["kv_bytes"] for s in stats]
ax.bar(labels, weights, label="weights")
ax.bar(labels, kvs, bottom=weights, label="KV cache (20 blocks)")
ax.set_ylabel("bytes per process")
ax.set_title("each rank holds half the weights (plus the norms) and half the KV heads")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "per_rank_memory.png", dpi=110)
plt.show()
calls = stats[0]["collectives"]["calls"]
print(f"{steps} steps; rank 0 made {calls['all_reduce']} all-reduces and {calls['all_gather_into_tensor']} all-gathers")
""")
nb.tests("""
assert tokens2 == tokens1, "TP=2 greedy tokens must equal TP=1 exactly in float32"
assert all(s["kv_bytes"] * 2 == kv1 for s in stats), "each rank keeps half the KV cache"
expected = collectives_per_step(cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, 1, 1)["all_reduce_calls"]
assert calls["all_reduce"] == steps * expected, "the ranks made 2 all-reduces per layer + 1 per step"
### BEGIN HIDDEN TESTS
replicated = sum(p.numel() * 4 for n, p in params1.items() if n.endswith("norm.weight"))
assert all(s["weight_bytes"] == (w1 - replicated) // 2 + replicated for s in stats)
### END HIDDEN TESTS
""", "engine_test", points=2)

nb.md("""
## 5. Does Llama-2-70B fit on 4 GPUs?

Part 1 answered this with a formula. Now ask the engine itself: `shard_footprint` builds
the exact model one rank of the engine would build (`TPLlamaForCausalLM` from the
per-rank config, on PyTorch's `meta` device, so no memory is used) and counts its
parameters and its KV bytes per token. Llama-2-70B (config.json: 80 layers, hidden 8192,
64 heads, 8 KV heads, head_dim 128, intermediate 28672, vocab 32000, fp16) on 80 GiB GPUs
with vLLM's default `gpu_memory_utilization=0.9` and 16-token blocks.

**Predict first** (Part 1's formula, on paper): about how many GiB of fp16 weights does
each of 4 GPUs hold, and how many full 4,096-token sequences fit in what is left of 72 GiB?
""")
nb.code("""
from transformers import LlamaConfig
from servinglab.model.tp_layers import shard_footprint

llama70 = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False, rope_theta=10000.0)
GPU, UTIL, BLOCK = 80 * 2**30, 0.9, 16
shape70 = kv.ModelShape(80, 8192, 64, 8, 128, 32000, 28672, False, name="Llama-2-70B")
footprints = {k: shard_footprint(llama70, k, torch.float16) for k in (1, 2, 4, 8)}
for k, f in footprints.items():
    print(f"TP={k}: {f['weight_bytes'] / 2**30:6.2f} GiB of weights per GPU "
          f"({f['replicated_bytes'] / 2**20:.1f} MiB replicated), {f['kv_bytes_per_token'] / 1024:.0f} KiB of KV per token")
""")
nb.solution("""
def engine_kv_blocks(footprint: dict, gpu_bytes: int = GPU, utilization: float = UTIL, block_size: int = BLOCK) -> int:
    \"\"\"KV blocks per GPU from one rank's footprint: (gpu_bytes x utilization - weight_bytes) // block bytes.

    A block is block_size tokens of that rank's KV heads; return 0 when the weights alone do not fit.
    \"\"\"
    ### BEGIN SOLUTION
    budget = int(gpu_bytes * utilization) - footprint["weight_bytes"]
    return max(0, budget // (block_size * footprint["kv_bytes_per_token"]))
    ### END SOLUTION

blocks_4 = engine_kv_blocks(footprints[4])
seqs_4 = blocks_4 // (4096 // BLOCK)      # full 4,096-token sequences at once
print(f"TP=4: {blocks_4:,} blocks per GPU = {blocks_4 * BLOCK:,} tokens = {seqs_4} sequences of 4,096 tokens")
""", "fit70b")
nb.code("""
print(f"{'TP':>3s} {'engine blocks/GPU':>18s} {'Part 1 blocks/GPU':>18s} {'4k-token seqs':>14s}")
rows = []
for k, f in footprints.items():
    mine = engine_kv_blocks(f)
    try:
        part1 = kv.num_kv_blocks(shape70, GPU, UTIL, BLOCK, "fp16", tensor_parallel_size=k)
    except ValueError:
        part1 = 0  # Part 1 raises when not one block fits
    rows.append((k, mine, part1))
    print(f"{k:3d} {mine:18,d} {part1:18,d} {mine // (4096 // BLOCK):14,d}")
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.bar([str(k) for k, _, _ in rows], [m // (4096 // BLOCK) for _, m, _ in rows])
ax.set_xlabel("tensor_parallel_size (80 GiB GPUs)")
ax.set_ylabel("4,096-token sequences in KV")
ax.set_title("Llama-2-70B fp16: concurrent full-length sequences")
fig.tight_layout()
fig.savefig(OUT / "llama70b_fit.png", dpi=110)
plt.show()
""")
nb.md("""
On one GPU the 128 GiB of fp16 weights alone do not fit; on 2 GPUs a little KV room
is left; on 4 each GPU holds about 32 GiB of weights and 1/4 of the KV heads (2 of 8),
so a block costs 1/4 as much and the cache holds over a hundred full-length sequences.
The engine's numbers equal Part 1's or sit a few blocks below them: each rank also holds
the replicated RMSNorm weights, which Part 1's `weight_bytes / tp` splits as if they were sharded.
""")
nb.tests("""
assert blocks_4 > 0 and seqs_4 > 100, "Llama-2-70B fits on 4 80-GiB GPUs with room for >100 full sequences"
assert engine_kv_blocks(footprints[1]) == 0, "the fp16 weights alone exceed one GPU"
part1_4 = kv.num_kv_blocks(shape70, GPU, UTIL, BLOCK, "fp16", tensor_parallel_size=4)
assert 0 <= part1_4 - blocks_4 <= 8, (part1_4, blocks_4)
### BEGIN HIDDEN TESTS
f4 = footprints[4]
assert blocks_4 == (int(GPU * UTIL) - f4["weight_bytes"]) // (BLOCK * f4["kv_bytes_per_token"])
assert f4["kv_bytes_per_token"] == 2 * 80 * 2 * 128 * 2
### END HIDDEN TESTS
""", "fit70b_test", points=2)

nb.md("""
## 5b. Pipeline parallelism (Part 9b): TP vs PP vs both

`LLM(model, pipeline_parallel_size=p)` cuts the decoder's layers into `p` contiguous
stages (your `stage_layers`), one rank each: the embedding on the first stage, the norm
and the LM head on the last (`stage_state_dict`), and one hand-off of `(hidden,
residual)` per stage boundary with `send` / `recv` (`stage_forward`). The driver keeps
`p` micro-batches in flight, one per *virtual engine* (`pick_virtual_engine`), and
`tensor_parallel_size x pipeline_parallel_size` ranks compose the two. The cell below
runs the same requests on a small random model (8 layers, hidden 512) at TP=1, TP=2 and
PP=2 on CPU ranks and prints, per rank: weights, KV cache, and the traffic per token
through the model: TP all-reduces `2 x layers + 1` vectors of `hidden` per token, PP sends
two (hidden and residual) per stage boundary. Then it measures the pipeline bubble at
1, 2 and 4 micro-batches against GPipe's `(p - 1) / (m + p - 1)`. On GPUs the same
comparison needs a multi-GPU machine (`servinglab bench tp --device cuda --tp 2 --pp 2`);
none was available when this was written.
""")
nb.code("""
from transformers import LlamaConfig
from servinglab.bench.pp import bubble_table, measure_bubble
from servinglab.model.weights import random_model

mid = LlamaConfig(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=1536, vocab_size=8192, max_position_embeddings=1024, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=True)
pp_prompts = [[100 + (7 * i + j) % 8000 for j in range(24)] for i in range(4)]
pp_greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
through = sum(len(p) for p in pp_prompts) + len(pp_prompts) * (8 - 1)   # tokens through the model
MiB = 2**20
par_rows, par_tokens = [], {}
for tp_, pp_ in ((1, 1), (2, 1), (1, 2)):
    # device="cpu": the ranks are CPU processes (gloo), one per rank; on a GPU box the default
    # device would be CUDA, which needs one GPU per rank.
    par = LLM(model_obj=random_model(mid, seed=0), hf_config=mid, dtype="float32", device="cpu", num_kv_blocks=64,
              max_model_len=512, tensor_parallel_size=tp_, pipeline_parallel_size=pp_, extra={"tp_profile_collectives": tp_ > 1})
    par_tokens[tp_, pp_] = [o.outputs[0].token_ids for o in par.generate(pp_prompts, pp_greedy, use_tqdm=False)]
    ex = par.engine.tp_executor
    if ex is None:
        w = sum(p.numel() * p.element_size() for p in par.engine.model.parameters())
        kvb = sum(2 * k.numel() * k.element_size() for k, _ in par.engine.runner.kv_caches)
        par_rows.append((f"TP=1 PP=1", [(w, kvb)], 0, 0))
        continue
    ranks = ex.rank_stats()
    ar = ranks[0].get("collectives", {}).get("elements", {}).get("all_reduce", 0) / through
    p2p = sum(r.get("p2p_elements", 0) for r in ranks) / through
    par_rows.append((f"TP={tp_} PP={pp_}", [(r["weight_bytes"], r["kv_bytes"]) for r in ranks], ar, p2p))
    if pp_ > 1:
        pp_llm = par      # kept for the bubble below
    else:
        ex.shutdown()
assert par_tokens[2, 1] == par_tokens[1, 1] == par_tokens[1, 2], "float32 greedy tokens must not depend on the split"
print(f"{'config':12s} {'weights MiB per rank':>24s} {'KV MiB per rank':>18s} {'all-reduce elems/token':>23s} {'send elems/token':>17s}")
for name, per_rank, ar, p2p in par_rows:
    print(f"{name:12s} {' / '.join(f'{w / MiB:.1f}' for w, _ in per_rank):>24s} {' / '.join(f'{k / MiB:.1f}' for _, k in per_rank):>18s} "
          f"{ar:23,.0f} {p2p:17,.0f}")
bubble = measure_bubble(pp_llm, (1, 2, 4), tokens=128, repeats=2)
pp_llm.engine.tp_executor.shutdown()
print(bubble_table(bubble))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot([r["microbatches"] for r in bubble], [r["gpipe"] for r in bubble], "o-", label="GPipe (p-1)/(m+p-1)")
ax.plot([r["microbatches"] for r in bubble], [r["measured"] for r in bubble], "s--", label="measured, 2 CPU ranks")
ax.set_xlabel("micro-batches in flight"); ax.set_ylabel("idle share of the stages"); ax.legend()
fig.tight_layout(); fig.savefig(OUT / "pp_bubble.png", dpi=110); plt.show()
""")
nb.md("""
Read the table: TP=2 halves every layer's weights and the KV heads on each rank, and
pays `2 x 8 + 1 = 17` all-reduces of 512 numbers per token; PP=2 gives each rank half the
layers (and half the KV cache) but the whole embedding on stage 0 *and* a copy of the
tied embedding as stage 1's LM head, so its ranks hold more than half the weights, and it
sends only `2 x 512` numbers per token across its one boundary. PP's cost is the bubble:
with one micro-batch a stage idles half the time; more micro-batches in flight shrink it
toward GPipe's curve. On a shared CPU the measured points sit above the curve (the ranks
compete for cores, and every hand-off and the driver's pickling add idle time).
""")
nb.md("""
## 6. Is TP faster on this CPU, and when does it pay?

**Predict first:** section 4 ran the same six prompts (12 tokens each) at TP=1 and TP=2 and
timed both `generate` calls (rank start-up excluded). Is TP=2 faster or slower here, and by
roughly how much? Then run the cell.
""")
nb.code("""
coll_s = sum(stats[0]["collectives"]["seconds"].values())
print(f"TP=1 {seconds1:.2f} s, TP=2 {seconds2:.2f} s for the same {len(prompts)} prompts x {greedy.max_tokens} tokens: "
      f"TP=2 is {seconds1 / seconds2:.2f}x the speed of TP=1 ({'faster' if seconds2 < seconds1 else 'slower'}; one run, this machine)")
print(f"rank 0 spent {coll_s:.2f} s in {sum(calls.values())} collectives ({coll_s / seconds2:.0%} of the TP=2 run)")
""")
nb.md("""
What to expect depends on the machine. On an idle CPU with a few cores, TP=2 should be the
slower one: the two ranks share the same cores (each gets a share instead of all of them),
every layer adds two gloo all-reduces through the loopback network stack (tens of
microseconds each even for a few KiB), and the driver pickles every step's inputs to each
rank. On a *busy* machine the ranks can come out ahead anyway: they are two more processes
competing for the cores, so together they may get more CPU time than the one notebook
process, which says more about the operating system's scheduler than about TP. Either way,
the share of the TP=2 run spent in collectives (printed above) is the cost TP adds.
`servinglab bench tp` measures the same thing at
a larger scale (tokens/s, per-rank memory, time in collectives next to the computed
volume). Tensor parallelism pays when each rank has its *own* memory bandwidth and compute
(a GPU) and the interconnect is fast (NVLink: hundreds of GB/s), so the time saved reading
`1/k` of the weights outweighs the all-reduces. To run it on a GPU box:
`servinglab bench tp --device cuda --random-weights smollm2-1.7b --tp 2 4`.

## Recap

- Column-parallel layers split output features and need no communication;
  row-parallel layers split input features and end in one all-reduce. Megatron pairs
  them so a decoder layer needs exactly two all-reduces.
- Splitting by whole heads, KV heads included, keeps attention local and splits the KV
  cache too: `k` ranks hold `k` times the blocks per GiB (Part 1's capacity math).
- The vocabulary splits as well: a masked embedding lookup plus an all-reduce, and
  logits assembled with an all-gather (or a distributed argmax for greedy decoding).

## What vLLM does differently

vLLM's parallel layers live in `vllm/model_executor/layers/linear.py`
(`ColumnParallelLinear`, `QKVParallelLinear`, `MergedColumnParallelLinear`,
`RowParallelLinear`) and `vocab_parallel_embedding.py`: read `linear.py` next. vLLM
pads the vocabulary to a multiple of 64 x k instead of requiring it to divide, and
*replicates* KV heads when `k` exceeds their number instead of refusing. Its driver
runs rank 0 in the engine process and broadcasts each step's inputs to the other
workers through a shared-memory message queue (`vllm/v1/executor/multiproc_executor.py`,
`vllm/distributed/device_communicators/shm_broadcast.py`), and on NVLink GPUs it uses a
custom all-reduce kernel for small tensors (`custom_all_reduce.py`) because NCCL's
latency dominates at decode batch sizes.
""")

print("wrote", nb.save())
