"""``servinglab build-trt``: a TensorRT engine from the exported ONNX graphs, and the TensorRT-LLM route.

**Verified where.** The ONNX export and its onnxruntime check run on any CPU
(``servinglab export-onnx``, tested in CI). Everything TensorRT-specific below needs an
NVIDIA GPU with TensorRT installed, and the course machines have none: TensorRT's PyPI
packages (``tensorrt-cu12`` / ``tensorrt-cu13``) are small stubs that fetch the real
library (1-2 GB) from NVIDIA's own package index at install time. So the build code is
written against the TensorRT Python API documentation and has **not been run**; its shape
logic (:func:`optimization_profiles`, :func:`precision_plan`, :func:`trtllm_build_args`)
is plain Python with unit tests. Without TensorRT the command stops with
:class:`TensorRTUnavailable`.

**Building from ONNX** (TensorRT 10/11 Python API): a ``Builder`` makes a network, an
``OnnxParser`` fills it from ``prefill.onnx`` / ``decode.onnx``, and a ``BuilderConfig``
carries one *optimization profile* per dynamic input: the ``min`` / ``opt`` / ``max``
shapes the engine must accept and the one it tunes kernels for. From the seed guide's
settings (``max_batch_size``, ``opt_batch_size``, ``max_input_len``, ``max_output_len``):
prefill ``input_ids`` ranges over ``[1, 1] .. [max_batch, max_input_len]``; decode takes one
new token a row and a past of ``1 .. max_seq_len - 1`` positions, where
``max_seq_len = max_input_len + max_output_len`` (TensorRT-LLM's name since 0.11). A
*timing cache* stores the kernel timings of a build so the next build skips them.

**Precision.** TensorRT 10 builds "weakly typed" networks: the ONNX graph is float32 and
``BuilderFlag.FP16`` / ``BF16`` / ``INT8`` *allow* TensorRT to pick lower-precision kernels.
TensorRT 11 removed those flags: networks are *strongly typed*
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``), every tensor keeps the type the ONNX
graph gives it, so a float16 engine needs a float16 export (cast the model before
``export-onnx``), and INT8/FP8 come from explicit Quantize/Dequantize nodes.

**TensorRT-LLM.** Its own path does not go through ONNX. Today: the LLM API,
``tensorrt_llm.LLM(model=<HF folder>)`` on the PyTorch backend (the main branch removed
``trtllm-build`` and the TensorRT backend after release 1.2). Up to 1.2, a checkpoint
conversion (``examples/.../convert_checkpoint.py --model_dir --output_dir --dtype``) and
``trtllm-build --checkpoint_dir``; :data:`SEED_FLAG_MAP` maps the seed guide's old
``build.py`` flags onto those.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16")
INSTALL_HINT = (
    "TensorRT is not installed here. Its PyPI wheels (tensorrt-cu12 / tensorrt-cu13) download the "
    "library from NVIDIA's package index at install time, which needs that index to be reachable and "
    "an NVIDIA GPU to build for. On such a machine: `pip install tensorrt-cu12` (or -cu13), then rerun. "
    "The ONNX export and its onnxruntime check (`servinglab export-onnx`) work without it."
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a GPU for it) is missing; the message says why and what works instead."""


@dataclass(frozen=True)
class TrtShapes:
    """The seed guide's engine limits, validated. ``max_seq_len = max_input_len + max_output_len``."""

    max_batch_size: int = 8
    opt_batch_size: int = 4
    max_input_len: int = 2048
    max_output_len: int = 512
    opt_input_len: int | None = None  # default: half of max_input_len

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "opt_batch_size", "max_input_len", "max_output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.opt_batch_size > self.max_batch_size:
            raise ValueError(f"opt_batch_size ({self.opt_batch_size}) must be <= max_batch_size ({self.max_batch_size})")
        if self.opt_input_len is not None and not 1 <= self.opt_input_len <= self.max_input_len:
            raise ValueError(f"opt_input_len must be in [1, max_input_len={self.max_input_len}], got {self.opt_input_len!r}")

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    def check_model(self, max_position_embeddings: int) -> None:
        """Raise ``ValueError`` when the engine would accept sequences the model cannot place (RoPE table)."""
        if self.max_seq_len > max_position_embeddings:
            raise ValueError(
                f"max_input_len + max_output_len = {self.max_seq_len} must be <= the model's "
                f"max_position_embeddings ({max_position_embeddings})"
            )


Shape = tuple[int, ...]


def optimization_profiles(shapes: TrtShapes, num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """``{"prefill" | "decode": {input name: (min, opt, max)}}`` for the graphs ``export-onnx`` writes.

    Prefill: ``input_ids [B, T]`` with ``B`` in ``1..max_batch_size`` and ``T`` in
    ``1..max_input_len``. Decode: ``input_ids [B, 1]`` and every ``past.{i}.key/value
    [B, kv_heads, P, head_dim]`` with ``P`` in ``1..max_seq_len - 1`` (the step that writes
    position ``max_seq_len - 1`` reads the ``max_seq_len - 1`` before it). ``opt`` uses
    ``opt_batch_size`` and half the range of lengths.
    """
    opt_b = shapes.opt_batch_size
    opt_t = shapes.opt_input_len or max(1, shapes.max_input_len // 2)
    max_past = shapes.max_seq_len - 1
    opt_past = max(1, max_past // 2)
    prefill = {"input_ids": ((1, 1), (opt_b, opt_t), (shapes.max_batch_size, shapes.max_input_len))}
    decode: dict[str, tuple[Shape, Shape, Shape]] = {"input_ids": ((1, 1), (opt_b, 1), (shapes.max_batch_size, 1))}
    for i in range(num_layers):
        for kind in ("key", "value"):
            decode[f"past.{i}.{kind}"] = (
                (1, num_kv_heads, 1, head_dim),
                (opt_b, num_kv_heads, opt_past, head_dim),
                (shapes.max_batch_size, num_kv_heads, max_past, head_dim),
            )
    return {"prefill": prefill, "decode": decode}


def precision_plan(trt_major: int, precision: str) -> dict[str, object]:
    """How to get ``precision`` from TensorRT ``trt_major``: builder flags (10) or a strongly typed network (11+).

    Returns ``{"strongly_typed": bool, "builder_flags": [names of trt.BuilderFlag], "export_dtype": str}``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if isinstance(trt_major, bool) or not isinstance(trt_major, int) or trt_major < 8:
        raise ValueError(f"trt_major must be a TensorRT major version >= 8, got {trt_major!r}")
    export_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    if trt_major >= 11:  # no precision flags: tensor types come from the graph
        return {"strongly_typed": True, "builder_flags": [], "export_dtype": export_dtype}
    flags = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"]}[precision]
    return {"strongly_typed": False, "builder_flags": flags, "export_dtype": "float32"}


# The seed guide's `build.py` flags -> tensorrt-llm <= 1.2 (`convert_checkpoint.py` then `trtllm-build`).
# None: the flag has no build-time equivalent any more (see the note).
SEED_FLAG_MAP: dict[str, tuple[str | None, str]] = {
    "--model_dir": ("convert_checkpoint.py --model_dir", "the HF folder goes to the checkpoint conversion; trtllm-build takes --checkpoint_dir"),
    "--dtype": ("convert_checkpoint.py --dtype", "weights' dtype is fixed at conversion"),
    "--use_gpt_attention_plugin": ("--gpt_attention_plugin", "takes a dtype or auto (the default: on)"),
    "--use_gemm_plugin": ("--gemm_plugin", "takes a dtype or auto"),
    "--max_batch_size": ("--max_batch_size", "same name"),
    "--max_input_len": ("--max_input_len", "same name"),
    "--max_output_len": ("--max_seq_len", "now the total: max_input_len + max_output_len"),
    "enable_context_fmha": ("--context_fmha", "enable|disable (default enable)"),
    "use_paged_kv_cache": ("--kv_cache_type", "paged (older: --paged_kv_cache enable)"),
    "opt_batch_size": (None, "gone: profiles come from --max_batch_size/--max_num_tokens/--opt_num_tokens"),
    "use_cuda_graphs": (None, "a runtime option (the LLM API's cuda_graph_config / the C++ runtime), not a build flag"),
    "kv_cache_free_gpu_mem_fraction": (None, "runtime: KvCacheConfig(free_gpu_memory_fraction=...)"),
    "precision=int8": ("convert_checkpoint.py --use_weight_only --weight_only_precision int8", "weight-only INT8 at conversion"),
}


def trtllm_build_args(shapes: TrtShapes, dtype: str = "float16", checkpoint_dir: str = "ckpt", output_dir: str = "engine") -> list[list[str]]:
    """The two legacy commands (tensorrt-llm <= 1.2) that replace the seed's single ``build.py`` call."""
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be one of ('float16', 'bfloat16', 'float32'), got {dtype!r}")
    convert = ["python", "convert_checkpoint.py", "--model_dir", "MODEL_DIR", "--output_dir", checkpoint_dir, "--dtype", dtype]
    build = [
        "trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
        "--gpt_attention_plugin", "auto", "--gemm_plugin", "auto", "--context_fmha", "enable", "--kv_cache_type", "paged",
        "--max_batch_size", str(shapes.max_batch_size), "--max_input_len", str(shapes.max_input_len),
        "--max_seq_len", str(shapes.max_seq_len),
    ]
    return [convert, build]


def import_tensorrt():
    """``import tensorrt`` or raise :class:`TensorRTUnavailable` with the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        raise TensorRTUnavailable(INSTALL_HINT) from exc
    return tensorrt


def build_engine(onnx_path: Path, engine_path: Path, profile: dict[str, tuple[Shape, Shape, Shape]], precision: str,
                 timing_cache: Path | None = None, workspace_gib: float = 4.0) -> Path:
    """Parse ``onnx_path`` and build a serialized engine to ``engine_path`` (never run on the course machines)."""
    trt = import_tensorrt()
    major = int(trt.__version__.split(".")[0])
    plan = precision_plan(major, precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan["strongly_typed"] else 0
    network = builder.create_network(flags)  # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    for flag in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def add_build_trt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", type=Path, default=Path("onnx_out"), help="folder with prefill.onnx / decode.onnx (from export-onnx)")
    p.add_argument("--out", type=Path, default=Path("trt_out"), help="folder for the .plan files and the timing cache")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--opt-batch-size", type=int, default=4)
    p.add_argument("--max-input-len", type=int, default=2048)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--print-trtllm", action="store_true", help="only print the legacy TensorRT-LLM commands for these limits")


def run_build_trt(args: argparse.Namespace) -> int:
    """CLI entry: exit 2 with the reason when TensorRT is missing; otherwise build both graphs."""
    import json

    shapes = TrtShapes(args.max_batch_size, args.opt_batch_size, args.max_input_len, args.max_output_len)
    if args.print_trtllm:
        for cmd in trtllm_build_args(shapes):
            print(" ".join(cmd))
        return 0
    try:
        import_tensorrt()
    except TensorRTUnavailable as exc:
        print(f"error: {exc}")
        return 2
    config = json.loads((args.onnx_dir / "config.json").read_text()) if (args.onnx_dir / "config.json").exists() else None
    if config is None:
        raise SystemExit(f"error: {args.onnx_dir / 'config.json'} is missing: run `servinglab export-onnx --out {args.onnx_dir}` first")
    shapes.check_model(config["max_position_embeddings"])
    profiles = optimization_profiles(shapes, config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])
    for graph in ("prefill", "decode"):
        path = build_engine(args.onnx_dir / f"{graph}.onnx", args.out / f"{graph}.plan", profiles[graph], args.precision, args.out / "timing.cache")
        print(f"wrote {path}")
    return 0
