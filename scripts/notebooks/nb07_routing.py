"""Build notebooks/day51/07_routing.ipynb: Part 7, load balancing across replicas and monitoring them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbbuild import Notebook

nb = Notebook("07_routing")
nb.md("""
# Part 7 - Many replicas: routing requests and watching the servers

**Needs:** Part 7a (`exercises/load_balancer.py`, `exercises/prefix_tree.py`) for sections 1-3,
Part 7b (`exercises/monitoring.py`) for section 4, and Parts 2-4 for section 4's real servers
(they run your block manager and scheduler).

One server saturates; production runs N replicas of the model behind a *router*. The router
cannot see inside the replicas, so its whole job is one decision per request: which replica?
You implement the seed guide's `LLMLoadBalancer.select_instance` with four policies (round
robin, least outstanding, power of two choices, and SGLang's cache-aware routing), its
request accounting and health checks, and the seed's `PerformanceMonitor.collect_metrics`
(psutil, NVML, and every replica's Prometheus `/metrics`). Check yourself with
`pytest tests/graded/test_part7_load_balancer.py tests/graded/test_part7_monitoring.py`.

Papers and systems: Azar, Broder, Karlin, Upfal, *Balanced Allocations* (STOC 1994);
Mitzenmacher, *The Power of Two Choices in Randomized Load Balancing* (IEEE TPDS 2001);
SGLang's router (`sgl-router/src/policies/cache_aware.rs`, and the SGLang v0.4 blog: 1.9x
throughput and cache hit rate 20% -> 75% on 8 A100s); vLLM production-stack's router.

Section 4 needs the prepared model (its graded cell too): code cells starting with
`# requires: ...` print why they skip on a machine without it (a GPU runner without the
model, a laptop without vLLM); the set-up cell prints what this machine has.

**CPU only, on purpose.** Nothing here needs a GPU: the balancer is plain Python, and the
router's decisions do not depend on what the replicas run on. On a GPU box section 4 runs
the same way (the replicas then use the GPU); its timings change, the comparison between
policies does not, so there is no `# requires: cuda` section.
""")
nb.setup()
nb.code("""
lbm = load_part("load_balancer")
mon = load_part("monitoring")
import asyncio, math, random, time
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm
from servinglab.bench.cluster_sim import simulate, summarize
from servinglab.bench.router_workloads import shared_prefix_workload, unique_workload
""")

nb.md("""
## 1. The four policies, by hand

The router calls `select_instance(prompt)` to choose, `start_request(url)` when it sends,
and `finish_request(url)` when the response ends, so `load` is the number of requests in
flight on each replica. Round robin ignores load; least outstanding scans all replicas;
power of two draws two at random and keeps the less loaded one; cache aware looks for the
replica whose prefix tree (built from what it routed there) matches most of the prompt.
""")
nb.code("""
URLS = ["http://r0", "http://r1", "http://r2"]
rr = lbm.LLMLoadBalancer(URLS, policy="round_robin")
print("round robin:", [rr.select_instance().url for _ in range(5)])
ca = lbm.LLMLoadBalancer(URLS, policy="cache_aware")
SYSTEM = "You are a terse assistant for a bicycle shop. Answer in one line. "
for q in ["Do you fix tyres?", "Translate 'hello' into German.", "Are you open on Sunday?", "Translate 'bike' into German."]:
    prompt = q if q.startswith("Translate") else SYSTEM + q
    print(f"cache aware: {prompt[:40]!r:45} -> {ca.select_instance(prompt).url}")
print({url: tree.size for url, tree in ca.trees.items()}, "characters in each replica's prefix tree")
""")
nb.tests("""
# Grades your round_robin, least_outstanding and cache_aware policies and the accounting.
_lb = lbm.LLMLoadBalancer(URLS, policy="round_robin")
assert [_lb.select_instance().url for _ in range(4)] == URLS + URLS[:1]
_lb = lbm.LLMLoadBalancer(URLS, policy="least_outstanding")
for u in URLS[:2]:
    _lb.start_request(u)
assert _lb.select_instance().url == "http://r2"
_lb = lbm.LLMLoadBalancer(URLS, policy="cache_aware")
_home = _lb.select_instance(SYSTEM + "first").url
assert all(_lb.select_instance(SYSTEM + q).url == _home for q in ("second", "third"))
### BEGIN HIDDEN TESTS
_lb.report_failure(_home)
assert _lb.select_instance(SYSTEM + "fourth").url != _home, "a failed replica leaves the pool"
_lb2 = lbm.LLMLoadBalancer(URLS, policy="least_outstanding")
_lb2.start_request("http://r0"); _lb2.finish_request("http://r0")
assert _lb2.loads() == dict.fromkeys(URLS, 0)
### END HIDDEN TESTS
""", "policies_test", points=3)

nb.md("""
## 2. Why two choices: balls into bins

Throw n requests at n replicas that never finish (a burst). Pick one replica at random for
each, and the busiest ends up with about ln n / ln ln n of them; take the less loaded of two
random replicas and it is about ln ln n / ln 2 + O(1): an exponential improvement for one
extra look (Azar et al. 1994). Your `power_of_two` does the second; plain `random` the first.

**Predict first:** for n = 1000, write down the busiest replica's load under one random choice
and under two choices. Then run the cell (the formulas are asymptotic: compare the growth, not
the digits).
""")
nb.code("""
rows = []
for n in tqdm([10, 100, 1000], desc="balls into bins"):
    urls = [f"http://s{i}" for i in range(n)]
    p2c = lbm.LLMLoadBalancer(urls, policy="power_of_two", seed=0)
    for _ in range(n):
        p2c.start_request(p2c.select_instance().url)
    rng, one = random.Random(0), [0] * n
    for _ in range(n):
        one[rng.randrange(n)] += 1
    rows.append((n, max(one), math.log(n) / math.log(math.log(n)), max(p2c.loads().values()), math.log(math.log(n)) / math.log(2)))
print(f"{'n':>6} {'one choice':>11} {'ln n/ln ln n':>13} {'two choices':>12} {'ln ln n/ln 2':>13}")
for r in rows:
    print(f"{r[0]:>6} {r[1]:>11} {r[2]:>13.2f} {r[3]:>12} {r[4]:>13.2f}")
""")

nb.md("""
## 3. A simulated cluster: load curves in seconds

`servinglab.bench.cluster_sim.simulate` is a discrete-event model of three continuous-batching
replicas (read its docstring): each step costs a fixed overhead plus a cost per token, a
prefill computes only the tokens its replica's prefix cache lacks, and requests arrive as a
Poisson stream routed by *your* balancer, with your start/finish accounting. It runs thousands
of simulated seconds in a moment, so we can compare policies on two workloads: six shared
few-shot prefixes, and the same lengths with nothing shared.

First, one number for "how uneven": the time-weighted mean of (most loaded - least loaded).

**Predict first:** on the shared-prefix workload, which policy has the highest prefix-cache hit
rate, and which the lowest imbalance? On the workload with nothing shared, does cache-aware
routing still help?
""")
nb.solution("""
def imbalance(trace):
    \"\"\"Time-weighted mean of max(loads) - min(loads) over a trace of (time, loads) events.

    Each entry's loads hold from its time until the next entry's; the last entry only closes
    the span. Returns 0.0 for a trace shorter than two entries or spanning no time.
    \"\"\"
    ### BEGIN SOLUTION
    if len(trace) < 2 or trace[-1][0] <= trace[0][0]:
        return 0.0
    area = sum((t1 - t0) * (max(loads) - min(loads)) for (t0, loads), (t1, _) in zip(trace, trace[1:]))
    return area / (trace[-1][0] - trace[0][0])
    ### END SOLUTION
""", "imbalance")
nb.tests("""
# Grades your imbalance function.
assert imbalance([(0, [1, 0, 0]), (1, [2, 2, 2]), (3, [0, 0, 4]), (4, [0, 0, 0])]) == 1.25
assert imbalance([(5, [3, 1])]) == 0.0
### BEGIN HIDDEN TESTS
assert imbalance([(0, [2, 0]), (2, [0, 0])]) == 2.0
assert imbalance([(1, [5, 0]), (1, [0, 0])]) == 0.0
### END HIDDEN TESTS
""", "imbalance_test", points=2)
nb.code("""
POLICIES = ["round_robin", "least_outstanding", "power_of_two", "cache_aware"]
WORKLOADS = {"shared prefixes": shared_prefix_workload(600, seed=1), "no sharing": unique_workload(600, seed=1)}
RATE = 18.0  # requests/s into three replicas: busy, not overloaded
sim = {}
for (wname, prompts) in tqdm(list(WORKLOADS.items()), desc="simulating"):
    for pol in POLICIES:
        lb = lbm.LLMLoadBalancer(["s0", "s1", "s2"], policy=pol, balance_abs_threshold=8)
        sim[wname, pol] = simulate(lb, prompts, RATE)
print(f"{'workload':16} {'policy':18} {'TTFT mean s':>11} {'TTFT p99 s':>11} {'hit rate':>9} {'imbalance':>10}")
for (wname, pol), res in sim.items():
    s = summarize(res)
    print(f"{wname:16} {pol:18} {s['ttft_mean']:>11.3f} {s['ttft_p99']:>11.3f} {s['hit_rate']:>9.0%} {imbalance(res['trace']):>10.2f}")
""")
nb.code("""
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4), sharey=True)
for ax, pol in zip(axes, ["round_robin", "power_of_two", "cache_aware"]):
    trace = sim["shared prefixes", pol]["trace"]
    t = np.array([x[0] for x in trace]); loads = np.array([x[1] for x in trace])
    keep = t <= 12
    for i in range(loads.shape[1]):
        ax.step(t[keep], loads[keep, i], where="post", lw=0.9, label=f"replica {i}")
    ax.set_title(pol); ax.set_xlabel("simulated seconds")
axes[0].set_ylabel("requests in flight"); axes[0].legend(fontsize=8)
fig.suptitle("Shared-prefix workload: load on each replica over time")
fig.tight_layout(); fig.savefig(OUT / "sim_load_curves.png", dpi=120); plt.show()
""")
nb.md("""
Read the table before the plot. On shared prefixes, cache-aware routing sends each prefix to
one replica, so most prefill tokens are cache hits and TTFT drops; round robin and power of
two spread every prefix over all three replicas and each replica recomputes it (and, with a
small cache, evicts another). With nothing shared, the cache cannot help and the policies
differ only in balance. Try a higher `RATE`, or `balance_abs_threshold=64` (SGLang's
default, meant for replicas with hundreds of requests in flight): the imbalance guard is
what keeps cache affinity from piling a popular prefix onto one replica.
""")

nb.md("""
## 4. The real router over real servers, watched by your monitor

Three `servinglab serve` processes (the real SmolLM2-135M on your Parts 2-4, a small KV
pool each) behind two routers running your balancer, one with `--policy round_robin` (the
baseline) and one with `--policy cache_aware`. The same kind of shared-prefix load (three
system prompts, different ones for each run so neither inherits the other's cache) streams
through each router in turn, while `PerformanceMonitor.collect_metrics` scrapes every
server's `/metrics` twice a second. Start-up takes a minute or two on a CPU.

**Predict first:** the simulator gave cache-aware routing a much higher hit rate than round
robin (section 3). Will the real servers show the same gap? Think about how many different
system prompts there are (three) and how many a replica's 128-block pool can hold at once.
""")
nb.code("""
# requires: model
import atexit, concurrent.futures, contextlib, httpx, json
from servinglab.bench.servers import ServerProcess, lab_server_command
from servinglab.model.prepare import require_model
from servinglab.serving.router import router_command
MODEL = str(require_model())
ENV = {"SERVINGLAB_IMPL": current_impl(), "OMP_NUM_THREADS": "1"}
stack = contextlib.ExitStack(); atexit.register(stack.close)
backend = lambda port: lab_server_command(MODEL, port, "smol", max_model_len=512, max_num_seqs=4, extra=("--num-kv-blocks", "128"))
servers = [ServerProcess(backend, env=ENV, name=f"replica-{i}") for i in range(3)]
for s in servers:
    stack.callback(s.stop)
with concurrent.futures.ThreadPoolExecutor(3) as pool:  # start side by side: each loads the model
    list(tqdm(pool.map(lambda s: s.__enter__(), servers), total=3, desc="starting replicas"))
BACKENDS = [s.base_url for s in servers]
routers = {pol: stack.enter_context(ServerProcess(lambda port, pol=pol: router_command(BACKENDS, port, pol), env=ENV, name=f"router-{pol}"))
           for pol in ("round_robin", "cache_aware")}
router = routers["cache_aware"]
print("routers", {pol: r.base_url for pol, r in routers.items()}, "over", BACKENDS)
print(httpx.get(router.base_url + "/health").json())
""")
nb.code("""
# requires: model
async def stream(client, base_url, prompt, max_tokens=12):
    body = {"model": "smol", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start, first = time.perf_counter(), None
    async with client.stream("POST", base_url + "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - start
    return first

async def run_load(base_url, prompts, concurrency=6, every=0.5):
    monitor, stop, sem = mon.PerformanceMonitor(BACKENDS), asyncio.Event(), asyncio.Semaphore(concurrency)
    async def sample():
        while not stop.is_set():
            await asyncio.to_thread(monitor.collect_metrics)
            await asyncio.sleep(every)
    async with httpx.AsyncClient(timeout=300) as client:
        sampler = asyncio.create_task(sample())
        async def one(p):
            async with sem:
                return await stream(client, base_url, p.text)
        ttfts = await asyncio.gather(*(one(p) for p in prompts))
        stop.set(); await sampler
    monitor.collect_metrics()
    return ttfts, monitor.metrics

def hit_rate(first, last):  # prefix-cache hit rate of the requests between two snapshots, all replicas together
    d = lambda key: sum(last["backends"][u][key] - first["backends"][u][key] for u in BACKENDS)
    return d("prefix_cache_hits") / max(d("prefix_cache_queries"), 1)

async with httpx.AsyncClient(timeout=300) as _client:  # warm every replica up (unmeasured, unshared prompts)
    await asyncio.gather(*(stream(_client, routers["round_robin"].base_url, f"Warm-up {i}: count to three.") for i in range(3)))
runs = {}
for pol, seed in (("round_robin", 8), ("cache_aware", 7)):  # one run each, same workload shape, fresh prefixes
    ttfts, snaps = await run_load(routers[pol].base_url, shared_prefix_workload(24, num_prefixes=3, seed=seed))
    runs[pol] = (ttfts, snaps)
    print(f"{pol:12} {len(ttfts)} requests, client-side TTFT p50 {np.percentile(ttfts, 50):.2f} s, "
          f"p99 {np.percentile(ttfts, 99):.2f} s, prefix-cache hit rate {hit_rate(snaps[0], snaps[-1]):.0%}")
rr_hit, ca_hit = (hit_rate(runs[p][1][0], runs[p][1][-1]) for p in ("round_robin", "cache_aware"))
rr_p50, ca_p50 = (np.percentile(runs[p][0], 50) for p in ("round_robin", "cache_aware"))
ratio = ca_p50 / rr_p50
speed = "lower" if ratio < 0.9 else "higher" if ratio > 1.1 else "about the same (within 10%: noise at this size)"
print(f"cache_aware vs round_robin in this run: hit rate {ca_hit:.0%} vs {rr_hit:.0%} "
      f"({'higher' if ca_hit > rr_hit else 'not higher'}), TTFT p50 {ratio:.2f}x, {speed} "
      f"(one run each on a possibly busy CPU: a ratio, not a benchmark)")
for url in BACKENDS:
    m = snaps[-1]["backends"][url]
    print(url, f"cumulative prefix-cache hit rate {m['prefix_cache_hit_rate']:.0%}, TTFT p50 {m['ttft']['p50']:.2f} s (server histogram)")
print("GPU:", snaps[-1]["gpu_status"], "| CPU", snaps[-1]["cpu_percent"], "% | memory", snaps[-1]["memory_percent"], "%")
""")
nb.tests("""
# requires: model
# Grades your PerformanceMonitor against the live servers (and your histogram_quantile).
_snap = mon.PerformanceMonitor(BACKENDS).collect_metrics()
assert set(_snap["backends"]) == set(BACKENDS) and "gpu_status" in _snap
assert sum(_snap["backends"][u]["ttft"]["count"] for u in BACKENDS) >= 24
assert mon.histogram_quantile(0.5, [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]) == 0.4
### BEGIN HIDDEN TESTS
assert all(_snap["backends"][u]["running"] == 0 for u in BACKENDS)
assert mon.histogram_quantile(0.9, [(0.1, 2), (0.5, 6), (1.0, 8), (math.inf, 10)]) == 1.0
### END HIDDEN TESTS
""", "monitor_test", points=2)
nb.code("""
# requires: model
t0 = snaps[0]["timestamp"]
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for i, url in enumerate(BACKENDS):
    ts = [s["timestamp"] - t0 for s in snaps if "error" not in s["backends"][url]]
    ms = [s["backends"][url] for s in snaps if "error" not in s["backends"][url]]
    axes[0].plot(ts, [m["running"] for m in ms], label=f"replica {i} running")
    axes[0].plot(ts, [m["waiting"] for m in ms], "--", label=f"replica {i} waiting")
    axes[1].plot(ts, [m["kv_cache_usage"] for m in ms], label=f"replica {i}")
    # Mean TTFT per scrape window: rate(sum) / rate(count), as a Prometheus query would.
    win = [((b["ttft"]["sum"] - a["ttft"]["sum"]) / (b["ttft"]["count"] - a["ttft"]["count"]), t)
           for a, b, t in zip(ms, ms[1:], ts[1:]) if b["ttft"]["count"] > a["ttft"]["count"]]
    axes[2].plot([t for _, t in win], [v for v, _ in win], "o-", ms=3, label=f"replica {i}")
axes[0].set_title("requests running / waiting"); axes[1].set_title("KV-cache usage (fraction)")
axes[2].set_title("mean TTFT per window (s)")
for ax in axes:
    ax.set_xlabel("seconds"); ax.legend(fontsize=7)
fig.tight_layout(); fig.savefig(OUT / "live_monitoring.png", dpi=120); plt.show()
""")
nb.code("""
# requires: model
stack.close()  # stop the router and the three replicas
""")

nb.md("""
## Recap

- A router sees only what it counts: requests in flight per replica (least outstanding, power
  of two) and what it sent where (cache aware). Power of two gets near-least-loaded balance
  from two looks; cache-aware routing turns N replicas' caches from N copies of the same
  prefixes into one shared, partitioned cache, and falls back to the least loaded replica
  when affinity would overload one (both thresholds must be exceeded).
- Failover is safe only before the first byte reaches the client; health checks take a dead
  replica out and bring it back after good probes, and a circuit breaker stops a flapping one.
- `/metrics` under vLLM's names is the contract: the same monitor, `deploy/prometheus.yml` and
  `deploy/grafana-dashboard.json` read the lab server and a real vLLM. Histograms give
  percentiles only by interpolating inside buckets, as `histogram_quantile` does.
- On the real servers section 4 printed both policies' hit rates side by side: with only three
  system prompts and room for all of them in each replica's pool, round robin also gets hits
  once every replica has seen every prompt, so the gap need not be as large as in the simulator, and
  the TTFT difference can vanish in the noise of one small run.
- `servinglab bench router` measures the policies on three real servers (`--with-vllm` makes
  one of them a real vLLM server).

## What vLLM does differently

vLLM itself serves one replica; routing lives in the **vLLM production-stack** router
(`src/vllm_router/routers/routing_logic.py`: round robin, session affinity by consistent
hashing, a prefix-aware policy over a hash trie of 128-character chunks, and a KV-aware one
that asks LMCache which replica really holds the blocks instead of guessing from history).
**llm-d**'s endpoint picker scores every replica on queue length, KV usage and prefix match
(default weights 2, 2, 3) from metrics the replicas publish. SGLang's router is in Rust and
keeps *one* radix tree with a set of tenants per node instead of one tree per replica.
Read `sgl-router/src/policies/cache_aware.rs` next, then vLLM's `vllm/v1/metrics/loggers.py`
for every metric the servers export.
""")

print("wrote", nb.save())
