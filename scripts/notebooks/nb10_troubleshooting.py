"""Build notebooks/day51/10_troubleshooting.ipynb: common serving problems, reproduced and fixed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("10_troubleshooting")
nb.md("""
# Troubleshooting: common serving problems, reproduced and fixed

> **Needs:** **Parts 1-4** (the lab engine sizes its pool with your `num_kv_blocks` and
> runs your block manager, attention and scheduler) and the installed vLLM. No graded
> cells: this notebook measures.

The course's original guide listed four "common issues" with a config change for each
(`docs/references.md`, section 2): out of memory, low throughput, high latency, and model
loading errors. A config change is only a fix if you can see the problem go away, so here
each one is first *caused* on a real engine (vLLM or the lab engine, on the course's
model) and then fixed, with a before/after measurement. Every number below is from your
run; sentences that interpret them are printed by the cells, computed from the numbers.
Machines differ, and a shared CPU makes timings noisy: rerun a cell if a result looks odd.

Sections 1-3 need the prepared model, and their vLLM runs need vLLM as well: code cells
starting with `# requires: ...` print why they skip on a machine without it (a GPU runner
without the model, a laptop without vLLM); the set-up cell prints what this machine has.

Both engines run in the same dtype: the lab engine's `auto` on a CPU (bfloat16 where the CPU
has bfloat16 instructions, AVX512-BF16 or AMX; float32 otherwise, where bfloat16 would be
emulated and slow: `setup_guide.md`), passed to vLLM as `dtype`, so the two are compared on
equal terms. **CPU only, on purpose:** the four problems are configuration problems and show
the same way on a CPU; the one GPU-only fix (CUDA graphs, section 3) is named there with how
to measure it, so there is no `# requires: cuda` section.
""")
nb.setup()
nb.code("""
kv = load_part("kv_cache")
import re, time
import numpy as np
import matplotlib.pyplot as plt
from servinglab import LLM, SamplingParams
from servinglab.model.prepare import default_model_dir
from servinglab.model.cache import KVCacheSpec
from servinglab.model.dtypes import resolve_dtype
MODEL = str(default_model_dir())   # where `servinglab prepare-model` writes the model
DTYPE = resolve_dtype("auto", "cpu")  # the lab engine's dtype on this CPU; vLLM gets the same
print("dtype of both engines:", DTYPE)
SPEC = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64)   # SmolLM2-135M (docs/references.md, section 1)
KV_BYTES = 64 * 2**20              # the KV budget of section 1, on both engines
""")

nb.md("""
## 1. "Out of memory": the KV cache cannot hold one request of `max_model_len`

vLLM checks at start-up that the KV cache can hold at least one request of
`max_model_len` tokens, and refuses to start otherwise. SmolLM2-135M allows 8,192
positions. Give vLLM 64 MiB of KV cache (`kv_cache_memory_bytes`; on a GPU the same happens
when `gpu_memory_utilization` leaves too little after the weights) and ask for the full
context.

**Predict first:** with Part 1's formula, how many tokens of SmolLM2's KV fit in 64 MiB in
this notebook's dtype? Will vLLM start?
""")
nb.code("""
# requires: model, vllm
from vllm import LLM as VllmLLM, SamplingParams as VllmParams
t0 = time.perf_counter()
try:
    VllmLLM(model=MODEL, max_model_len=8192, kv_cache_memory_bytes=KV_BYTES, enforce_eager=True, seed=0, dtype=DTYPE)
    vllm_error = None
except ValueError as exc:
    vllm_error = str(exc)
print(f"after {time.perf_counter() - t0:.0f} s, vLLM said:\\n{vllm_error}")
assert vllm_error is not None and "max seq len" in vllm_error
""")
nb.md("""
The message has everything: the KV needed for one 8,192-token request, what is
available, and the longest context that would fit. Your Part 1 predicts the first number
(vLLM's KV cache is in the dtype it runs in, `DTYPE`):
""")
nb.code("""
# requires: model, vllm
needed = kv.calculate_kv_cache_memory(SPEC, 8192, dtype=DTYPE).total_bytes
fits = KV_BYTES // kv.calculate_kv_cache_memory(SPEC, 1, dtype=DTYPE).total_bytes
estimated = int(re.search(r"estimated maximum model length is (\\d+)", vllm_error).group(1))
print(f"Part 1: one 8,192-token request needs {needed / 2**30:.3f} GiB of KV; vLLM has {KV_BYTES / 2**30:.3f} GiB")
print(f"vLLM's estimate of the longest context that fits: {estimated} tokens (Part 1: {fits} tokens in {DTYPE})")
""")
nb.md("""
**The fix** the message suggests: lower `max_model_len` (or give the cache more memory).
A context a bit under the estimate, rounded down to a multiple of 1,024, then a request that
uses most of it:
""")
nb.code("""
# requires: model, vllm
fixed_len = estimated // 1024 * 1024
t0 = time.perf_counter()
vllm_llm = VllmLLM(model=MODEL, max_model_len=fixed_len, kv_cache_memory_bytes=KV_BYTES, enforce_eager=True, seed=0,
                   dtype=DTYPE)
print(f"max_model_len={fixed_len}: vLLM started in {time.perf_counter() - t0:.0f} s")
cache = vllm_llm.llm_engine.vllm_config.cache_config
kv_dtype = vllm_llm.llm_engine.model_config.dtype
mine = kv.num_kv_blocks(SPEC, KV_BYTES, gpu_memory_utilization=1.0, block_size=cache.block_size, dtype=kv_dtype,
                        weight_bytes=0)
print(f"vLLM's KV dtype {kv_dtype}, block size {cache.block_size} tokens (the CPU backend's default); "
      f"your num_kv_blocks for 64 MiB at that block size: {mine}; vLLM's pool: {cache.num_gpu_blocks} blocks")
long_prompt = list(np.random.default_rng(0).integers(3, 49000, fixed_len - 64))
out = vllm_llm.generate([{"prompt_token_ids": [int(t) for t in long_prompt]}],
                        VllmParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print(f"a {len(long_prompt)}-token prompt: {len(out[0].outputs[0].token_ids)} tokens generated")
""")
nb.md("""
The lab engine takes the same memory budget the other way round: it starts with any
`max_model_len`, and refuses, per request, only a request that could never fit its pool
(prompt plus `max_tokens`), naming the numbers:
""")
nb.code("""
# requires: model
lab_small = LLM(model=MODEL, max_model_len=8192, kv_cache_memory_gib=KV_BYTES / 2**30, dtype=DTYPE)
print(f"lab engine: pool of {lab_small.engine.num_kv_blocks} blocks x {lab_small.engine.config.block_size} tokens "
      f"(your num_kv_blocks)")
try:
    lab_small.generate([[int(t) for t in np.random.default_rng(1).integers(3, 49000, 4000)]],
                       SamplingParams(max_tokens=8), use_tqdm=False)
except ValueError as exc:
    print("refused:", exc)
del lab_small
""")

nb.md("""
## 2. Low throughput: batch limits set too low

The guide's advice for low throughput is to raise `max_num_seqs` (sequences per step)
and `max_num_batched_tokens` (new tokens per step). Decode reads all the weights every
step whatever the batch (Part 1), so a batch limit of 1 makes every token pay a whole
step. The same 8 requests (prompts of 16-32 tokens, 16 output tokens each), on vLLM and on
the lab engine, with `max_num_seqs` 1 and 8.

**Predict first:** how much more throughput should `max_num_seqs=8` give than 1, if a step's
cost barely grows with the batch? Will the measured gain be that large on a CPU?
""")
nb.code("""
from servinglab.bench.workloads import random_workload
WORK = random_workload(8, prompt_len=(16, 32), output_len=(16, 16), seed=0)
TOKENS = sum(r.output_len for r in WORK)
batch_runs = {}                                  # (system, max_num_seqs) -> output tokens/s
""")
nb.code("""
# requires: model, vllm
def vllm_tokens_per_s(max_num_seqs):
    llm = VllmLLM(model=MODEL, max_model_len=512, kv_cache_memory_bytes=KV_BYTES, enforce_eager=True, seed=0,
                  max_num_seqs=max_num_seqs, dtype=DTYPE)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in WORK]
    params = VllmParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm.generate(prompts[:1], VllmParams(max_tokens=2), use_tqdm=False)            # warm-up
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return TOKENS / (time.perf_counter() - t0)


del vllm_llm
for n in (1, 8):
    batch_runs[("vLLM", n)] = vllm_tokens_per_s(n)
    print(f"vLLM, max_num_seqs={n}: {batch_runs[('vLLM', n)]:.1f} output tokens/s")
""")
nb.code("""
# requires: model
def lab_run(**limits):
    llm = LLM(model=MODEL, max_model_len=512, enable_prefix_caching=False, dtype=DTYPE, **limits)
    llm.generate([WORK[0].prompt_token_ids], SamplingParams(max_tokens=2), use_tqdm=False)   # warm-up
    llm.engine.record_steps, llm.engine.step_log = True, []
    t0 = time.perf_counter()
    llm.generate([r.prompt_token_ids for r in WORK], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                 use_tqdm=False)
    return TOKENS / (time.perf_counter() - t0), len(llm.engine.step_log)


for n in (1, 8):
    batch_runs[("lab", n)], steps = lab_run(max_num_seqs=n)
    print(f"lab engine, max_num_seqs={n}: {batch_runs[('lab', n)]:.1f} output tokens/s in {steps} engine steps")
for system in [s for s in ("vLLM", "lab") if (s, 1) in batch_runs]:   # vLLM's rows: where it ran above
    gain = batch_runs[(system, 8)] / batch_runs[(system, 1)]
    print(f"{system}: max_num_seqs 8 gives {gain:.1f}x the throughput of max_num_seqs 1 on this machine")
""")
nb.md("""
The token budget is the other limit. A budget smaller than the prompts forces every prompt
through several steps (chunked prefill), and it also caps how many sequences can decode in
one step. The lab engine with `max_num_seqs=8` and three budgets. **Predict first:** which
budget is slowest, and why?
""")
nb.code("""
# requires: model
budget_runs = {}
for budget in (8, 32, 512):
    budget_runs[budget] = lab_run(max_num_seqs=8, max_num_batched_tokens=budget)
    print(f"max_num_batched_tokens={budget:3d}: {budget_runs[budget][0]:.1f} output tokens/s in "
          f"{budget_runs[budget][1]} engine steps")
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
systems = [s for s in ("vLLM", "lab") if (s, 1) in batch_runs]
for i, n in enumerate((1, 8)):
    left.bar(np.arange(len(systems)) + 0.38 * i, [batch_runs[(s, n)] for s in systems], 0.38, label=f"max_num_seqs={n}")
left.set_xticks(np.arange(len(systems)) + 0.19, systems); left.set_ylabel("output tokens/s"); left.legend()
left.set_title("batch limit: before (1) and after (8)")
right.bar([str(b) for b in budget_runs], [v[0] for v in budget_runs.values()], color="C2")
right.set_xlabel("max_num_batched_tokens (lab engine, max_num_seqs=8)"); right.set_ylabel("output tokens/s")
right.set_title("token budget")
fig.tight_layout(); fig.savefig(OUT / "batch_limits.png", dpi=120); plt.show()
worst = min(budget_runs, key=lambda b: budget_runs[b][0])
print(f"slowest budget here: {worst} tokens per step ({budget_runs[worst][1]} steps vs "
      f"{budget_runs[512][1]} with 512)")
""")

nb.md("""
## 3. High latency: a long prompt stalls everyone's next token

Inter-token latency (ITL) is what a streaming user feels between words. Four requests are
decoding when a 768-token prompt arrives. If the engine must prefill a prompt in one step
(chunked prefill off, budget at least the prompt), that step computes 768 tokens and every
decoding request waits for it: an ITL spike. With chunked prefill and a small token
budget (Sarathi-Serve's stall-free batches, `docs/references.md` section 4) each step carries
the decodes plus one chunk of the prompt, so no gap is much longer than one chunk's step.
The long prompt now needs many steps instead of one, so its own first token *can* come
later; whether it does depends on how a step's cost grows with its tokens on your machine
(a very long single step can cost more than its chunks together). The printed lines say
what happened in your run.

**Predict first:** with chunking, will *every* gap be close to a plain decode step, or only
the worst one shorter? (Each step that carries a 64-token chunk does more work than a pure
decode step.)

The guide's other "high latency" fixes: `enforce_eager=False` lets vLLM capture CUDA graphs
of its decode steps, which on a GPU shortens every step (a real lever there: the step is
host bound, see notebook 03); vLLM's CPU backend has no CUDA graphs, so on this machine it
changes nothing. The "v2 block manager" is gone in vLLM V1 (one KV cache manager), and the
preemption mode matters only once the pool runs out. On a CPU, then, the lever left is the
one measured here: chunked prefill and its token budget.
""")
nb.code("""
# requires: model
LONG = [int(t) for t in np.random.default_rng(2).integers(3, 49000, 768)]


def stall_run(chunked, budget):
    llm = LLM(model=MODEL, max_model_len=1024, max_num_seqs=8, enable_prefix_caching=False,
              enable_chunked_prefill=chunked, max_num_batched_tokens=budget)
    eng = llm.engine
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)       # warm-up
    eng.record_steps, eng.step_log = True, []
    decoders = [eng.add_request(r.prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
                for r in WORK[:4]]
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        if steps == 8:                                                            # the long prompt arrives mid-decode
            long_id = eng.add_request(LONG, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
            long_sid = eng.requests[long_id].seqs[0].seq_id
        done.update({o.request_id: o for o in eng.step() if o.finished})
        steps += 1
    gaps = [b - a for rid in decoders for a, b in zip(done[rid].metrics.token_times, done[rid].metrics.token_times[1:])]
    slow = float(np.mean(np.array(gaps) > 2 * np.median(gaps)))
    prefill_steps = [(n, 1000 * (r.end - r.start)) for r in eng.step_log for sid, n, pre in r.scheduled
                     if sid == long_sid and pre]
    return {"max_itl_ms": 1000 * max(gaps), "p50_itl_ms": 1000 * float(np.median(gaps)), "slow_share": slow,
            "long_ttft_ms": 1000 * done[long_id].metrics.ttft, "gaps": gaps, "prefill_steps": prefill_steps}


stalls = {"no chunking, budget 1024": stall_run(False, 1024), "chunked, budget 64": stall_run(True, 64)}
for name, r in stalls.items():
    print(f"{name:26s} decoders' ITL: median {r['p50_itl_ms']:.0f} ms, max {r['max_itl_ms']:.0f} ms, "
          f"{r['slow_share']:.0%} of gaps over twice the median | long prompt's TTFT {r['long_ttft_ms']:.0f} ms")
before, after = stalls["no chunking, budget 1024"], stalls["chunked, budget 64"]
for name, r in stalls.items():
    tokens, ms = zip(*r["prefill_steps"])
    print(f"{name:26s} the long prompt went through {len(tokens)} step(s) of at most {max(tokens)} prompt tokens; "
          f"the longest such step took {max(ms):.0f} ms")
cut = before["max_itl_ms"] / after["max_itl_ms"]
print((f"chunking cut the worst gap {cut:.1f}-fold" if cut > 1 else
       f"here chunking did not cut the worst gap ({cut:.2f}x): timing noise on a busy machine can exceed the effect, rerun")
      + f"; the long prompt's TTFT changed {after['long_ttft_ms'] / before['long_ttft_ms']:.1f}x (on this machine)")
print(f"with chunking, {after['slow_share']:.0%} of the decoders' gaps were over twice their median "
      f"({'ITL is not flat: the steps that carry a chunk are slower' if after['slow_share'] > 0.05 else 'ITL stayed nearly flat'})")
fig, ax = plt.subplots(figsize=(8, 3.4))
for name, r in stalls.items():
    ax.ecdf([g * 1000 for g in r["gaps"]], label=name)
ax.set_xscale("log"); ax.set_xlabel("gap between two tokens of a decoding request (ms)")
ax.set_ylabel("fraction of gaps"); ax.grid(alpha=0.3); ax.legend()
ax.set_title("ITL of four decoding requests while a 768-token prompt is admitted")
fig.tight_layout(); fig.savefig(OUT / "itl_chunked_prefill.png", dpi=120); plt.show()
""")

nb.md("""
## 4. Model loading errors

The guide's last issue: the model will not load. The lab engine and vLLM both name the
folder they could not read; `servinglab doctor` (or `make doctor`) checks the prepared
model folder, torch, vLLM and a greedy generation in both.
""")
nb.code("""
try:
    LLM(model="models/no-such-model")
except Exception as exc:                                         # the error a wrong path gives
    print(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
""")
nb.md("""
## Recap

- **KV too small for `max_model_len`**: vLLM refuses to start and prints the longest
  context that fits; lower `max_model_len` or give the cache more memory. Part 1's
  formulas predict both numbers.
- **Low throughput**: `max_num_seqs` and `max_num_batched_tokens` cap the batch; a cap of
  1 makes every token pay a full step. Your run printed the gain of lifting them.
- **High latency between tokens**: an unchunked long prefill stalls every running
  request; chunked prefill with a modest token budget bounds the worst gap by one chunk's
  step instead of the whole prefill. It does not make ITL flat: the steps that carry a chunk
  are slower than pure decode steps (your run printed what share of gaps were over twice
  the median). The long prompt's own TTFT may rise or fall with it: your run printed which.
  On a GPU, CUDA graphs (`enforce_eager=False`) shorten every step as well.

**What vLLM does differently.** vLLM V1 schedules with chunked prefill by default, chooses `max_num_seqs` and `max_num_batched_tokens`
defaults per platform and usage context when you leave them unset, and checks the KV
budget once, at start-up, for the worst case of `max_model_len`. Read
`vllm/v1/core/kv_cache_utils.py` (`check_enough_kv_cache_memory`, the error above) and
`vllm/config/scheduler.py` (the scheduler limits and their defaults) next.
""")

print("wrote", nb.save())
