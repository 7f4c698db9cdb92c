"""``servinglab bench attention``: paged decode attention kernels, achieved HBM bandwidth.

A decode step reads every cached key and value of every sequence once, and does two
small products per position: it is bound by memory bandwidth. So the figure of merit
is bytes moved over time, against the H200's 4.8 TB/s (vendor datasheet; a
device-to-device copy reaches about 4.3 TB/s counting read and write, measured on one
such machine). Bytes counted: K and V of every position in use, plus queries and
outputs; block tables are noise.

Kernels compared (each the median of many replays of a CUDA graph of the launch,
``triton.testing.do_bench_cudagraph``, so host launch overhead stays out of the numbers):

- ``lab``: the engine's kernel (:mod:`servinglab.model.triton.decode_attention`), split-KV
  by its own rule; ``lab 1-pass``: the same kernel forced to one split;
- ``part3b``: the course's teaching kernel (``paged_attention_triton``, reference parts);
- ``pytorch``: Part 3's ``batched_decode_attention`` (gather + SDPA, reference parts).

Reference machine (one NVIDIA H200, triton 3.6, bf16, block 16, one run on 2026-12-03),
``servinglab bench attention --layout L``; microseconds (TB/s):

| layout | batch x context | lab (splits) | lab 1-pass | part3b | pytorch |
| --- | --- | --- | --- | --- | --- |
| 135M, 9/3 heads | 1 x 8192 | 8.1 (0.77), 32 | 145 (0.04) | 352 (0.02) | 139 (0.05) |
| 135M | 8 x 8192 | 17.2 (2.92), 32 | 198 (0.25) | 667 (0.08) | 166 (0.30) |
| 135M | 32 x 2048 | 16.6 (3.04), 11 | 51.8 (0.97) | 174 (0.29) | 78.7 (0.64) |
| 135M | 128 x 8192 | 203 (3.96), 2 | 261 (3.09) | 732 (1.10) | 829 (0.97) |
| 1.7B, 32/32 heads | 1 x 8192 | 22.3 (3.01), 32 | 201 (0.33) | 779 (0.09) | 72.9 (0.92) |
| 1.7B | 8 x 8192 | 131 (4.09), 4 | 243 (2.21) | 769 (0.70) | 416 (1.29) |
| 1.7B | 32 x 2048 | 132 (4.07), 1 | 135 (3.98) | 221 (2.43) | 421 (1.28) |
| 1.7B | 128 x 8192 | 2078 (4.13), 1 | 2123 (4.05) | 2000 (4.30) | 6490 (1.32) |

Without grouping (1.7B) 15 of the lab kernel's 16 tile rows are padding, and at large
batches Part 3b's one-program-per-head kernel edges ahead (4.30 against 4.13 TB/s).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

H200_BANDWIDTH = 4.8e12  # bytes/s, vendor datasheet
LAYOUTS = {"smollm2-135m": (9, 3, 64), "smollm2-1.7b": (32, 32, 64)}  # heads, kv heads, head_dim


def _case(batch: int, ctx: int, heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq + 1
    gen = torch.Generator(device="cuda").manual_seed(batch * 7919 + ctx)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    v = torch.randn(shape, generator=gen, device="cuda", dtype=dtype)
    tables = (torch.randperm(num_blocks - 1, generator=gen, device="cuda")[: batch * blocks_per_seq] + 1)
    tables = tables.view(batch, blocks_per_seq).to(torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=gen, device="cuda", dtype=dtype)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    nbytes = 2 * batch * ctx * kv_heads * head_dim * k.element_size() + 2 * q.numel() * q.element_size()
    return q, k, v, tables, lens, nbytes


def run_attention_bench(
    layout: str = "smollm2-135m", batches: tuple[int, ...] = (1, 8, 32, 128), contexts: tuple[int, ...] = (512, 2048, 8192),
    block_size: int = 16, dtype: str = "bfloat16", out_dir: Path | None = None, kernels: tuple[str, ...] = ("lab", "lab 1-pass", "part3b", "pytorch"),
) -> list[dict]:
    """Time each kernel at each (batch, context); print a markdown table; save JSON and a plot."""
    if not torch.cuda.is_available():
        raise SystemExit("servinglab bench attention needs a CUDA device")
    from triton.testing import do_bench, do_bench_cudagraph

    def timed(fn: Callable[[], object], label: str) -> float:
        # do_bench_cudagraph runs fn on a side stream: without this wait a kernel there can
        # read inputs the default stream has not finished writing (a block table of garbage
        # ids sent the lab kernel out of the cache: an illegal address, seen at 128 x 8192).
        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as exc:  # a path that cannot be captured: plain launches, host overhead included
            print(f"{label}: not capturable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); plain launches",
                  file=sys.stderr, flush=True)
            return do_bench(fn, warmup=10, rep=50, return_mode="median")

    from servinglab import impl
    from servinglab.model.triton.decode_attention import choose_num_splits, paged_decode_attention

    heads, kv_heads, head_dim = LAYOUTS[layout]
    part3 = impl.load_part("paged_attention", "solutions")
    part3b = impl.load_part("paged_attention_triton", "solutions")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    scale = head_dim**-0.5
    rows = []
    for batch, ctx in tqdm([(b, c) for b in batches for c in contexts], desc=f"decode attention, {layout}"):
        q, k, v, t, lens, nbytes = _case(batch, ctx, heads, kv_heads, head_dim, block_size, getattr(torch, dtype))
        fns = {
            "lab": lambda: paged_decode_attention(q, k, v, t, lens, scale, max_context_len=ctx),
            "lab 1-pass": lambda: paged_decode_attention(q, k, v, t, lens, scale, num_splits=1),
            "part3b": lambda: part3b.paged_decode_attention(q, k, v, t, lens, scale),
            "pytorch": lambda: part3.batched_decode_attention(q, k, v, t, lens, ctx, scale),
        }
        row = {"batch": batch, "context": ctx, "bytes": nbytes, "splits": choose_num_splits(batch, kv_heads, ctx, sms)}
        for name in kernels:
            ms = timed(fns[name], f"{batch} x {ctx} {name}")
            row[name] = {"ms": ms, "tb_s": nbytes / ms / 1e9}
        rows.append(row)
        del q, k, v, t, lens
        torch.cuda.empty_cache()
    header = "| batch | context | MB read | lab splits | " + " | ".join(f"{n} us (TB/s, % of 4.8)" for n in kernels) + " |"
    lines = [f"decode attention, {layout} heads {heads}/{kv_heads}x{head_dim}, {dtype}, block {block_size}, {torch.cuda.get_device_name()}",
             header, "|" + " --- |" * (4 + len(kernels))]
    for r in rows:
        cells = [f"{1000 * r[n]['ms']:.1f} ({r[n]['tb_s']:.2f}, {100 * r[n]['tb_s'] / 4.8:.0f}%)" for n in kernels]
        lines.append(f"| {r['batch']} | {r['context']} | {r['bytes'] / 1e6:.1f} | {r['splits']} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"attention_{layout}.json").write_text(json.dumps(rows, indent=1))
        plot_bandwidth(rows, kernels, out_dir / f"attention_{layout}.png", layout)
    return rows


def plot_bandwidth(rows: list[dict], kernels: tuple[str, ...], path: Path, title: str) -> None:
    """Achieved TB/s per kernel against context length, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.2 * len(batches), 3), sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == batch]
        for name in kernels:
            ax.plot([r["context"] for r in sel], [r[name]["tb_s"] for r in sel], marker="o", label=name)
        ax.axhline(H200_BANDWIDTH / 1e12, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context length")
    axes[0][0].set_ylabel("achieved TB/s (H200 peak 4.8, dashed)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"paged decode attention, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
