"""The decoder's projections alone, per step, quantized or not: roofline prediction against measurement.

One "step" is every projection of every decoder layer (``qkv``, ``o``, ``gate_up``,
``down``) at ``M`` rows, recorded as one CUDA graph and timed as graph replays (the
median of CUDA-event timings), so launch overhead is what the engine's decode graphs
pay too. Variants, all built from the same random bf16 weights in one process:

* ``bf16``: ``F.linear`` (cuBLAS);
* ``int8`` / ``int4``: Part 8a's codes through Part 8b's fused kernel
  (:mod:`servinglab.model.quant_gemm`, tuned per shape before capture);
* ``torchao int8``: ``quantize_(.., Int8WeightOnlyConfig())`` run eagerly inside the
  graph (torchao's int4 needs a kernel package that cannot be installed here);
* ``fp8``: e4m3 weights with per-channel scales and a dynamic per-token e4m3 activation
  scale, then ``torch._scaled_mm`` (vLLM's ``quantization="fp8"`` path); three rows: the
  activation quantized by separate ops (unfused), by one Triton pass (fused), and once
  outside the step (the GEMM alone: what a quantization fused into the previous RMSNorm
  would approach); only on GPUs with FP8 (compute capability 8.9 or higher);
* ``fp8 engine``: what ``LLM(..., quantization="fp8")`` runs (:mod:`servinglab.model.fp8_linear`):
  the weight-only GEMV on the e4m3 codes at ``M = 1``, the fused W8A8 route above.

The roofline's prediction for a variant is ``max(bytes / bandwidth, flops / peak)``
(weights + activations read once; H200: 4.8 TB/s, 989 TFLOP/s dense bf16, 1979 FP8), and
its predicted speed-up is bf16's predicted time over its own. Decode (small M) is
memory-bound: weight-only formats win by their byte ratio. At large M the product is
compute-bound and weight-only formats can only lose (they still multiply in bf16, and
dequantize on top); FP8 doubles the peak there.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e (NVIDIA's H200 datasheet)
H200_BF16_PEAK = 989e12  # dense FLOP/s
H200_FP8_PEAK = 1979e12
DEFAULT_ROWS = (1, 8, 32, 128, 512, 8192)
references: dict[str, list] = {}  # variant -> first layer's dequantize + F.linear (correctness of the tuned kernels)


@dataclass
class ProjectionRow:
    """One variant at one row count: measured and predicted per-step time."""

    variant: str
    rows: int
    ms: float | None
    predicted_ms: float
    weight_bytes: int
    note: str = ""


def projection_shapes(hidden: int, heads: int, kv_heads: int, intermediate: int) -> list[tuple[int, int]]:
    """``(N, K)`` of one decoder layer's fused projections: qkv, o, gate_up, down."""
    head_dim = hidden // heads
    return [((heads + 2 * kv_heads) * head_dim, hidden), (hidden, heads * head_dim), (2 * intermediate, hidden), (hidden, intermediate)]


def _time_graph(step: Callable[[], object], reps: int = 20) -> float:
    """Median ms of a CUDA-graph replay of ``step`` (run once eagerly first: compiles, tunes)."""
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


FP8_MODES = {
    "unfused": "activation scale by separate PyTorch ops (five passes, three in float32)",
    "fused": "activation quantized in one Triton pass (servinglab.model.triton.fp8_quant)",
    "gemm only": "activation quantized once, outside the step: the FP8 GEMM's own time, a lower bound",
}


def _fp8_layer(weight: torch.Tensor, mode: str = "unfused") -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x @ w.T`` through e4m3 weights (per output channel) and a dynamic per-token activation scale.

    ``mode`` (:data:`FP8_MODES`) says how the activation gets to e4m3 inside the step.
    """
    from servinglab.model.fp8_linear import Fp8Linear
    from servinglab.model.triton.fp8_quant import E4M3_MAX as fmax, quantize_rows_fp8

    layer = Fp8Linear.from_linear(_as_linear(weight))  # the engine's e4m3 codes and per-channel scales
    w8, scale_b = layer.qweight, layer.scales[None, :]  # scale_b: [1, N]
    fixed: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}  # "gemm only": one quantized input per shape

    def forward(x: torch.Tensor) -> torch.Tensor:
        if mode == "fused":
            x8, x_scale = quantize_rows_fp8(x)
        elif mode == "gemm only":  # the first (eager) call quantizes; graph capture and replays see only the GEMM
            if tuple(x.shape) not in fixed:
                fixed[tuple(x.shape)] = quantize_rows_fp8(x)
            x8, x_scale = fixed[tuple(x.shape)]
        else:
            x_scale = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / fmax  # [M, 1]; zero rows guarded
            x8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=x.dtype)

    return forward


def _as_linear(weight: torch.Tensor) -> torch.nn.Linear:
    """A bias-free ``nn.Linear`` holding ``weight`` (no copy)."""
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    return lin


def build_variants(shapes: list[tuple[int, int]], layers: int, group_size: int) -> dict[str, tuple[list, int, str]]:
    """``name -> (per-layer callables [qkv, o, gate_up, down], weight bytes, note)`` on CUDA."""
    from servinglab import impl
    from servinglab.model.quant_gemm import quant_linear

    quant_cls = impl.load_part("quantization").QuantLinear
    gen = torch.Generator(device="cuda").manual_seed(0)
    dense = [[torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5 for n, k in shapes]
             for _ in range(layers)]
    variants: dict[str, tuple[list, int, str]] = {}
    references.clear()
    nbytes = sum(w.numel() * 2 for layer in dense for w in layer)
    variants["bf16"] = ([[(lambda x, w=w: F.linear(x, w)) for w in layer] for layer in dense], nbytes, "cuBLAS")
    for method in ("int8", "int4"):
        mods = []
        for layer in dense:
            row = []
            for w in layer:
                row.append(quant_cls.from_linear(_as_linear(w), method, group_size))
            mods.append(row)
        size = sum(m.weight_nbytes() for row in mods for m in row)
        name = method if method == "int8" else f"int4 g{group_size}"
        variants[name] = ([[(lambda x, m=m: quant_linear(m, x)) for m in row] for row in mods], size, "Part 8b fused kernel")
        references[name] = [(lambda x, m=m: F.linear(x, m.dequantized_weight(x.dtype))) for m in mods[0]]
    try:
        from servinglab.bench.torchao_ref import torchao_int8_linear

        mods = [[torchao_int8_linear(w) for w in layer] for layer in dense]
        variants["torchao int8"] = ([[m for m in row] for row in mods], nbytes // 2, "Int8WeightOnlyConfig, eager")
    except Exception as exc:  # noqa: BLE001 - reported in the table, never fatal
        variants["torchao int8"] = ([], 0, f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    if torch.cuda.get_device_capability() >= (8, 9):  # what the engine runs for quantization="fp8"
        from servinglab.model.fp8_linear import Fp8Linear, fp8_linear

        mods = [[Fp8Linear.from_linear(_as_linear(w)) for w in layer] for layer in dense]
        variants["fp8 engine"] = ([[(lambda x, m=m: fp8_linear(m, x)) for m in row] for row in mods],
                                  sum(m.weight_nbytes() for row in mods for m in row),
                                  "quantization='fp8' (servinglab.model.fp8_linear): weight-only GEMV at M = 1, fused W8A8 above")
    for mode, note in FP8_MODES.items():
        name = "fp8 (scaled_mm)" if mode == "unfused" else f"fp8 {mode}"
        if torch.cuda.get_device_capability() >= (8, 9):
            variants[name] = ([[_fp8_layer(w, mode) for w in layer] for layer in dense], nbytes // 2,
                              f"e4m3, per-channel weight / per-token activation scales; {note}")
        else:
            variants[name] = ([], 0, "skipped: needs FP8 tensor cores (compute capability >= 8.9)")
    return variants


def predicted_ms(rows: int, shapes: list[tuple[int, int]], layers: int, weight_bytes: int, fp8: bool) -> float:
    """The roofline's time of one step: weights and activations read once, or the FLOPs at peak."""
    act = sum(2 * rows * (n + k) for n, k in shapes) * layers
    flops = sum(2 * rows * n * k for n, k in shapes) * layers
    return 1e3 * max((weight_bytes + act) / H200_BANDWIDTH, flops / (H200_FP8_PEAK if fp8 else H200_BF16_PEAK))


def run_projection_bench(shapes: list[tuple[int, int]], layers: int, group_size: int,
                         rows_list: tuple[int, ...] = DEFAULT_ROWS) -> list[ProjectionRow]:
    """Every variant at every row count, in this process (CUDA only)."""
    from tqdm.auto import tqdm

    variants = build_variants(shapes, layers, group_size)
    out: list[ProjectionRow] = []
    for rows in tqdm(rows_list, desc="projection rows"):
        xs = {k: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for k in {k for _, k in shapes}}
        for name, (fns, nbytes, note) in variants.items():
            pred = predicted_ms(rows, shapes, layers, nbytes or 1, fp8=name.startswith("fp8"))
            if not fns:
                out.append(ProjectionRow(name, rows, None, pred, nbytes, note))
                continue

            def step(fns=fns) -> None:
                for layer in fns:
                    for fn, (_, k) in zip(layer, shapes):
                        fn(xs[k])

            try:
                ms = _time_graph(step)
            except Exception as exc:  # noqa: BLE001 - a variant that cannot be captured is reported
                torch.cuda.synchronize()
                out.append(ProjectionRow(name, rows, None, pred, nbytes, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
                continue
            if name in references:  # the tuned kernel's answer against dequantize + F.linear, first layer
                errs = [float((f(xs[k]).float() - r(xs[k]).float()).abs().max() / r(xs[k]).float().abs().max().clamp(min=1e-6))
                        for f, r, (_, k) in zip(fns[0], references[name], shapes)]
                note = f"{note}; max rel. error vs dequantized {max(errs):.1e}"
            out.append(ProjectionRow(name, rows, ms, pred, nbytes, note))
    return out


def projection_table(rows: list[ProjectionRow]) -> str:
    """Markdown: per-step ms, measured and predicted speed-up over bf16 at the same row count."""
    base = {r.rows: r for r in rows if r.variant == "bf16"}
    lines = ["| variant | M | weights MB | step ms | speed-up vs bf16 | roofline-predicted | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base[r.rows]
        ms = "-" if r.ms is None else f"{r.ms:.3f}"
        speed = "-" if r.ms is None or b.ms is None else f"{b.ms / r.ms:.2f}x"
        predicted = "-" if r.ms is None else f"{b.predicted_ms / r.predicted_ms:.2f}x"  # an unavailable row has no weights
        lines.append(f"| {r.variant} | {r.rows} | {r.weight_bytes / 1e6:.0f} | {ms} | {speed} | {predicted} | {r.note} |")
    return "\n".join(lines + ["", *crossovers(rows)])


def crossovers(rows: list[ProjectionRow]) -> list[str]:
    """Per variant, the row counts measured where it beats bf16 (its crossover: the smallest of them)."""
    base = {r.rows: r.ms for r in rows if r.variant == "bf16"}
    lines = []
    for name in dict.fromkeys(r.variant for r in rows if r.variant != "bf16"):
        mine = [r for r in rows if r.variant == name and r.ms is not None and base.get(r.rows)]
        if not mine:
            continue
        wins = [r.rows for r in mine if r.ms < base[r.rows]]
        where = f"faster than bf16 at M = {', '.join(map(str, wins))} (crossover M = {wins[0]})" if wins else "never faster than bf16"
        lines.append(f"- {name}: {where}, of M = {', '.join(str(r.rows) for r in mine)}")
    return lines


def plot_projection_rows(rows: list[ProjectionRow], path) -> None:
    """Measured (solid) and predicted (dashed) speed-up over bf16 against M, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {r.rows: r for r in rows if r.variant == "bf16"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate(dict.fromkeys(r.variant for r in rows if r.variant != "bf16")):
        mine = [r for r in rows if r.variant == name and r.ms is not None and base[r.rows].ms]
        if not mine:
            continue
        colour = f"C{i}"
        ax.plot([r.rows for r in mine], [base[r.rows].ms / r.ms for r in mine], "o-", color=colour, label=f"{name} measured")
        ax.plot([r.rows for r in mine], [base[r.rows].predicted_ms / r.predicted_ms for r in mine], "--", color=colour,
                alpha=0.6, label=f"{name} roofline")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows M (decode batch / prefill tokens)")
    ax.set_ylabel("speed-up over bf16 (per step)")
    ax.set_title("Decoder projections, one step as a CUDA graph")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
