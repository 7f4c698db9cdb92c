"""Build notebooks/day51/06_serving.ipynb: Part 6, serving (async engine, HTTP server, latency)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook  # noqa: E402

nb = Notebook("06_serving")
nb.md("""
# Part 6 - Serving: an async engine, an OpenAI server, and what users wait for

> **Needs:** section 2 needs only Part 6. Sections 3-6 run the lab engine, so they need
> **Parts 1-4** too (your `num_kv_blocks` sizes its pool; block manager, attention and
> scheduler run every step). The graded cells of sections 3-5 grade Part 6 but fail while
> an earlier part still raises `NotImplementedError`.

Offline `generate` takes a list and returns when all of it is done. A *server* takes requests
as they come, streams each one's tokens as soon as they exist, and is judged by the latencies
its users see: **TTFT** (time to first token), **TPOT** (time per output token after the
first), **ITL** (every gap between tokens) and end-to-end latency, at some throughput.

You implement `exercises/serving_stats.py` (`percentile`, `compute_latency_stats`) and three
methods of `vLLMServingEngine` in `exercises/serving.py` (the course's public class, see
`docs/references.md` section 2): `create_sampling_params`, `generate_async` (merge many
token streams into one, and abort on close) and `benchmark_performance`. Check yourself with
`pytest tests/graded/test_part6_serving.py`. Then the notebook puts the course's real model
behind `servinglab serve` (an OpenAI-compatible server on your Parts 1-4) and measures it
over HTTP with `servinglab bench serve`, whose statistics are your `compute_latency_stats`
and `percentile`, and finally runs the real vLLM server on the same workload.

Section 1 needs vLLM, sections 3-5 the prepared model (their graded cells too) and section 6
both: code cells starting with `# requires: ...` print why they skip on a machine without it
(a GPU runner without the model, a laptop without vLLM); the set-up cell prints what this
machine has.
""")
nb.setup()
nb.code("""
serving = load_part("serving")
import dataclasses, math, time
import matplotlib.pyplot as plt
from servinglab.model.prepare import default_model_dir
MODEL_DIR = default_model_dir()  # where `servinglab prepare-model` writes the model
""")

nb.md("""
## 1. The original guide's production config, against what vLLM 0.32 exposes

The course's original guide configured vLLM like this (`docs/references.md`, section 2). Engine options come and go between releases, so
rather than trusting a guide, ask the installed `vllm.EngineArgs` which fields exist.
""")
nb.code("""
# requires: vllm
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
# requires: model
eng = serving.vLLMServingEngine(str(MODEL_DIR), {"max_model_len": 1024, "max_num_seqs": 32, "kv_cache_memory_gib": 0.25})
eng.initialize_engine()
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three prime numbers:", "Q: What is 12 times 12?\\nA:"]
""")
nb.solution("""
# requires: model
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
# requires: model
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
# requires: model
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
# requires: model
# bench: your benchmark_performance on PROMPTS * 4 (16 requests at once), 2 runs,
# greedy with 32 tokens each (ignore_eos=True)
### BEGIN SOLUTION
bench = eng.benchmark_performance(PROMPTS * 4, num_runs=2,
                                  sampling_params=eng.create_sampling_params(temperature=0.0, max_tokens=32, ignore_eos=True))
### END SOLUTION
print({k: round(v, 1) for k, v in bench.items()})
""", "bench")
nb.tests("""
# requires: model
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
# requires: model
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
# requires: model
from servinglab.bench.servers import ServerProcess, lab_server_command
server = ServerProcess(lambda port: lab_server_command(str(MODEL_DIR), port, "smol", max_model_len=1024, max_num_seqs=64),
                       env={"SERVINGLAB_IMPL": current_impl()}, startup_timeout=180, name="lab-server")
server.__enter__()
print("serving at", server.base_url)
""")
nb.code("""
# requires: model
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
## 5. TTFT and TPOT over HTTP, and the latency-throughput curve

`servinglab bench serve` sends a seeded workload at a Poisson request rate and times every
streamed chunk on the client side, which is what users feel (queueing, HTTP and detokenizing
included); its table is computed by your Part 6 statistics. Below, the same 12 requests
at four rates, lowest first.

**Warm up first.** The first requests a fresh server sees pay one-time costs (memory
allocation, kernel selection, caches filling). Without a warm-up they land in the first
rate of a sweep and make the *lowest* rate look slowest, the opposite of the lesson. So
one request goes out, unmeasured, before the sweep (`bench serve` does the same).
""")
nb.code("""
# requires: model
import asyncio
from servinglab.bench.serve import run_workload, summarize
from servinglab.bench.workloads import random_workload
WORKLOAD = random_workload(12, prompt_len=(16, 64), output_len=(16, 32), seed=0)
await run_workload(server.base_url, "smol", WORKLOAD[:2], math.inf, seed=0, desc="warm-up")  # not measured
RATES = (1.0, 2.0, 4.0, 8.0)
http = {}
for rate in RATES:
    results, duration = await run_workload(server.base_url, "smol", WORKLOAD, rate, seed=0, desc=f"{rate:g} req/s")
    http[rate] = (results, summarize(results, duration))
    print(f"{rate:g} req/s: {http[rate][1]['completed']} done, {http[rate][1]['output_throughput']:.1f} tok/s, "
          f"p50 TTFT {http[rate][1]['p50_ttft_ms']:.0f} ms, p50 TPOT {http[rate][1]['p50_tpot_ms']:.0f} ms, "
          f"mean E2E {http[rate][1]['mean_e2e_ms']:.0f} ms")
""")
nb.solution("""
# requires: model
# http_stats: your compute_latency_stats on the 8 req/s run, one RequestTimestamps per request
# built from its send time (r.start) and chunk arrival times (r.chunk_times)
### BEGIN SOLUTION
http_stats = serving.compute_latency_stats([serving.RequestTimestamps(r.start, r.chunk_times) for r in http[8.0][0]])
### END SOLUTION
print({k: round(v, 1) for k, v in http_stats.items()})
""", "http_stats")
nb.tests("""
# requires: model
# Your statistics must agree with numpy's on the same client-side timestamps.
import numpy as np
_ok = [r for r in http[8.0][0] if r.success]
_ttft = np.array([r.chunk_times[0] - r.start for r in _ok]) * 1000
_e2e = np.array([r.chunk_times[-1] - r.start for r in _ok]) * 1000
_itl = np.array([g for r in _ok for g in np.diff(r.chunk_times)]) * 1000
if "http_stats" in globals():
    for _key, _want in (("p50_ttft_ms", np.percentile(_ttft, 50)), ("p90_ttft_ms", np.percentile(_ttft, 90)),
                        ("avg_e2e_ms", _e2e.mean())):
        assert abs(http_stats[_key] - _want) < 1e-6, f"{_key}: yours {http_stats[_key]:.3f}, numpy {_want:.3f}"
### BEGIN HIDDEN TESTS
_mine = serving.compute_latency_stats([serving.RequestTimestamps(r.start, r.chunk_times) for r in _ok])
assert abs(_mine["p99_ttft_ms"] - np.percentile(_ttft, 99)) < 1e-6, "p99 TTFT differs from numpy's"
assert abs(_mine["avg_itl_ms"] - _itl.mean()) < 1e-6, "mean ITL differs from numpy's"
### END HIDDEN TESTS
""", "http_stats_test", points=1)
nb.code("""
# requires: model
lo, hi = RATES[0], RATES[-1]
ttft_lo, ttft_hi = http[lo][1]["p50_ttft_ms"], http[hi][1]["p50_ttft_ms"]
trend = "higher" if ttft_hi > ttft_lo else "lower"
fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
for rate, (results, _) in http.items():
    for ax, name in zip(axes, ("ttft", "tpot", "e2e")):
        ax.ecdf([v * 1000 for r in results if r.success for v in r.latencies()[name]], label=f"{rate:g} req/s")
for ax, name in zip(axes, ("TTFT", "TPOT", "E2E")):
    ax.set_xlabel(f"{name} (ms)"); ax.set_ylabel("fraction of requests"); ax.grid(alpha=0.3); ax.legend()
tput = [http[r][1]["output_throughput"] for r in RATES]
axes[3].plot(tput, [http[r][1]["mean_e2e_ms"] for r in RATES], "o-", label="mean E2E")
axes[3].plot(tput, [http[r][1]["p90_ttft_ms"] for r in RATES], "s--", label="p90 TTFT")
for r, x, y in zip(RATES, tput, [http[r][1]["mean_e2e_ms"] for r in RATES]):
    axes[3].annotate(f"{r:g} req/s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
axes[3].set_xlabel("output tokens/s achieved"); axes[3].set_ylabel("latency (ms)"); axes[3].grid(alpha=0.3)
axes[3].legend(); axes[3].set_title("latency against throughput")
fig.suptitle(f"Lab server over HTTP, after a warm-up: p50 TTFT {ttft_lo:.0f} ms at {lo:g} req/s, "
             f"{ttft_hi:.0f} ms at {hi:g} req/s ({trend} at the higher rate)")
fig.tight_layout(); fig.savefig(OUT / "http_latency_cdf.png", dpi=120); plt.show()
print(f"from {lo:g} to {hi:g} req/s: throughput {tput[0]:.1f} -> {tput[-1]:.1f} tok/s, "
      f"mean E2E {http[lo][1]['mean_e2e_ms']:.0f} -> {http[hi][1]['mean_e2e_ms']:.0f} ms, p50 TTFT {trend} at the higher rate")
import httpx
print("\\n".join(l for l in httpx.get(server.base_url + "/metrics").text.splitlines()
                if l.startswith(("vllm:num_requests", "vllm:kv_cache", "vllm:request_success", "vllm:generation_tokens"))))
""")
nb.md("""
How to read the curve: while the server keeps up, a higher rate buys throughput at little
latency cost, because the extra requests share decode steps with the running ones. Once
requests arrive faster than the server finishes them, the queue grows and TTFT and E2E
climb steeply for the same throughput: that knee is the server's capacity at this
workload. Where the knee lies depends on the machine (and on what else runs on it); the
printed line says what your run did. Run more rates with `servinglab bench serve
--request-rates 1 2 4 8 16` against a running server to find it.
""")
nb.code("""
# requires: model
server.stop()  # the lab server's process ends here
""")

nb.md("""
## 6. The lab server against the real vLLM server

`servinglab bench serve --compare` starts the lab server and then the vLLM server (its
OpenAI server, in its own process, with the same `max_model_len`, `max_num_seqs` and
dtype), sends both the same seeded workload at the same rate after a warm-up request, and
prints one table with a vLLM/lab column. The statistics are again your Part 6. A small
run: 8 requests at 4 req/s (starting vLLM's server takes about a minute or more on 2
cores; the progress of both is printed).
""")
nb.code("""
# requires: model, vllm
import subprocess, sys
COMPARE_OUT = OUT / "serve_compare"
cmd = [sys.executable, "-m", "servinglab.cli", "bench", "serve", "--compare", "--num-requests", "8",
       "--prompt-len", "16", "48", "--output-len", "16", "32", "--request-rates", "4", "--max-num-seqs", "16",
       "--out", str(COMPARE_OUT)]
print("$ servinglab " + " ".join(cmd[3:]))
run = subprocess.run(cmd, env={**os.environ, "SERVINGLAB_IMPL": current_impl()}, capture_output=True, text=True, timeout=1500)
print(run.stdout[-4000:] or run.stderr[-4000:])
assert run.returncode == 0, run.stderr[-2000:]
""")
nb.code("""
# requires: model, vllm
import json
compare = json.loads((COMPARE_OUT / "results.json").read_text())["summaries"]
lab_row, vllm_row = compare["lab"]["4.0"], compare["vllm"]["4.0"]
for key in ("output_throughput", "p50_ttft_ms", "p50_tpot_ms", "mean_e2e_ms"):
    print(f"{key:18s} lab {lab_row[key]:8.1f}   vLLM {vllm_row[key]:8.1f}   vLLM / lab {vllm_row[key] / lab_row[key]:.2f}x")
faster = "vLLM" if vllm_row["output_throughput"] > lab_row["output_throughput"] else "the lab server"
print(f"on this machine, in this one run, {faster} delivered more output tokens/s at 4 req/s")
""")
nb.md("""
## Recap

- A serving engine is an async front over the step loop: requests join and leave between
  steps, tokens stream out as they are sampled, and a client that leaves frees its blocks.
- TTFT is queueing plus prefill; TPOT is the decode rate; ITL and p99s show the stalls a
  mean hides. Measure them from per-token timestamps on the client side, warm the server
  up before a sweep, and read latency against throughput over several rates.
- Your `percentile` and `compute_latency_stats` compute `servinglab bench serve`'s table;
  the same client, `openai` included, runs against the lab server and vLLM's. (The lab
  server's own `/metrics` histograms come from `prometheus_client`, not from Part 6.)
- Notebook 10 reproduces common serving problems on both engines and measures their fixes.

**What vLLM does differently.** vLLM's server runs the engine core in a separate process
and talks to it over ZeroMQ, so tokenizing, detokenizing and HTTP never stall a model
step; `AsyncLLM` turns the engine's outputs into one asyncio stream per request, and the
metrics are recorded per engine step by stat loggers, not per finished request. Read
`vllm/v1/engine/async_llm.py` (`generate`, the output handler loop) and
`vllm/v1/metrics/loggers.py` (the Prometheus families) next; the HTTP routes are in
`vllm/entrypoints/openai/api_server.py`.
""")

print("wrote", nb.save())
