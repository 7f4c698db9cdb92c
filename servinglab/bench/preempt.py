"""``servinglab bench preempt``: preemption by recompute against preemption by swap.

One seeded workload (random token prompts, greedy, fixed output lengths) runs on a KV
pool that holds only ``--kv-fraction`` of what the requests need at once, so the
scheduler must preempt. Each ``preemption_mode`` serves the same requests; the table
reports output tokens/s, TTFT and TPOT (p50 / p99), preemptions by kind, KV blocks moved
between device and host (both ways), tokens recomputed (tokens through the model beyond
the minimum: every prompt token once and every output token but the last once), and
whether the greedy tokens equal the first mode's.

What decides the winner (vLLM paper, Kwon et al., SOSP 2023, sections 4.5 and 7.3):
a swap moves ``2 x layers x kv_heads x head_dim x dtype bytes`` per token each way
(over PCIe on a GPU, a memory copy on a CPU); a recompute runs every layer's matrix
products again over the preempted tokens, but as one batched prefill, which a GPU does
at high utilisation. The setup guide's "Common Issue 3" says recompute is the faster
choice; the bench measures it on the machine at hand (``--device cuda`` on a GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servinglab.bench.tp import RANDOM_CONFIGS, build_model

MODES = ("recompute", "swap")


def kv_demand_blocks(workload: list[Any], block_size: int) -> int:
    """Blocks the whole workload needs at once: every request at its full length."""
    return sum(-(-(len(r.prompt_token_ids) + r.output_len) // block_size) for r in workload)


def _percentiles(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    return (float(np.percentile(arr, 50)), float(np.percentile(arr, 99))) if arr.size else (float("nan"), float("nan"))


def run_mode(mode: str, model_obj, hf_config, model_dir: str | None, workload: list[Any], common: dict[str, Any]) -> dict[str, Any]:
    """Serve ``workload`` with one ``preemption_mode``; return its row (tokens included, under ``tokens``)."""
    from servinglab.engine.llm import LLM
    from servinglab.engine.sampling import SamplingParams

    kwargs = dict(common, preemption_mode=mode)
    llm = LLM(model_obj=model_obj, hf_config=hf_config, **kwargs) if model_obj is not None else LLM(model_dir, **kwargs)
    engine = llm.engine
    warm = list(reversed(workload[0].prompt_token_ids))  # not a prefix of the workload: no prefix-cache hit later
    llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    engine.runner.num_swapped_blocks = 0
    engine.scheduler.preemption_counts.clear()
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    engine.record_steps, engine.step_log = True, []
    start = time.perf_counter()
    outs = llm.generate([r.prompt_token_ids for r in workload], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    engine.record_steps = False
    processed = sum(n for rec in engine.step_log for _, n, _ in rec.scheduled)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    minimum = sum(len(r.prompt_token_ids) for r in workload) + output_tokens - len(workload)
    ttft = _percentiles([o.metrics.ttft for o in outs])
    tpot = _percentiles([o.metrics.tpot for o in outs])
    return {
        "mode": mode, "seconds": elapsed, "output_tokens": output_tokens, "tokens_per_s": output_tokens / elapsed,
        "ttft_p50_ms": 1e3 * ttft[0], "ttft_p99_ms": 1e3 * ttft[1], "tpot_p50_ms": 1e3 * tpot[0], "tpot_p99_ms": 1e3 * tpot[1],
        "preemptions": dict(engine.scheduler.preemption_counts), "blocks_moved": engine.runner.num_swapped_blocks,
        "tokens_recomputed": processed - minimum, "steps": len(engine.step_log), "num_kv_blocks": engine.num_kv_blocks,
        "num_host_blocks": engine.num_host_blocks, "tokens": [o.outputs[0].token_ids for o in outs],
    }


def run_preempt_bench(model_dir: str | None, *, random_weights: str | None = None, device: str = "auto", dtype: str | None = None,
                      num_requests: int = 16, prompt_len: tuple[int, int] = (32, 96), output_len: int = 48,
                      kv_fraction: float = 0.4, block_size: int = 16, swap_space: float = 1.0, max_num_batched_tokens: int = 512,
                      seed: int = 0, out: Path | None = None, model_obj=None, hf_config=None, quiet: bool = False) -> list[dict[str, Any]]:
    """Run the workload under each preemption mode; print the table; save JSON and a PNG under ``out``.

    ``model_obj`` / ``hf_config`` pass a ready model (a notebook's tiny one); otherwise the
    folder or ``random_weights`` is used. ``kv_fraction`` sizes the KV pool as a share of
    :func:`kv_demand_blocks` (never below what the longest request needs alone).
    """
    from servinglab.bench.workloads import random_workload

    if not 0 < kv_fraction <= 1:
        raise ValueError(f"kv_fraction must be in (0, 1], got {kv_fraction!r}")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtype = dtype or ("bfloat16" if cuda else "float32")
    if model_obj is None:
        model_obj, hf_config = build_model(model_dir, random_weights, dtype)
    workload = random_workload(num_requests, prompt_len, (output_len, output_len), vocab_size=hf_config.vocab_size, seed=seed)
    demand = kv_demand_blocks(workload, block_size)
    longest = max(-(-(len(r.prompt_token_ids) + r.output_len) // block_size) for r in workload)
    num_kv_blocks = max(int(kv_fraction * demand), longest)
    common = dict(dtype=dtype, device="cuda" if cuda else "cpu", block_size=block_size, num_kv_blocks=num_kv_blocks,
                  swap_space=swap_space, max_num_batched_tokens=max_num_batched_tokens,
                  max_model_len=prompt_len[1] + output_len + block_size)
    rows = [run_mode(mode, model_obj, hf_config, model_dir, workload, common) for mode in MODES]
    for row in rows:
        row["greedy_equal"] = sum(a == b for a, b in zip(row["tokens"], rows[0]["tokens"])) / len(workload)
        row["ratio"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    header = (f"{num_requests} requests, prompts {prompt_len[0]}-{prompt_len[1]}, {output_len} output tokens, {dtype} on "
              f"{'cuda' if cuda else 'cpu'}; KV pool {num_kv_blocks} blocks of {block_size} = {num_kv_blocks / demand:.0%} of the "
              f"{demand} the workload needs at once")
    if not quiet:
        print(preempt_table(rows, header))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
        (out / "preempt.json").write_text(json.dumps({"header": header, "rows": slim}, indent=2))
        _plot(rows, out / "preempt.png")
    return rows


def preempt_table(rows: list[dict[str, Any]], header: str = "") -> str:
    """The markdown table ``servinglab bench preempt`` prints, and which mode won."""
    lines = [header, "", "| preemption_mode | tok/s | vs recompute | TTFT p50 / p99 ms | TPOT p50 / p99 ms | preemptions "
             "| blocks moved | tokens recomputed | greedy = recompute |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["preemptions"].items())) or "none"
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} "
                     f"| {r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {kinds} | {r['blocks_moved']} "
                     f"| {r['tokens_recomputed']} | {r['greedy_equal']:.0%} |")
    best = max(rows, key=lambda r: r["tokens_per_s"])
    other = next(r for r in rows if r is not best)
    lines.append(f"\nfaster here: {best['mode']}, {best['tokens_per_s'] / other['tokens_per_s']:.2f}x the tokens/s of {other['mode']}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [r["mode"] for r in rows]
    a.bar(labels, [r["tokens_per_s"] for r in rows])
    a.set_ylabel("output tokens/s")
    a.set_title("throughput under forced preemption")
    x = np.arange(len(rows))
    b.bar(x - 0.2, [r["ttft_p99_ms"] for r in rows], 0.4, label="TTFT p99")
    b.bar(x + 0.2, [r["tpot_p99_ms"] * 10 for r in rows], 0.4, label="TPOT p99 x10")
    b.set_xticks(x, labels)
    b.set_ylabel("ms")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_bench_preempt_arguments(p: Any) -> None:
    """The ``servinglab bench preempt`` options."""
    p.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--random-weights", choices=sorted(RANDOM_CONFIGS), default=None, help="random weights of a published config")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--kv-fraction", type=float, default=0.4, help="KV pool as a share of what the workload needs at once")
    p.add_argument("--swap-space", type=float, default=1.0, help="GiB of host memory for swapped blocks")
    p.add_argument("--out", type=Path, default=Path("bench_results"))


def main_from_args(args: Any) -> int:
    """Entry point of ``servinglab bench preempt``."""
    from servinglab.model.prepare import require_model

    model_dir = None if args.random_weights else str(args.model or require_model())
    run_preempt_bench(model_dir, random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                      num_requests=args.num_requests, output_len=args.output_len, kv_fraction=args.kv_fraction,
                      swap_space=args.swap_space, out=args.out / "preempt")
    return 0
