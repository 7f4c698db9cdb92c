"""``servinglab bench serve``: an online serving benchmark (vLLM's ``benchmark_serving`` in miniature).

A seeded workload of random-token prompts (``servinglab.workloads.random_workload``,
greedy, EOS ignored so every request yields exactly its tokens) goes to any
OpenAI-compatible server's streaming ``/v1/completions``, with arrivals drawn from a
Poisson process at ``request_rate`` requests/s (exponential gaps; ``inf`` sends all at
once). Each chunk's arrival time is recorded on the client, which gives, per request:

- TTFT: first chunk - send time;   E2E: last chunk - send time;
- TPOT: (E2E - TTFT) / (output tokens - 1);   ITL: gaps between consecutive chunks.

The statistics are computed by Part 6 (``serving_stats.compute_latency_stats`` and
``percentile``, loaded with ``load_part``), so the table is only as right as that part.

``--compare`` starts the lab server and the real vLLM server itself, one after the other
on free loopback ports with the same settings, runs the same workload at every rate on
both, and prints one table with vLLM/lab ratios. Only ratios from one run on one machine
mean anything; absolute numbers drift with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

from servinglab.bench.servers import ServerProcess, lab_server_command, vllm_server_command
from servinglab.bench.workloads import Request, random_workload
from servinglab.impl import current_impl, load_part

METRICS = ("ttft", "tpot", "itl", "e2e")


@dataclass
class RequestResult:
    """What the client saw of one streamed request (``time.perf_counter()`` seconds)."""

    prompt_len: int
    expected_tokens: int
    start: float
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""

    @property
    def success(self) -> bool:
        return not self.error and bool(self.chunk_times)

    def latencies(self) -> dict[str, list[float]]:
        """Per-request seconds: ``ttft``, ``e2e``, ``tpot`` (one value each) and every ``itl`` gap."""
        t = self.chunk_times
        out = {"ttft": [t[0] - self.start], "e2e": [t[-1] - self.start], "itl": list(np.diff(t)), "tpot": []}
        if self.output_tokens > 1:
            out["tpot"] = [(t[-1] - t[0]) / (self.output_tokens - 1)]
        return out


async def send_request(client: httpx.AsyncClient, base_url: str, model: str, req: Request) -> RequestResult:
    """Stream one completion and time its chunks; failures are recorded, never raised."""
    payload = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(len(req.prompt_token_ids), req.output_len, time.perf_counter())
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                elif chunk.get("choices") and chunk["choices"][0].get("text"):
                    res.chunk_times.append(time.perf_counter())
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_workload(base_url: str, model: str, workload: list[Request], request_rate: float, seed: int = 0,
                       api_key: str | None = None, desc: str = "requests") -> tuple[list[RequestResult], float]:
    """Send ``workload`` at a Poisson ``request_rate`` (req/s, ``inf`` for all at once); return results and wall time."""
    rng = np.random.default_rng(seed)
    gaps = np.zeros(len(workload)) if math.isinf(request_rate) else rng.exponential(1.0 / request_rate, len(workload))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(workload) + 8, max_keepalive_connections=len(workload) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits, headers=headers) as client:
        bar = tqdm(total=len(workload), desc=desc, unit="req", leave=False)

        async def one(req: Request) -> RequestResult:
            res = await send_request(client, base_url, model, req)
            bar.update(1)
            return res

        start, tasks = time.perf_counter(), []
        for req, gap in zip(workload, gaps):
            await asyncio.sleep(float(gap))
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        bar.close()
    return list(results), time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    """vLLM's benchmark table: counts, throughput, and mean / p50 / p90 / p99 of each latency in ms.

    The statistics are Part 6's (``load_part("serving_stats")``): TTFT, ITL and E2E come
    from ``compute_latency_stats`` over each request's chunk arrival times, and TPOT
    (which counts tokens, as vLLM's benchmark does, not chunks) from its ``percentile``.
    """
    stats_part = load_part("serving_stats")
    ok = [r for r in results if r.success]
    out: dict[str, float] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_output_tokens": sum(r.output_tokens for r in ok),
        "request_throughput": len(ok) / duration, "output_throughput": sum(r.output_tokens for r in ok) / duration,
    }
    nan = float("nan")
    try:
        chunk_stats = stats_part.compute_latency_stats([stats_part.RequestTimestamps(r.start, r.chunk_times) for r in ok]) if ok else {}
        tpot = [v * 1000 for r in ok for v in r.latencies()["tpot"]]
        for stat in ("mean", "p50", "p90", "p99"):
            for name in ("ttft", "itl", "e2e"):
                out[f"{stat}_{name}_ms"] = float(chunk_stats.get(f"{'avg' if stat == 'mean' else stat}_{name}_ms", nan))
            out[f"{stat}_tpot_ms"] = (sum(tpot) / len(tpot) if stat == "mean" else stats_part.percentile(tpot, float(stat[1:]))) if tpot else nan
    except NotImplementedError as exc:
        raise NotImplementedError(
            f"bench serve computes its statistics with your Part 6 ({current_impl()}.serving_stats: percentile, "
            "compute_latency_stats); implement them, or run with SERVINGLAB_IMPL=solutions") from exc
    return out


def plot_runs(runs: dict[str, dict[float, list[RequestResult]]], summaries: dict[str, dict[float, dict]], out: Path) -> list[Path]:
    """Latency CDFs (one panel per metric) and output throughput against request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for system, by_rate in runs.items():
        for rate, results in by_rate.items():
            for ax, name in zip(axes, METRICS):
                values = [v * 1000 for r in results if r.success for v in r.latencies()[name]]
                if values:
                    ax.ecdf(values, label=f"{system} @ {rate:g} req/s")
    for ax, name in zip(axes, METRICS):
        ax.set_xlabel(f"{name.upper()} (ms)"); ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of gaps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "latency_cdf.png"]
    fig.savefig(paths[0], dpi=110)
    fig2, ax = plt.subplots(figsize=(6, 4))
    for system, by_rate in summaries.items():
        rates = sorted(by_rate)
        xs = [r if math.isfinite(r) else max([x for x in rates if math.isfinite(x)], default=1) * 2 for r in rates]
        ax.plot(xs, [by_rate[r]["output_throughput"] for r in rates], "o-", label=system)
    ax.set_xlabel("request rate (req/s; inf drawn at 2x the largest)"); ax.set_ylabel("output tokens/s"); ax.grid(alpha=0.3); ax.legend()
    fig2.tight_layout()
    paths.append(out / "throughput_vs_rate.png")
    fig2.savefig(paths[1], dpi=110)
    plt.close(fig); plt.close(fig2)
    return paths


ROWS = [("completed", "{:.0f}"), ("request_throughput", "{:.2f}"), ("output_throughput", "{:.1f}")] + [
    (f"{s}_{m}_ms", "{:.1f}") for m in METRICS for s in ("mean", "p50", "p90", "p99")]


def format_table(summaries: dict[str, dict[float, dict]]) -> str:
    """One row per metric; per rate a column per system, plus ``B/A`` when two systems ran."""
    systems = list(summaries)
    rates = sorted({r for s in systems for r in summaries[s]})
    header = ["metric"]
    for rate in rates:
        header += [f"{s} @{rate:g}" for s in systems] + ([f"{systems[1]}/{systems[0]} @{rate:g}"] if len(systems) == 2 else [])
    lines = [header]
    for key, fmt in ROWS:
        row = [key]
        for rate in rates:
            vals = [summaries[s].get(rate, {}).get(key, float("nan")) for s in systems]
            row += [fmt.format(v) for v in vals] + ([f"{vals[1] / vals[0]:.2f}x" if vals[0] else "-"] if len(systems) == 2 else [])
        lines.append(row)
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in lines)


def bench_server(base_url: str, model: str, workload: list[Request], rates: list[float], seed: int, api_key: str | None, label: str) -> tuple[dict, dict]:
    """Warm up once, then run the workload at each rate; returns ({rate: results}, {rate: summary})."""
    asyncio.run(run_workload(base_url, model, workload[:1], math.inf, seed, api_key, desc=f"{label} warm-up"))
    runs, sums = {}, {}
    for rate in rates:
        results, duration = asyncio.run(run_workload(base_url, model, workload, rate, seed, api_key, desc=f"{label} @ {rate:g} req/s"))
        runs[rate], sums[rate] = results, summarize(results, duration)
    return runs, sums


def add_bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to benchmark (ignored with --compare)")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 64], metavar=("MIN", "MAX"))
    p.add_argument("--request-rates", type=float, nargs="+", default=[math.inf], help="req/s each; inf sends all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_results") / "serve")
    p.add_argument("--compare", action="store_true", help="start the lab server and the vLLM server and compare them")
    p.add_argument("--model-dir", type=Path, default=None, help="with --compare: model folder (default: the prepared SmolLM2)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-seqs", type=int, default=256)


def main_from_args(args: argparse.Namespace) -> int:
    for name in ("num_requests",):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    if any(not r > 0 for r in args.request_rates):
        raise SystemExit("error: --request-rates must be > 0 (or inf)")
    workload = random_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len), seed=args.seed)
    runs, sums = {}, {}
    if args.compare:
        from servinglab.model.prepare import require_model

        model_dir = str(args.model_dir or require_model())
        name = "bench-model"
        common = dict(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs)
        for system, cmd_fn, timeout in (("lab", lab_server_command, 300), ("vllm", vllm_server_command, 600)):
            with ServerProcess(lambda port: cmd_fn(model_dir, port, name, **common), startup_timeout=timeout, name=system) as srv:
                runs[system], sums[system] = bench_server(srv.base_url, name, workload, args.request_rates, args.seed, None, system)
    else:
        model = args.model or httpx.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
        runs["server"], sums["server"] = bench_server(args.base_url, model, workload, args.request_rates, args.seed, args.api_key, "server")
    args.out.mkdir(parents=True, exist_ok=True)
    table = format_table(sums)
    print(table)
    (args.out / "table.txt").write_text(table + "\n")
    raw = {s: {str(r): [asdict(x) for x in res] for r, res in by.items()} for s, by in runs.items()}
    (args.out / "results.json").write_text(json.dumps({"summaries": {s: {str(r): v for r, v in by.items()} for s, by in sums.items()},
                                                        "requests": raw, "args": {k: str(v) for k, v in vars(args).items() if k != "fn"}}, indent=1))
    for path in plot_runs(runs, sums, args.out):
        print("saved", path)
    return 0
