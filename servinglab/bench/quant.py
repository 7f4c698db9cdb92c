"""``servinglab bench quant``: weight bytes, peak memory, decode speed and quality of bf16 / int8 / int4.

One row per variant, all in one process, same workload (speed depends on the shapes, not
on the values, so random weights of a bigger config are fine for speed):

* **weight bytes**: the model's ``state_dict`` (codes + scales for quantized layers);
* **peak memory**: CPU, the highest resident set size sampled while the variant loads and
  runs, minus the size before it loaded (the first row also pays libraries' one-time
  set-up, and on a bfloat16 CPU its packed oneDNN / float32 copies, see
  :mod:`servinglab.model.cpu_gemm`); CUDA, ``torch.cuda.max_memory_allocated`` over
  loading, quantizing, tuning the kernels, capturing and running (no dequantized weight
  is ever made there: :mod:`servinglab.model.quant_gemm`). The KV cache is a set size
  (``--kv-cache-gib``), so the CUDA table also gives the peak without it: the model's own
  footprint, what quantization can shrink;
* **decode tok/s at batch 1 and 32**: ``B x N / (t(1 + N tokens) - t(1 token))``, i.e. the
  time of ``N`` decode steps with the prefill subtracted (after a warm-up run; each time
  the best of two);
* **perplexity** on the stdlib docstrings (:mod:`servinglab.bench.quality`, real weights
  only) and **greedy agreement** with the first row.

The baseline dtype is bfloat16 where the CPU computes in it natively (AVX512-BF16 or AMX
flags in ``/proc/cpuinfo``) or on CUDA; elsewhere float32, since emulated bfloat16 is
several times slower there. ``--compile`` adds rows with ``torch.compile`` of the
decoder layers' projections and MLPs (the attention stays eager: it calls the student's
paged attention, Python-side planning over block tables); on CPUs only: on CUDA the
engine runs its own fused forward under CUDA graphs captured while it is built, so those
modules never run in a decode step (an earlier version compiled them after the capture
and reported graphs that replayed uncompiled kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from servinglab.bench.quality import PROMPTS, greedy_agreement, perplexity, stdlib_docstring_text, text_fingerprint, token_windows
from servinglab.bench.quant_timing import decode_tok_s, prefill_tok_s

RANDOM_CONFIGS = {  # from each model's config.json (REFERENCE table in docs/references.md)
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536),
    "smollm2-1.7b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192),
}


@dataclass
class QuantRow:
    """One variant's figures (``None`` where not measured)."""

    name: str
    dtype: str
    quantization: str | None
    compiled: bool
    weight_bytes: int
    linear_bytes: int
    peak_memory_bytes: int
    decode_tok_s_b1: float
    decode_tok_s_b32: float
    prefill_tok_s: float | None = None  # CUDA: 16 prompts of 1,000 tokens (M = 2,048 rows a step)
    perplexity: float | None = None
    greedy_identical: float | None = None
    greedy_common_prefix: float | None = None
    kv_cache_bytes: int = 0  # the engine's KV cache, part of the peak (a configured size)

    @property
    def peak_without_kv_bytes(self) -> int:
        """The peak less the KV cache: the model's own footprint, what quantization can shrink."""
        return self.peak_memory_bytes - self.kv_cache_bytes


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX); otherwise torch emulates it, slowly."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def baseline_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"


class PeakRss:
    """Samples this process's resident set size every 5 ms; ``peak - start`` after ``stop()``."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(0, self.peak - self.start)


def load_variant(model_dir: str | None, random_name: str | None, dtype: torch.dtype, device: str):
    """``(model, hf_config, tokenizer or None)``: fresh weights for one variant."""
    from servinglab.model.weights import load_model, random_model, tiny_llama_config

    if random_name is not None:
        config = tiny_llama_config(vocab_size=49152, max_position_embeddings=8192, **RANDOM_CONFIGS[random_name])
        return random_model(config, dtype=dtype, seed=0), config, None  # the engine moves it to the device
    from transformers import AutoTokenizer

    model, config = load_model(model_dir, dtype=dtype, device=device)
    return model, config, AutoTokenizer.from_pretrained(model_dir)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each layer's MLP and the attention projections (attention itself stays eager)."""
    for layer in model.model.layers:
        layer.mlp = torch.compile(layer.mlp, dynamic=True)
        layer.self_attn.qkv_proj = torch.compile(layer.self_attn.qkv_proj, dynamic=True)
        layer.self_attn.o_proj = torch.compile(layer.self_attn.o_proj, dynamic=True)


def run_variant(args: argparse.Namespace, dtype: str, quantization: str | None, compiled: bool, windows, baseline_tokens):
    """Load, (quantize via the engine), measure; returns ``(row, greedy tokens)``."""
    from servinglab.engine.llm import LLM
    from servinglab.engine.sampling import SamplingParams
    from servinglab.model.quant import weight_bytes

    gc.collect()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss = PeakRss()
    model, config, tokenizer = load_variant(args.model, args.random_weights, getattr(torch, dtype), args.device)
    llm = LLM(model_obj=model, hf_config=config, tokenizer=tokenizer, dtype=dtype, device=args.device,
              quantization=quantization, quantization_group_size=args.group_size, max_num_seqs=64,
              kv_cache_memory_gib=args.kv_cache_gib, max_model_len=1024)
    if compiled:
        compile_blocks(llm.engine.model)
    wb = weight_bytes(llm.engine.model)
    b1 = decode_tok_s(llm, config.vocab_size, 1, args.steps)
    b32 = decode_tok_s(llm, config.vocab_size, 32, args.steps)
    prefill = prefill_tok_s(llm, config.vocab_size) if cuda else None
    ppl, tokens = None, None
    if windows is not None:
        ppl = perplexity(llm.engine.model, windows, progress=True)
        params = SamplingParams(temperature=0.0, max_tokens=args.greedy_tokens)
        tokens = [o.outputs[0].token_ids for o in llm.generate(list(PROMPTS), params, use_tqdm=False)]
    peak = torch.cuda.max_memory_allocated() if cuda else rss.stop()
    if cuda:
        rss.stop()
    name = (quantization or dtype) + (" + compile" if compiled else "")
    kv_bytes = sum(t.numel() * t.element_size() for pair in llm.engine.runner.kv_caches for t in pair)
    row = QuantRow(name, dtype, quantization, compiled, wb.total, wb.linear, peak, b1, b32, prefill, ppl, kv_cache_bytes=kv_bytes)
    if tokens is not None and baseline_tokens is not None:
        agree = greedy_agreement(baseline_tokens, tokens)
        row.greedy_identical, row.greedy_common_prefix = agree["identical"], agree["mean_common_prefix"]
    del llm, model
    return row, tokens


def quant_table(rows: list[QuantRow]) -> str:
    """Markdown table; speed-ups and memory ratios relative to the first row."""
    base = rows[0]
    lines = ["| variant | weights MB | projections MB | peak MB | peak without KV cache, vs base weights | b1 tok/s | b32 tok/s | "
             "b1 vs base | b32 vs base | prefill tok/s | prefill vs base | perplexity | greedy identical |",
             "|" + " --- |" * 13]
    for r in rows:
        ppl = "-" if r.perplexity is None else f"{r.perplexity:.3f}"
        agree = "-" if r.greedy_identical is None else f"{r.greedy_identical:.0%}"
        prefill = ("- | -" if r.prefill_tok_s is None or base.prefill_tok_s is None
                   else f"{r.prefill_tok_s:.0f} | {r.prefill_tok_s / base.prefill_tok_s:.2f}x")
        lines.append(f"| {r.name} | {r.weight_bytes / 1e6:.1f} | {r.linear_bytes / 1e6:.1f} | {r.peak_memory_bytes / 1e6:.0f} | "
                     f"{r.peak_without_kv_bytes / 1e6:.0f} MB, {r.peak_without_kv_bytes / base.weight_bytes:.2f}x | "
                     f"{r.decode_tok_s_b1:.1f} | {r.decode_tok_s_b32:.1f} | {r.decode_tok_s_b1 / base.decode_tok_s_b1:.2f}x | "
                     f"{r.decode_tok_s_b32 / base.decode_tok_s_b32:.2f}x | {prefill} | {ppl} | {agree} |")
    return "\n".join(lines)


def run_bench_quant(args: argparse.Namespace) -> list[QuantRow]:
    """Every variant of ``args``; prints the table and writes ``quant.json`` to ``args.out``."""
    from tqdm.auto import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but no CUDA device is available (use --device cpu)")
    if args.random_weights is None and args.model is None:
        from servinglab.model.prepare import require_model

        args.model = str(require_model())
    dtype = args.dtype or baseline_dtype(args.device)
    windows, fingerprint, ids = None, None, None
    if args.random_weights is None:
        from transformers import AutoTokenizer

        text = stdlib_docstring_text()
        fingerprint = text_fingerprint(text)
        ids = AutoTokenizer.from_pretrained(args.model)(text)["input_ids"]
        windows = token_windows(ids, args.ppl_window, args.ppl_windows)
    if args.projections_only:
        args.out.mkdir(parents=True, exist_ok=True)
        proj = projections_on_cuda(args, [])
        (args.out / "quant.json").write_text(json.dumps({"device": args.device, "projections": proj}, indent=2) + "\n")
        return []
    variants = [(None, False), ("int8", False), ("int4", False)]
    if args.device == "cuda" and dtype == "bfloat16" and torch.cuda.get_device_capability() >= (8, 9):
        variants.append(("fp8", False))  # servinglab.model.fp8_linear: FP8 tensor cores only
    if args.compile and args.device == "cuda":
        # The CUDA engine runs its own fused forward (servinglab.model.gpu_ops) and captures it as CUDA graphs while
        # it is built: the PyTorch modules torch.compile would wrap never run in a decode step, and compiling after the
        # capture changes nothing that replays. torch.compile on CUDA is in the projections table (torchao rows).
        print("--compile: no engine rows on CUDA (the engine's fused Triton forward runs under CUDA graphs, not the "
              "modules torch.compile wraps); see the projections table's torchao + torch.compile rows")
    elif args.compile:
        variants += [(q, True) for q, _ in variants]
    rows: list[QuantRow] = []
    baseline_tokens = None
    for quantization, compiled in tqdm(variants, desc="variants"):
        row, tokens = run_variant(args, dtype, quantization, compiled, windows, baseline_tokens)
        if baseline_tokens is None:
            baseline_tokens = tokens
            if tokens is not None:
                row.greedy_identical, row.greedy_common_prefix = 1.0, float(args.greedy_tokens)
        rows.append(row)
    print(quant_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"device": args.device, "dtype": dtype, "model": args.random_weights or args.model, "text": fingerprint,
               "threads": torch.get_num_threads(), "rows": [asdict(r) for r in rows]}
    if args.device == "cuda" and args.projection_rows:
        payload["projections"] = projections_on_cuda(args, rows)
    if ids is not None and args.gptq_windows:
        from servinglab.bench.gptq_quality import rtn_against_gptq

        payload["quality"] = rtn_against_gptq(args, ids)
    (args.out / "quant.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out / 'quant.json'}")
    return rows


def projections_on_cuda(args: argparse.Namespace, rows: list[QuantRow]) -> list[dict]:
    """The projections-only table (:mod:`servinglab.bench.quant_gemm`) of the same config, plus its plot."""
    from servinglab.bench.quant_gemm import plot_projection_rows, projection_shapes, projection_table, run_projection_bench

    cfg = RANDOM_CONFIGS[args.random_weights or "smollm2-135m"]
    shapes = projection_shapes(cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"])
    proj = run_projection_bench(shapes, cfg["num_hidden_layers"], args.group_size, tuple(args.projection_rows))
    print(projection_table(proj))
    plot_projection_rows(proj, args.out / "quant_projections.png")
    print(f"wrote {args.out / 'quant_projections.png'}")
    for r in rows[1:]:
        base = rows[0]
        print(f"{r.name}: batch-1 TPOT {1e3 / r.decode_tok_s_b1:.2f} ms vs {1e3 / base.decode_tok_s_b1:.2f} ms "
              f"({r.decode_tok_s_b1 / base.decode_tok_s_b1:.2f}x); peak without the KV cache "
              f"{r.peak_without_kv_bytes / base.weight_bytes:.2f}x of the bf16 weights "
              f"({r.peak_memory_bytes / 1e6:.0f} MB with the {r.kv_cache_bytes / 1e6:.0f} MB KV cache)")
    return [asdict(r) for r in proj]


def add_bench_quant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2)")
    p.add_argument("--random-weights", choices=sorted(RANDOM_CONFIGS), default=None, help="random weights of a real config (speed only)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bfloat16 where native (CUDA, AVX512-BF16/AMX), else float32")
    p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="INT4 group size")
    p.add_argument("--steps", type=int, default=16, help="decode steps timed per batch size")
    p.add_argument("--ppl-window", type=int, default=256, help="tokens per perplexity window")
    p.add_argument("--ppl-windows", type=int, default=16, help="perplexity windows (first of the text)")
    p.add_argument("--greedy-tokens", type=int, default=32, help="greedy tokens per prompt compared with the first row")
    p.add_argument("--kv-cache-gib", type=float, default=0.5)
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--projection-rows", type=int, nargs="*", default=[1, 8, 32, 128, 512, 8192],
                   help="CUDA: rows M of the projections-only table (bf16, fused int8/int4, torchao, fp8); none to skip")
    p.add_argument("--gptq-windows", type=int, default=4, help="real model: windows to calibrate GPTQ on and to score RTN vs GPTQ on (0: skip)")
    p.add_argument("--projections-only", action="store_true", help="CUDA: only the projections table (no engine rows)")
    p.add_argument("--out", type=Path, default=Path("bench_results"))


def main_bench_quant(args: argparse.Namespace) -> int:
    run_bench_quant(args)
    return 0
