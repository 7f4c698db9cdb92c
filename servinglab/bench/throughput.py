"""``servinglab bench throughput``: the lab engine, vLLM and transformers on one workload.

All three run the same seeded requests (greedy, EOS ignored, so every system produces
exactly the requested tokens) on the same machine, one after another in one process
tree: the lab engine and transformers in this process, vLLM in a child process (its CPU
worker binds threads). Each system gets one warm-up request first. The table reports
output tokens per second and ratios to the lab engine, plus how many requests' first
32 greedy tokens agree between the lab engine and vLLM.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from servinglab.bench.workloads import Request


@dataclass
class ThroughputResult:
    system: str
    num_requests: int
    output_tokens: int
    elapsed_s: float
    token_ids: list[list[int]] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s


def bench_lab(model_dir: str, workload: list[Request], dtype: str = "float32", name: str = "lab engine", **engine_kwargs) -> ThroughputResult:
    """The lab engine (``servinglab.llm.LLM``) on the workload; ``engine_kwargs`` go to ``LLM``."""
    from servinglab.engine.llm import LLM
    from servinglab.engine.sampling import SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, **engine_kwargs)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in workload]
    prompts = [r.prompt_token_ids for r in workload]
    llm.generate(prompts[:1], params[:1], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ids = [o.outputs[0].token_ids for o in outs]
    return ThroughputResult(name, len(workload), sum(map(len, ids)), elapsed, ids)


def bench_vllm(model_dir: str, workload: list[Request], dtype: str = "float32") -> ThroughputResult:
    """Real vLLM (offline ``LLM.generate``, enforce_eager) in a child process."""
    from servinglab.bench.vllm_baseline import vllm_generate

    sampling = [{"temperature": 0.0, "max_tokens": r.output_len, "ignore_eos": True} for r in workload]
    res = vllm_generate(model_dir, [r.prompt_token_ids for r in workload], sampling, {"dtype": dtype})
    return ThroughputResult(res["build"] or "vllm", len(workload), res["output_tokens"], res["elapsed_s"], res["token_ids"])


def bench_hf_static(model_dir: str, workload: list[Request], dtype: str = "float32", batch_size: int = 16) -> ThroughputResult:
    """transformers ``generate`` with static batches (left padding); a batch runs until its longest
    request is done, and only the tokens each request asked for count as output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = model.config.eos_token_id

    def run(batch: list[Request]) -> None:
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch])
        longest = max(r.output_len for r in batch)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False, pad_token_id=pad)

    with torch.inference_mode():
        run(workload[:1])  # warm-up
        start = time.perf_counter()
        for i in tqdm(range(0, len(workload), batch_size), desc="transformers static batches", leave=False):
            run(workload[i : i + batch_size])
        elapsed = time.perf_counter() - start
    return ThroughputResult(f"transformers static batch {batch_size}", len(workload), sum(r.output_len for r in workload), elapsed)


def agreement(a: list[list[int]], b: list[list[int]], prefix: int = 32) -> float:
    """Share of requests whose first ``prefix`` tokens are identical."""
    same = sum(x[:prefix] == y[:prefix] for x, y in zip(a, b))
    return same / len(a)


def throughput_table(results: list[ThroughputResult]) -> str:
    base = results[0].tokens_per_s
    lines = [f"| system | requests | output tokens | time (s) | output tokens/s | vs {results[0].system} |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r.system} | {r.num_requests} | {r.output_tokens} | {r.elapsed_s:.1f} | {r.tokens_per_s:.1f} | {r.tokens_per_s / base:.2f}x |")
    return "\n".join(lines)


def save_results(out_dir: Path, name: str, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path


def run_throughput(
    model_dir: str, systems: list[str], workload: list[Request], dtype: str, out_dir: Path, hf_batch: int = 16,
    lab_cpu_gemm: tuple[str, ...] = ("auto",),
) -> list[ThroughputResult]:
    """Run the chosen systems on one workload; print and save the table (and a bar chart).

    ``lab_cpu_gemm`` lists the CPU matrix-product strategies to run the lab engine with
    (:mod:`servinglab.model.cpu_gemm`); more than one gives one lab row each, an ablation.
    ``dtype="auto"`` is resolved once (:mod:`servinglab.model.dtypes`), so every system runs the same dtype.
    """
    from servinglab.model.dtypes import cpu_summary, resolve_dtype

    asked, dtype = dtype, resolve_dtype(dtype, "cpu")
    print(f"dtype {asked} -> {dtype} (CPU: {cpu_summary()})")
    def lab_runner(mode: str):
        name = "lab engine" if len(lab_cpu_gemm) == 1 else f"lab engine, cpu_gemm={mode}"
        return lambda: bench_lab(model_dir, workload, dtype, name=name, cpu_gemm=mode)

    runners = {
        "lab": [lab_runner(mode) for mode in lab_cpu_gemm],
        "vllm": [lambda: bench_vllm(model_dir, workload, dtype)],
        "hf": [lambda: bench_hf_static(model_dir, workload, dtype, hf_batch)],
    }
    unknown = [s for s in systems if s not in runners]
    if unknown:
        raise ValueError(f"systems must be among {sorted(runners)}, got {unknown}")
    results = []
    for run in tqdm([run for s in systems for run in runners[s]], desc="systems"):
        results.append(run())
        print(f"{results[-1].system}: {results[-1].tokens_per_s:.1f} output tokens/s", flush=True)
    print(throughput_table(results))
    for other in results[1:]:
        print(f"{results[0].system} / {other.system}: {results[0].tokens_per_s / other.tokens_per_s:.2f}x")
    payload = {"workload": {"num_requests": len(workload), "output_tokens": sum(r.output_len for r in workload)},
               "dtype": dtype, "results": [{k: v for k, v in asdict(r).items() if k != "token_ids"} | {"tokens_per_s": r.tokens_per_s} for r in results]}
    with_ids = [r for r in results if r.token_ids is not None]
    if len(with_ids) >= 2:
        first, other = with_ids[0], with_ids[-1]  # the lab engine and vLLM, when both ran
        share = agreement(first.token_ids, other.token_ids)
        print(f"first 32 greedy tokens identical, {first.system} vs {other.system}: {share:.1%} of requests")
        payload["agreement_first32"] = share
    save_results(out_dir, "throughput", payload)
    _plot_bars(results, out_dir / "throughput.png")
    return results


def _plot_bars(results: list[ThroughputResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r.system for r in results], [r.tokens_per_s for r in results], color="tab:blue")
    ax.set_xlabel("output tokens/s (higher is better)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
