"""``servinglab bench router``: routing policies x workloads over 3 real servers behind the router.

Three lab servers (separate processes; ``--with-vllm`` makes the third a real vLLM
server: the router must not care) sit behind one ``servinglab router`` per policy. Each
(policy, workload) run sends fresh prompts (a new seed, so no run warms the next one's
cache) with a fixed number in flight, and reports output throughput, TTFT p50/p99 as the
client sees it, each backend's prefix-cache hit rate over the run (from its own
``vllm:prefix_cache_hits`` / ``_queries`` counters) and the load imbalance (the router's
``router_outstanding_requests``, sampled: mean of max - min across backends).

Backends get a small KV pool (``--num-kv-blocks``) on purpose: a replica that receives
every prefix (round robin) must evict some, one that receives a third of them (cache
aware) need not. That is the whole effect SGLang reports at scale (hit rate 20% -> 75%).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from servinglab.bench.router_workloads import (
    RoutedPrompt,
    shared_prefix_workload,
    unique_workload,
)
from servinglab.bench.servers import (
    ServerProcess,
    lab_server_command,
    vllm_server_command,
)
from servinglab.serving.router import router_command

POLICIES = ("round_robin", "least_outstanding", "power_of_two", "cache_aware")
WORKLOADS = ("shared", "unique")
MODEL_NAME = "smol"


@dataclass
class RunResult:
    """One (policy, workload) run as the client and the servers saw it."""

    policy: str
    workload: str
    requests: int
    failed: int
    output_tokens: int
    wall_s: float
    ttft: list[float] = field(default_factory=list)
    hit_rate: list[float] = field(default_factory=list)  # per backend, over this run
    routed: list[float] = field(default_factory=list)  # requests per backend
    imbalance: float = 0.0  # mean over samples of max - min outstanding requests

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


def scrape(url: str) -> dict[str, float]:
    """Every sample of ``url``/metrics, summed over labels, by sample name."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def per_backend(router: str, name: str, urls: list[str]) -> list[float]:
    """A router series per backend label."""
    vals = dict.fromkeys(urls, 0.0)
    for fam in text_string_to_metric_families(httpx.get(f"{router}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name and s.labels.get("backend") in vals:
                vals[s.labels["backend"]] += s.value
    return [vals[u] for u in urls]


async def drive(router: str, prompts: list[RoutedPrompt], concurrency: int, max_tokens: int,
                bar: tqdm) -> tuple[list[float], int, int, float]:
    """Stream every prompt through the router; return (TTFTs, output tokens, failures, imbalance)."""
    sem, ttfts, counts = asyncio.Semaphore(concurrency), [], {"tokens": 0, "failed": 0}
    spreads: list[float] = []
    done = asyncio.Event()

    async def one(client: httpx.AsyncClient, p: RoutedPrompt) -> None:
        body = {"model": MODEL_NAME, "prompt": p.text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with sem:
            start, first, tokens = time.perf_counter(), None, 0
            try:
                async with client.stream("POST", f"{router}/v1/completions", json=body) as resp:
                    resp.raise_for_status()
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"]:
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
            except httpx.HTTPError:
                counts["failed"] += 1
            else:
                ttfts.append(first if first is not None else float("nan"))
                counts["tokens"] += tokens
            bar.update(1)

    async def sample(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            text = (await client.get(f"{router}/metrics")).text
            loads = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "router_outstanding_requests"]
            if loads:
                spreads.append(max(loads) - min(loads))
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        sampler = asyncio.create_task(sample(client))
        await asyncio.gather(*(one(client, p) for p in prompts))
        done.set()
        await sampler
    return ttfts, counts["tokens"], counts["failed"], float(np.mean(spreads)) if spreads else 0.0


def start_backends(num_kv_blocks: int, with_vllm: bool) -> list[ServerProcess]:
    """Three servers side by side (the third is vLLM with ``with_vllm``)."""
    from servinglab.model.prepare import require_model

    model = str(require_model())
    lab = lambda port: lab_server_command(model, port, MODEL_NAME, max_model_len=512, max_num_seqs=4,
                                          extra=("--num-kv-blocks", str(num_kv_blocks)))
    vllm = lambda port: vllm_server_command(model, port, MODEL_NAME, max_model_len=512, max_num_seqs=4)
    env = {"OMP_NUM_THREADS": "1"}
    procs = [ServerProcess(lab, env=env, name=f"lab-{i}") for i in range(2)]
    procs.append(ServerProcess(vllm if with_vllm else lab, env=env, startup_timeout=600, name="vllm" if with_vllm else "lab-2"))
    with cf.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: p.__enter__(), procs))
    return procs


def run_router_bench(num_requests: int = 48, concurrency: int = 8, max_tokens: int = 16, policies: tuple[str, ...] = POLICIES,
                     workloads: tuple[str, ...] = WORKLOADS, num_kv_blocks: int = 128, with_vllm: bool = False,
                     out: Path | None = None) -> list[RunResult]:
    """Run every (policy, workload) pair once; print the table; write ``out/router.json``."""
    bad = [p for p in policies if p not in POLICIES] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        raise ValueError(f"policies must be among {POLICIES} and workloads among {WORKLOADS}, got {bad}")
    if min(num_requests, concurrency, max_tokens, num_kv_blocks) < 1:
        raise ValueError("num_requests, concurrency, max_tokens and num_kv_blocks must be >= 1")
    backends, results = start_backends(num_kv_blocks, with_vllm), []
    urls = [b.base_url for b in backends]
    try:
        with tqdm(total=len(policies) * len(workloads) * num_requests, desc="bench router") as bar:
            for run, (workload, policy) in enumerate((w, p) for w in workloads for p in policies):
                prompts = (shared_prefix_workload if workload == "shared" else unique_workload)(num_requests, seed=1000 + run)
                with ServerProcess(lambda port, policy=policy: router_command(urls, port, policy), name=f"router-{policy}", startup_timeout=60) as r:
                    before = [scrape(u) for u in urls]
                    start = time.perf_counter()
                    ttfts, tokens, failed, spread = asyncio.run(drive(r.base_url, prompts, concurrency, max_tokens, bar))
                    wall = time.perf_counter() - start
                    after = [scrape(u) for u in urls]
                    routed = per_backend(r.base_url, "router_requests_total", urls)
                hits = [(a.get("vllm:prefix_cache_hits_total", 0) - b.get("vllm:prefix_cache_hits_total", 0),
                         a.get("vllm:prefix_cache_queries_total", 0) - b.get("vllm:prefix_cache_queries_total", 0)) for a, b in zip(after, before)]
                results.append(RunResult(policy, workload, num_requests, failed, tokens, wall, ttfts,
                                         [h / q if q else 0.0 for h, q in hits], routed, spread))
    finally:
        for b in backends:
            b.stop()
    print(router_table(results, with_vllm))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "router.json").write_text(json.dumps([asdict(r) | {"throughput": r.throughput} for r in results], indent=1))
    return results


def router_table(results: list[RunResult], with_vllm: bool = False) -> str:
    """Markdown table, one row per run; ratios are against round robin on the same workload."""
    base = {r.workload: r for r in results if r.policy == "round_robin"}
    rows = ["| workload | policy | output tok/s | vs round robin | TTFT p50 s | TTFT p99 s | hit rate per backend | requests per backend | mean max-min outstanding | failed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        ref = base.get(r.workload)
        ratio = f"{r.throughput / ref.throughput:.2f}x" if ref and ref.throughput else "-"
        p50, p99 = (np.nanpercentile(r.ttft, [50, 99]) if r.ttft else (float("nan"),) * 2)
        rows.append(f"| {r.workload} | {r.policy} | {r.throughput:.1f} | {ratio} | {p50:.2f} | {p99:.2f} | "
                    f"{' / '.join(f'{h:.0%}' for h in r.hit_rate)} | {' / '.join(f'{n:.0f}' for n in r.routed)} | {r.imbalance:.2f} | {r.failed} |")
    note = "backends: lab, lab, vLLM" if with_vllm else "backends: 3 lab servers"
    return "\n".join(rows) + f"\n({note}; one run each, all on this machine's cores: compare rows, not machines)"


def add_bench_router_arguments(p: argparse.ArgumentParser) -> None:
    """``servinglab bench router`` options."""
    p.add_argument("--num-requests", type=int, default=48, help="requests per (policy, workload) run")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--num-kv-blocks", type=int, default=128, help="KV blocks per lab backend (small: prefixes compete)")
    p.add_argument("--with-vllm", action="store_true", help="make the third backend a real vLLM server (about 2 minutes to start on CPU)")
    p.add_argument("--out", type=Path, default=Path("bench_results"))


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``servinglab bench router`` with parsed options."""
    run_router_bench(args.num_requests, args.concurrency, args.max_tokens, tuple(args.policies), tuple(args.workloads),
                     args.num_kv_blocks, args.with_vllm, args.out)
    return 0
