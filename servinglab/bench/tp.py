"""``servinglab bench tp``: tensor parallelism, TP=1 against TP=k on the same workload.

For each ``tensor_parallel_size`` it serves one seeded workload (random token prompts,
greedy, fixed output lengths) and reports output tokens/s, the ratio to TP=1, per-rank
weight / KV / resident memory, the greedy agreement with TP=1, and the collectives:

* **computed** volume per token that passes through the model: ``2 x layers + 1``
  all-reduces of ``hidden`` elements (o_proj and down_proj in every layer, Megatron
  section 3, plus the vocabulary-parallel embedding), and per *sampled* token a gather
  of ``vocab`` float32 logits (each rank contributes ``vocab / k``);
* **measured** elements and seconds in ``all_reduce`` / ``all_gather_into_tensor`` on
  rank 0 (the ranks wrap the two functions while the workload runs), next to the
  rank's total step time.

On a CPU with few cores TP=k is *slower* than TP=1: the ranks share the same cores
(``cores / k`` threads each), every all-reduce goes through gloo's loopback TCP, and
the driver pickles each step's inputs to every rank. On GPUs each rank has its own HBM
bandwidth and NVLink makes the all-reduces cheap, which is where TP pays. Numbers on a
shared machine are contended: compare the ratios within one run. Under heavy load a
2-thread TP=1 process can stall on its own thread barriers while 1-thread ranks do not;
``--tp1-threads 1`` gives TP=1 the threads of one rank.

``--random-weights smollm2-1.7b`` (32 heads: TP=2 and 4 work) builds random weights of
the published config (speed does not depend on the values); ``--device cuda`` puts
rank ``r`` on GPU ``r`` and uses NCCL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

# config.json of each model (docs/references.md section 1); speed does not depend on the weights' values.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, num_key_value_heads=32, head_dim=64,
                         intermediate_size=8192, vocab_size=49152, tie_word_embeddings=True),
}


def comm_per_token(hf_config: Any, dtype_bytes: int) -> dict[str, float]:
    """Elements and bytes of collectives per token through the model, and per sampled token."""
    reduces = 2 * hf_config.num_hidden_layers + 1
    return {
        "all_reduce_calls_per_step": reduces,
        "all_reduce_elements_per_token": reduces * hf_config.hidden_size,
        "all_reduce_bytes_per_token": reduces * hf_config.hidden_size * dtype_bytes,
        "logits_gather_bytes_per_sampled_token": hf_config.vocab_size * 4,
    }


def build_model(model_dir: str | None, random_weights: str | None, dtype: str):
    """``(model object or None, hf_config)``: random weights built once, or a folder each engine loads."""
    from transformers import LlamaConfig

    from servinglab.model.weights import load_config, random_model

    if random_weights is None:
        return None, load_config(model_dir)
    if random_weights not in RANDOM_CONFIGS:
        raise ValueError(f"--random-weights must be one of {sorted(RANDOM_CONFIGS)}, got {random_weights!r}")
    config = LlamaConfig(**RANDOM_CONFIGS[random_weights], max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return random_model(config, dtype=getattr(torch, dtype), seed=0), config


def _run_one(size: tuple[int, int], model_obj, hf_config, model_dir: str | None, workload, common: dict[str, Any],
             tp1_threads: int | None = None) -> dict[str, Any]:
    from servinglab.engine.llm import LLM
    from servinglab.engine.sampling import SamplingParams

    tp, pp = size
    kwargs = dict(common, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if tp * pp > 1:
        kwargs["extra"] = {"tp_profile_collectives": True}
    if model_obj is not None:
        llm = LLM(model_obj=model_obj, hf_config=hf_config, **kwargs)
    else:
        llm = LLM(model_dir, **kwargs)
    engine = llm.engine
    threads = torch.get_num_threads()
    if tp * pp == 1 and tp1_threads:
        torch.set_num_threads(tp1_threads)  # TP=k ranks get cores // k threads each (distributed.init_rank)
    try:
        warm = list(reversed(workload[0].prompt_token_ids))  # not a prefix of the workload: no prefix-cache hit later
        llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        if engine.tp_executor is not None:
            engine.tp_executor.rank_stats(reset=True)  # measure the workload only
        params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
        steps0 = engine.num_steps
        engine.record_steps, engine.step_log = True, []
        start = time.perf_counter()
        outs = llm.generate([r.prompt_token_ids for r in workload], params, use_tqdm=True)
        elapsed = time.perf_counter() - start
        engine.record_steps = False
        row: dict[str, Any] = {"tp": tp, "pp": pp, "seconds": elapsed, "steps": engine.num_steps - steps0,
                               # tokens through the model: the last sampled token of a request is never fed back
                               "processed_tokens": sum(n for rec in engine.step_log for _, n, _ in rec.scheduled),
                               "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                               "tokens": [o.outputs[0].token_ids for o in outs], "num_kv_blocks_per_rank": engine.num_kv_blocks}
        if engine.tp_executor is None:
            import psutil

            row["ranks"] = [{
                "rank": 0,
                "weight_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
                "kv_bytes": sum(2 * k.numel() * k.element_size() for k, _ in engine.runner.kv_caches),
                "rss_bytes": psutil.Process().memory_info().rss,
                **({"cuda_max_allocated_bytes": torch.cuda.max_memory_allocated()} if engine.device.type == "cuda" else {}),
            }]
        else:
            row["ranks"] = engine.tp_executor.rank_stats()
        return row
    finally:
        torch.set_num_threads(threads)
        if engine.tp_executor is not None:
            engine.tp_executor.shutdown()


def run_tp_bench(model_dir: str | None, tp_sizes: list[int], *, pp_sizes: tuple[int, ...] = (), random_weights: str | None = None, device: str = "auto",
                 dtype: str | None = None, num_requests: int = 16, prompt_len: tuple[int, int] = (32, 96),
                 output_len: int = 32, kv_cache_memory_gib: float = 0.25, seed: int = 0, out: Path | None = None,
                 tp1_threads: int | None = None) -> list[dict[str, Any]]:
    """Run the workload at every TP size (TP=1 first), then at every PP size alone and with each TP size;
    print the table (and, with ``pp_sizes``, the measured pipeline bubble); save JSON and a PNG under ``out``."""
    from servinglab.bench.workloads import random_workload
    from servinglab.impl import load_part
    from servinglab.model.tp_layers import local_config

    sizes = sorted(set([1] + list(tp_sizes)))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtype = dtype or ("bfloat16" if cuda else "float32")  # bf16 is emulated (slow) on AVX2-only CPUs
    model_obj, hf_config = build_model(model_dir, random_weights, dtype)
    for k in sizes:
        local_config(hf_config, k)  # Part 9's divisibility error before any run
    load_part("tensor_parallel")
    workload = random_workload(num_requests, prompt_len, (output_len, output_len), vocab_size=hf_config.vocab_size, seed=seed)
    common = dict(dtype=dtype, device="cuda" if cuda else "cpu", kv_cache_memory_gib=kv_cache_memory_gib,
                  max_model_len=prompt_len[1] + output_len + 8)
    # With a shared model object TP=1 runs last: its engine moves (on a CPU in bf16, repacks) the model in place.
    grid = [(k, 1) for k in sizes] + [(k, p) for p in pp_sizes for k in sizes]
    order = grid[1:] + grid[:1] if model_obj is not None else grid
    by_size = {k: _run_one(k, model_obj, hf_config, model_dir, workload, common, tp1_threads) for k in order}
    rows = [by_size[k] for k in grid]
    comm = comm_per_token(hf_config, torch.empty((), dtype=getattr(torch, dtype)).element_size())
    processed = rows[0]["processed_tokens"]
    base = rows[0]
    for row in rows:
        row["tokens_per_s"] = row["output_tokens"] / row["seconds"]
        row["ratio"] = row["tokens_per_s"] / (base["output_tokens"] / base["seconds"])
        row["greedy_agreement"] = sum(a == b for a, b in zip(row["tokens"], base["tokens"])) / len(workload)
        if row.get("pp", 1) > 1:  # stage boundaries: hidden + residual sent per token, by tensor-parallel rank 0 of each stage
            row["p2p_elements_per_token"] = sum(r.get("p2p_elements", 0) for r in row["ranks"] if r.get("tp_rank") == 0) / row["processed_tokens"]
        coll = row["ranks"][0].get("collectives")
        if coll:
            row["measured_all_reduce_elements_per_token"] = coll["elements"]["all_reduce"] / row["processed_tokens"]
            row["measured_all_reduce_calls_per_step"] = coll["calls"]["all_reduce"] / row["steps"]
            row["collective_seconds"] = sum(coll["seconds"].values())
            row["collective_share_of_step"] = row["collective_seconds"] / max(row["ranks"][0]["step_seconds"], 1e-9)
    print(tp_table(rows, comm, hf_config, dtype, "cuda" if cuda else "cpu", processed))
    bubbles = _bubbles(model_dir, model_obj, hf_config, pp_sizes, common)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        slim = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
        (out / "tp.json").write_text(json.dumps({"comm_per_token": comm, "rows": slim, "bubble": bubbles}, indent=2))
        _plot(rows, out / "tp.png")
    return rows


def _bubbles(model_dir: str | None, model_obj, hf_config, pp_sizes: tuple[int, ...], common: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline bubble at 1, 2 and 4 micro-batches for every PP size (servinglab.bench.pp); prints the table."""
    from servinglab.bench.pp import bubble_table, measure_bubble
    from servinglab.engine.llm import LLM

    rows: list[dict[str, Any]] = []
    for pp in pp_sizes:
        kwargs = dict(common, pipeline_parallel_size=pp, num_kv_blocks=64, max_model_len=512)
        llm = LLM(model_obj=model_obj, hf_config=hf_config, **kwargs) if model_obj is not None else LLM(model_dir, **kwargs)
        try:
            rows += measure_bubble(llm, (1, 2, 4), tokens=128)
        finally:
            llm.engine.tp_executor.shutdown()
    if rows:
        print(bubble_table(rows))
    return rows


def tp_table(rows: list[dict[str, Any]], comm: dict[str, float], hf_config: Any, dtype: str, device: str, processed: int) -> str:
    """The markdown table ``servinglab bench tp`` prints."""
    mib = 2**20
    lines = [f"model: {hf_config.num_hidden_layers} layers, hidden {hf_config.hidden_size}, {hf_config.num_attention_heads} heads / "
             f"{hf_config.num_key_value_heads} KV heads, {dtype} on {device}; {processed} tokens through the model",
             f"computed per token: {comm['all_reduce_calls_per_step']} all-reduces of hidden = "
             f"{comm['all_reduce_elements_per_token']:,} elements ({comm['all_reduce_bytes_per_token']:,} B); "
             f"logits gather {comm['logits_gather_bytes_per_sampled_token']:,} B per sampled token", "",
             "| TP x PP | tok/s | vs TP=1 | greedy = TP=1 | weights MiB/rank | KV MiB/rank | KV blocks/rank | RSS MiB/rank "
             "| all-reduces/step (measured) | all-reduce elems/token (measured) | s in collectives (rank 0) | share of rank step time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        rank0 = r["ranks"][0]
        rss = max((x.get("rss_bytes") or 0) for x in r["ranks"]) / mib
        meas = r.get("measured_all_reduce_elements_per_token")
        calls = r.get("measured_all_reduce_calls_per_step")
        lines.append(
            f"| {r['tp']} x {r.get('pp', 1)} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | {r['greedy_agreement']:.0%} | {rank0['weight_bytes'] / mib:.1f} "
            f"| {rank0['kv_bytes'] / mib:.1f} | {r['num_kv_blocks_per_rank']} | {rss:.0f} | {'-' if calls is None else f'{calls:g}'} | {'-' if meas is None else f'{meas:,.0f}'} "
            f"| {r.get('collective_seconds', 0.0):.2f} | {r.get('collective_share_of_step', 0.0):.0%} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"TP={r['tp']}" + (f" PP={r['pp']}" if r.get("pp", 1) > 1 else "") for r in rows]
    a.bar(labels, [r["tokens_per_s"] for r in rows])
    a.set_ylabel("output tokens/s")
    a.set_title("throughput")
    b.bar(labels, [r["ranks"][0]["weight_bytes"] / 2**20 for r in rows], label="weights")
    b.bar(labels, [r["ranks"][0]["kv_bytes"] / 2**20 for r in rows], bottom=[r["ranks"][0]["weight_bytes"] / 2**20 for r in rows],
          label="KV cache")
    b.set_ylabel("MiB per rank")
    b.set_title("memory per rank (same KV GiB per rank)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_bench_tp_arguments(p: Any) -> None:
    """The ``servinglab bench tp`` options."""
    p.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--random-weights", choices=sorted(RANDOM_CONFIGS), default=None,
                   help="random weights of a published config instead of a folder (e.g. smollm2-1.7b on GPUs)")
    p.add_argument("--tp", type=int, nargs="+", default=None, help="tensor_parallel_size values besides 1 (default: 3 for "
                   "SmolLM2-135M, 2 for --random-weights smollm2-1.7b)")
    p.add_argument("--pp", type=int, nargs="*", default=[], help="pipeline_parallel_size values: rows alone and with each TP "
                   "size, and the measured bubble at 1, 2 and 4 micro-batches against GPipe's (p-1)/(m+p-1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--kv-cache-memory-gib", type=float, default=0.25, help="KV memory per rank")
    p.add_argument("--tp1-threads", type=int, default=None,
                   help="torch threads for the TP=1 run (default: torch's); 1 matches one TP rank on a busy machine")
    p.add_argument("--out", type=Path, default=Path("bench_results"))


def main_from_args(args: Any) -> int:
    """Entry point of ``servinglab bench tp``."""
    from servinglab.model.prepare import require_model

    model_dir = None if args.random_weights else str(args.model or require_model())
    tp_sizes = args.tp or ([2] if args.random_weights == "smollm2-1.7b" else [3])
    run_tp_bench(model_dir, tp_sizes, pp_sizes=tuple(args.pp), random_weights=args.random_weights, device=args.device, dtype=args.dtype,
                 num_requests=args.num_requests, output_len=args.output_len, kv_cache_memory_gib=args.kv_cache_memory_gib,
                 out=args.out / "tp", tp1_threads=args.tp1_threads)
    return 0
