"""Build notebooks/day51/06_serving.ipynb: Part 6, serving (async engine, HTTP server, latency)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("06_serving")
nb.md("""
# Part 6 - Serving: an async engine, an OpenAI server, and what users wait for

Offline `generate` takes a list and returns when all of it is done. A *server* takes requests
as they come, streams each one's tokens as soon as they exist, and is judged by the latencies
its users see: **TTFT** (time to first token), **TPOT** (time per output token after the
first), **ITL** (every gap between tokens) and end-to-end latency, at some throughput.

You implement `exercises/serving.py`: `percentile`, `compute_latency_stats`, and three methods
of the seed guide's `vLLMServingEngine`: `create_sampling_params`, `generate_async` (merge many
token streams into one, and abort on close) and `benchmark_performance`. Check yourself with
`pytest tests/graded/test_part6_serving.py`. Then the notebook puts the course's real model
behind `servinglab serve` (an OpenAI-compatible server on your Parts 2-4) and measures it
over HTTP, and runs the real vLLM on the same model.
""")
nb.setup()
nb.code("""
serving = load_part("serving")
import dataclasses, math, time
import matplotlib.pyplot as plt
from servinglab.model.prepare import require_model
MODEL_DIR = require_model()
""")

nb.md("""
## 1. The seed guide's production config, against what vLLM 0.32 exposes

The setup guide configures vLLM like this. Engine options come and go between releases, so
rather than trusting a guide, ask the installed `vllm.EngineArgs` which fields exist.
""")
nb.code("""
from vllm import EngineArgs
SEED_CONFIG = {
    "gpu_memory_utilization": 0.9,   # fraction of device memory vLLM may take (weights + activations + KV)
    "max_num_seqs": 256,             # most sequences in one step (the batch)
    "max_num_batched_tokens": 8192,  # token budget of one step (prefill chunks + decodes)
    "enable_prefix_caching": True,   # reuse KV blocks of shared prompt prefixes (Part 2)
    "tensor_parallel_size": 1,       # shard every layer over this many GPUs
    "quantization": "awq",           # load 4-bit AWQ weights (needs an AWQ checkpoint)
    "swap_space": 4,                 # GiB of CPU memory for swapped-out KV blocks (V0 preemption)
}
FIELDS = {f.name: f for f in dataclasses.fields(EngineArgs)}
for name, value in SEED_CONFIG.items():
    if name in FIELDS:
        f = FIELDS[name]
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        print(f"{name:24s} seed {value!s:6s} | vLLM default {default}")
    else:
        print(f"{name:24s} seed {value!s:6s} | NOT an EngineArgs field in this vLLM")
print("KV offloading fields now:", [n for n in FIELDS if "offload" in n])
""")
nb.md("""
`swap_space` is gone: vLLM's V1 engine preempts by **recomputing** a sequence (free its
blocks, prefill again later, as your Part 4 scheduler does) and offloads KV through
`kv_offloading_size` instead. `None` defaults (`max_num_seqs`, `max_num_batched_tokens`,
`enable_prefix_caching`) are filled per platform when the engine is built. On this CPU build
`gpu_memory_utilization` is the share of *host* memory and `VLLM_CPU_KVCACHE_SPACE` (GiB)
sizes the KV cache.

## 2. Latency statistics from per-token timestamps

For a request sent at `s` whose `n` tokens arrive at `t_1 .. t_n`: TTFT = `t_1 - s`,
TPOT = `(t_n - t_1) / (n - 1)`, E2E = `t_n - s`, and ITL is every gap `t_(i+1) - t_i`.
Means hide the tail, so servers quote p50 / p90 / p99 as well (linear interpolation between
order statistics, numpy's default). Three requests, by hand:
""")
nb.code("""
HAND = [serving.RequestTimestamps(0.00, [0.10, 0.12, 0.15, 0.19]),
        serving.RequestTimestamps(0.05, [0.30, 0.31]),
        serving.RequestTimestamps(0.10, [0.40])]
""")
nb.solution("""
# With your compute_latency_stats, set
#   hand_stats:    the statistics of HAND
#   slow_share:    the fraction of HAND's requests whose TTFT exceeds 200 ms (a number in [0, 1])
### BEGIN SOLUTION
hand_stats = serving.compute_latency_stats(HAND)
slow_share = sum((r.token_times[0] - r.start) > 0.2 for r in HAND) / len(HAND)
### END SOLUTION
print({k: round(v, 2) for k, v in hand_stats.items()}, slow_share)
""", "hand_stats")
nb.tests("""
# Grades your percentile and compute_latency_stats.
assert serving.percentile([40, 15, 50, 20, 35], 50) == 35
s = serving.compute_latency_stats(HAND)
assert s["total_output_tokens"] == 7 and abs(s["avg_ttft_ms"] - 650 / 3) < 1e-6
if "hand_stats" in globals():
    assert hand_stats == s
### BEGIN HIDDEN TESTS
assert abs(serving.percentile([40, 15, 50, 20, 35], 90) - 46) < 1e-9
for key, want in {"p90_ttft_ms": 290, "avg_tpot_ms": 20, "p90_itl_ms": 37, "p99_e2e_ms": 299.2, "avg_throughput_tps": 17.5}.items():
    assert abs(s[key] - want) < 1e-6, key
assert math.isnan(serving.compute_latency_stats([(0.0, [0.2])])["avg_tpot_ms"])
if "slow_share" in globals():
    assert abs(slow_share - 2 / 3) < 1e-9
### END HIDDEN TESTS
""", "hand_stats_test", points=3)

nb.md("""
## 3. One engine API, streaming

`vLLMServingEngine(model, config, backend="lab")` wraps the lab engine (your Parts 2-4 behind
`SimpleContinuousBatching`); `backend="vllm"` wraps vLLM's `AsyncLLM` behind the same methods.
`generate_async` submits every prompt at once, so they share batches, and yields a
`StreamEvent(index, text, token_ids, timestamp, finish_reason)` per new piece of output.
""")
nb.code("""
eng = serving.vLLMServingEngine(str(MODEL_DIR), {"max_model_len": 1024, "max_num_seqs": 32, "kv_cache_memory_gib": 0.25})
eng.initialize_engine()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:", "Q: What is 12 times 12?\\nA:"]
""")
nb.solution("""
# greedy: SamplingParams for greedy decoding of exactly 24 tokens (ignore_eos=True), from your
# create_sampling_params. Then collect every event of generate_async(PROMPTS, greedy) in `events`
# (top-level `await` works in a notebook).
### BEGIN SOLUTION
greedy = eng.create_sampling_params(temperature=0.0, max_tokens=24, ignore_eos=True)
events = [ev async for ev in eng.generate_async(PROMPTS, greedy)]
### END SOLUTION
for i, prompt in enumerate(PROMPTS):
    print(repr(prompt + "".join(ev.text for ev in events if ev.index == i)))
""", "stream")
nb.tests("""
# Grades your create_sampling_params and generate_async.
try:
    eng.create_sampling_params(temperature=0.5, top_p=0.0, max_tokens=4)
    raise AssertionError("top_p=0 must be refused")
except ValueError as exc:
    assert "top_p" in str(exc)
_evs = [ev async for ev in eng.generate_async(PROMPTS[:2], eng.create_sampling_params(temperature=0.0, max_tokens=6, ignore_eos=True))]
assert sorted(sum(len(ev.token_ids) for ev in _evs if ev.index == i) for i in (0, 1)) == [6, 6]
if "events" in globals():
    assert all(sum(len(ev.token_ids) for ev in events if ev.index == i) == 24 for i in range(len(PROMPTS)))
### BEGIN HIDDEN TESTS
_stamps = [ev.timestamp for ev in _evs]
assert _stamps == sorted(_stamps)
assert [ev.finish_reason for ev in _evs].count("length") == 2
assert "".join(ev.text for ev in _evs if ev.index == 0).startswith(" Paris")
### END HIDDEN TESTS
""", "stream_test", points=2)
nb.code("""
fig, ax = plt.subplots(figsize=(8, 3))
t0 = min(ev.timestamp for ev in events)
for i in range(len(PROMPTS)):
    ts = [(ev.timestamp - t0) * 1000 for ev in events if ev.index == i]
    ax.plot(ts, [i] * len(ts), "|", ms=14)
ax.set_yticks(range(len(PROMPTS)), [p[:18] for p in PROMPTS]); ax.set_xlabel("ms since the first token")
ax.set_title("Every token of four concurrent requests: they advance in the same steps")
fig.tight_layout(); fig.savefig(OUT / "token_timeline.png", dpi=120); plt.show()
""")
nb.solution("""
# bench: your benchmark_performance on PROMPTS * 4 (16 requests at once), 2 runs,
# greedy with 32 tokens each (ignore_eos=True)
### BEGIN SOLUTION
bench = eng.benchmark_performance(PROMPTS * 4, num_runs=2,
                                  sampling_params=eng.create_sampling_params(temperature=0.0, max_tokens=32, ignore_eos=True))
### END SOLUTION
print({k: round(v, 1) for k, v in bench.items()})
""", "bench")
nb.tests("""
# Grades your benchmark_performance.
_b = eng.benchmark_performance(PROMPTS[:2], num_runs=1, sampling_params=eng.create_sampling_params(temperature=0.0, max_tokens=5, ignore_eos=True))
assert _b["total_output_tokens"] == 10 and _b["avg_throughput_tps"] > 0
if "bench" in globals():
    assert bench["num_requests"] == 32 and bench["total_output_tokens"] == 32 * 32
### BEGIN HIDDEN TESTS
for _n in ("ttft", "tpot", "itl", "e2e"):
    assert _b[f"p50_{_n}_ms"] <= _b[f"p90_{_n}_ms"] <= _b[f"p99_{_n}_ms"]
assert _b["avg_ttft_ms"] <= _b["avg_e2e_ms"] and _b["num_runs"] == 1
### END HIDDEN TESTS
""", "bench_test", points=2)
nb.code("""
eng.shutdown()
""")

nb.md("""
## 4. The lab server, answered by the official `openai` client

`servinglab serve` puts the same engine behind vLLM's HTTP API: `/v1/completions`,
`/v1/chat/completions` (with the model's chat template), SSE streaming, `/v1/models`,
`/health` and Prometheus `/metrics` under vLLM's metric names. It runs in its own process,
on your parts (`SERVINGLAB_IMPL`), on a free loopback port.
""")
nb.code("""
from servinglab.bench.servers import ServerProcess, lab_server_command
server = ServerProcess(lambda port: lab_server_command(str(MODEL_DIR), port, "smol", max_model_len=1024, max_num_seqs=64),
                       env={"SERVINGLAB_IMPL": current_impl()}, startup_timeout=180, name="lab-server")
server.__enter__()
print("serving at", server.base_url)
""")
nb.code("""
from openai import OpenAI
client = OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
done = client.completions.create(model="smol", prompt="The capital of France is", max_tokens=12, temperature=0)
print("completion:", repr(done.choices[0].text), done.usage)
chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Name three colours."}],
                                      max_tokens=24, temperature=0, stream=True)
print("chat, streamed:", end=" ")
for chunk in chat:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
""")
nb.md("""
## 5. TTFT and TPOT over HTTP

`servinglab bench serve` sends a seeded workload at a Poisson request rate and times every
streamed chunk on the client side, which is what users feel (queueing, HTTP and detokenizing
included). A small run at two rates (the full benchmark, lab against vLLM side by side, is
`servinglab bench serve --compare --request-rates 2 8`):
""")
nb.code("""
import asyncio
from servinglab.bench.serve import run_workload, summarize
from servinglab.bench.workloads import random_workload
WORKLOAD = random_workload(12, prompt_len=(16, 64), output_len=(16, 32), seed=0)
http = {}
for rate in (2.0, 8.0):
    results, duration = await run_workload(server.base_url, "smol", WORKLOAD, rate, seed=0, desc=f"{rate:g} req/s")
    http[rate] = (results, summarize(results, duration))
    print(f"{rate:g} req/s: {http[rate][1]['completed']} done, {http[rate][1]['output_throughput']:.1f} tok/s, "
          f"p50 TTFT {http[rate][1]['p50_ttft_ms']:.0f} ms, p50 TPOT {http[rate][1]['p50_tpot_ms']:.0f} ms")
""")
nb.solution("""
# http_stats: your compute_latency_stats on the 8 req/s run, one RequestTimestamps per request
# built from its send time (r.start) and chunk arrival times (r.chunk_times)
### BEGIN SOLUTION
http_stats = serving.compute_latency_stats([serving.RequestTimestamps(r.start, r.chunk_times) for r in http[8.0][0]])
### END SOLUTION
print({k: round(v, 1) for k, v in http_stats.items()})
""", "http_stats")
nb.tests("""
# Your statistics must agree with the benchmark's own (numpy) on the same timestamps.
_ref = http[8.0][1]
if "http_stats" in globals():
    for _mk, _rk in (("p50_ttft_ms", "p50_ttft_ms"), ("p90_ttft_ms", "p90_ttft_ms"), ("avg_e2e_ms", "mean_e2e_ms")):
        assert abs(http_stats[_mk] - _ref[_rk]) < 1e-6, _mk
### BEGIN HIDDEN TESTS
_mine = serving.compute_latency_stats([serving.RequestTimestamps(r.start, r.chunk_times) for r in http[8.0][0]])
assert abs(_mine["p99_ttft_ms"] - _ref["p99_ttft_ms"]) < 1e-6 and abs(_mine["avg_itl_ms"] - _ref["mean_itl_ms"]) < 1e-6
### END HIDDEN TESTS
""", "http_stats_test", points=1)
nb.code("""
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for rate, (results, _) in http.items():
    for ax, name in zip(axes, ("ttft", "tpot", "e2e")):
        ax.ecdf([v * 1000 for r in results if r.success for v in r.latencies()[name]], label=f"{rate:g} req/s")
for ax, name in zip(axes, ("TTFT", "TPOT", "E2E")):
    ax.set_xlabel(f"{name} (ms)"); ax.set_ylabel("fraction of requests"); ax.grid(alpha=0.3); ax.legend()
fig.suptitle("Lab server over HTTP: a higher request rate queues more and batches more")
fig.tight_layout(); fig.savefig(OUT / "http_latency_cdf.png", dpi=120); plt.show()
import httpx
print("\\n".join(l for l in httpx.get(server.base_url + "/metrics").text.splitlines()
                if l.startswith(("vllm:num_requests", "vllm:kv_cache", "vllm:request_success", "vllm:generation_tokens"))))
""")
nb.code("""
server.stop()  # the lab server's process ends here
""")

nb.md("""
## 6. The real vLLM on the same model

vLLM's offline `LLM` runs the same greedy prompts (in this process: the setup cell set
`VLLM_ENABLE_V1_MULTIPROCESSING=0`). The side-by-side *serving* comparison, both servers under
the same HTTP workload, is what `servinglab bench serve --compare` prints; starting a vLLM server
takes about a minute on a CPU, so it is left out of this notebook.
""")
nb.code("""
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams as VllmSamplingParams
llm = LLM(model=str(MODEL_DIR), dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
start = time.perf_counter()
outs = llm.generate(PROMPTS * 4, VllmSamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
elapsed = time.perf_counter() - start
print(f"vLLM offline: {sum(len(o.outputs[0].token_ids) for o in outs) / elapsed:.0f} output tokens/s on 16 requests")
print(f"lab engine (your benchmark_performance above): {bench['avg_throughput_tps']:.0f} output tokens/s")
for o in outs[:len(PROMPTS)]:
    print(repr(o.prompt + o.outputs[0].text[:60]))
""")
nb.md("""
## Summary

- A serving engine is an async front over the step loop: requests join and leave between
  steps, tokens stream out as they are sampled, and a client that leaves frees its blocks.
- TTFT is queueing plus prefill; TPOT is the decode rate; ITL and p99s show the stalls a mean
  hides. Measure them from per-token timestamps on the client side.
- The same code, `openai` client included, runs against the lab server and against vLLM;
  `servinglab bench serve --compare` measures both on one workload and prints the ratios.
""")

print("wrote", nb.save())
