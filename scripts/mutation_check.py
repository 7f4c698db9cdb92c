"""Plant plausible student bugs in a copy of ``solutions/`` and count the graded tests each one fails.

Each entry of ``MUTANTS`` is one bug a student could plausibly write, expressed as text
substitutions in one reference file. For every bug the script copies ``solutions/`` into
a temporary folder, applies the substitutions there (never in the repository), and runs
that part's graded tests against the copy with ``--impl solutions`` (the copy comes first
on ``sys.path``, so it is the ``solutions`` package that gets imported). It prints the
table part / bug / tests failing and exits 1 when a bug fails fewer than ``--min-fail``
graded tests (2 by default): a test suite that one plausible bug slips past, or that only
one test guards, is too thin to grade with.

Usage (a few minutes; ``make test`` does not run it)::

    python scripts/mutation_check.py                # every part
    python scripts/mutation_check.py --part 7 8     # some parts
    python scripts/mutation_check.py -k nibble      # the bugs whose name contains "nibble"
    python scripts/mutation_check.py --list         # the bugs, without running anything
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``subs`` are ``(old, new)`` replacements in ``solutions/<module>.py``.

    Each ``old`` must occur in the file exactly ``count`` times (all are replaced), so a
    reference that changes under the script fails loudly instead of testing nothing.
    """

    part: int
    name: str
    module: str
    subs: tuple[tuple[str, str], ...]
    count: int = 1


M = Mutant
MUTANTS: tuple[Mutant, ...] = (
    # ---- Part 1: KV-cache memory math
    M(1, "K and V not both counted (factor 2 missing)", "kv_cache",
      (("return 2 * shape.num_layers * shape.num_kv_heads", "return shape.num_layers * shape.num_kv_heads"),)),
    M(1, "query heads instead of KV heads (GQA ignored)", "kv_cache",
      (("shape.num_layers * shape.num_kv_heads * shape.head_dim", "shape.num_layers * shape.num_attention_heads * shape.head_dim"),)),
    M(1, "weights not split across tensor-parallel ranks", "kv_cache",
      (("- math.ceil(weight_bytes / tp) - activation_bytes", "- weight_bytes - activation_bytes"),)),
    M(1, "blocks per sequence rounded down", "kv_cache",
      (("blocks // math.ceil(seq_len / block_size)", "blocks // max(1, seq_len // block_size)"),)),
    M(1, "tied embeddings counted twice", "model_shape",
      (("(1 if self.tie_word_embeddings else 2)", "2"),)),
    # ---- Part 2: paged allocator, prefix cache, copy-on-write
    M(2, "block hash ignores the parent (no chain)", "block_pool",
      (("repr((parent_hash, tuple(", "repr((None, tuple("),)),
    M(2, "free queue pops the most recently freed block (LIFO)", "block_pool",
      (("popitem(last=False)", "popitem(last=True)"),)),
    M(2, "prompt's last token cached (a full-prompt hit)", "block_manager",
      (("(len(token_ids) - 1) // self.block_size)", "len(token_ids) // self.block_size)"),)),
    M(2, "copy-on-write keeps the reference to the shared block", "block_manager",
      (("self.pool.free_block(src)  # ref > 1", "pass  # ref > 1"),)),
    M(2, "deallocate frees head blocks first (wrong eviction order)", "block_manager",
      (("        for block in reversed(self._table(seq_id)):\n            self.pool.free_block(block)\n        del self.block_tables",
        "        for block in self._table(seq_id):\n            self.pool.free_block(block)\n        del self.block_tables"),)),
    # ---- Part 3: paged attention (PyTorch) and the Triton decode kernel
    M(3, "prefill mask not shifted by the cached prefix", "paged_attention",
      (("rows = torch.arange(ctx_len - q_len, ctx_len, device=query.device)", "rows = torch.arange(0, q_len, device=query.device)"),)),
    M(3, "decode mask lets one padded position through (<=)", "paged_attention",
      (("mask = (positions[None, :] < context_lens", "mask = (positions[None, :] <= context_lens"),)),
    M(3, "GQA: query head h uses KV head h % num_kv_heads", "paged_attention",
      (("q = query.view(num_seqs, num_kv_heads, group, head_dim)", "q = query.view(num_seqs, group, num_kv_heads, head_dim).transpose(1, 2)"),)),
    M(3, "write_to_kv_cache stores the keys in the value cache too", "paged_attention",
      (("index_copy_(0, slot_mapping, value.to(v_cache.dtype))", "index_copy_(0, slot_mapping, key.to(v_cache.dtype))"),)),
    M(3, "Triton kernel: online softmax forgets to rescale the accumulator", "paged_attention_triton",
      (("acc = acc * alpha + tl.sum(p[:, None] * v, 0)", "acc = acc + tl.sum(p[:, None] * v, 0)"),)),
    # ---- Part 4: continuous batching
    M(4, "preempts the oldest running sequence", "scheduler",
      (("victim = self.running.pop()", "victim = self.running.pop(0)"),)),
    M(4, "a preempted sequence goes to the back of the queue", "scheduler",
      (("self.waiting.appendleft(seq)", "self.waiting.append(seq)"),)),
    M(4, "chunked prefill ignores the token budget", "scheduler",
      (("num_new = min(num_new, budget)", "num_new = num_new"),), count=2),
    M(4, "max_num_seqs off by one", "scheduler",
      (("len(self.running) < self.max_num_seqs", "len(self.running) <= self.max_num_seqs"),)),
    M(4, "prefix-cache hits not counted as computed", "scheduler",
      (("seq.num_computed_tokens = seq.num_cached_tokens = num_cached",
        "seq.num_cached_tokens = num_cached"),)),
    # ---- Part 5: speculative decoding
    M(5, "acceptance test inverted (min(1, q/p))", "speculative",
      (("accepted = u * q_x < p_x", "accepted = u * p_x < q_x"),)),
    M(5, "a rejected draft resamples from p, not the residual", "speculative",
      (("residual = (p_at - q_full[rows, num_accepted]).clamp_min(0.0)", "residual = p_at.clone()"),)),
    M(5, "counts every accepted draft, not the leading run", "speculative",
      (("accepted.long().cumprod(dim=1).sum(dim=1)", "accepted.long().sum(dim=1)"),)),
    M(5, "n-gram proposer takes the oldest match", "speculative",
      (("start = int(hits[-1]) + n", "start = int(hits[0]) + n"),)),
    M(5, "expected tokens per step misses the bonus token", "speculative_math",
      (("(1.0 - a ** (k + 1)) / (1.0 - a)", "(1.0 - a ** k) / (1.0 - a)"),)),
    # ---- Part 6: serving statistics and the async engine
    M(6, "percentile takes the nearest rank (no interpolation)", "serving_stats",
      (("return xs[lo] + (h - lo) * (xs[hi] - xs[lo])", "return xs[round(h)]"),)),
    M(6, "TPOT counts the first token (includes TTFT)", "serving_stats",
      (("(times[-1] - times[0]) / (len(times) - 1)", "(times[-1] - start) / len(times)"),)),
    M(6, "throughput over the sum of request latencies", "serving_stats",
      (('"avg_throughput_tps": total_tokens / duration', '"avg_throughput_tps": total_tokens / sum(values["e2e"])'),)),
    M(6, "closing the stream does not cancel the requests", "serving",
      (("                task.cancel()\n", "                pass\n"),)),
    # ---- Part 7: load balancer, prefix tree, monitoring
    M(7, "cache-aware overload escape with OR instead of AND", "load_balancer",
      (("hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo",
        "hi - lo > self.balance_abs_threshold or hi > self.balance_rel_threshold * lo"),)),
    M(7, "cache-aware never escapes an overloaded backend", "load_balancer",
      (("if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:", "if False:"),)),
    M(7, "power of two keeps the more loaded of the two", "load_balancer",
      (("return b if b.load < a.load else a", "return b if b.load > a.load else a"),)),
    M(7, "power of two always keeps the first drawn", "load_balancer",
      (("return b if b.load < a.load else a", "return a"),)),
    M(7, "circuit breaker re-admits after one success", "load_balancer",
      (("if b.consecutive_successes >= self.recovery_successes:", "if b.consecutive_successes >= 1:"),)),
    M(7, "circuit breaker ignores the cooldown", "load_balancer",
      (('if b.state == "open" and self.clock() - b.last_failure < self.cooldown_s:', "if False:"),)),
    M(7, "circuit opens one failure late", "load_balancer",
      (("b.consecutive_failures >= self.failure_threshold", "b.consecutive_failures > self.failure_threshold"),)),
    M(7, "prefix match counts past the first mismatch", "prefix_tree",
      (("    n = 0\n    for x in a:\n        if start + n >= len(b) or b[start + n] != x:\n            break\n        n += 1\n    return n",
        "    return sum(1 for x, y in zip(a, b[start:]) if x == y)"),)),
    M(7, "prefix tree insert counts the whole key into size", "prefix_tree",
      (("self.size += len(key) - i", "self.size += len(key)"),)),
    M(7, "prefix tree evicts the most recently used leaf", "prefix_tree",
      (("heap.append((node.stamp, next(tie), node))", "heap.append((-node.stamp, next(tie), node))"),
       ("heapq.heappush(heap, (parent.stamp, next(tie), parent))", "heapq.heappush(heap, (-parent.stamp, next(tie), parent))"))),
    M(7, "histogram quantile returns the bucket's upper bound", "monitoring",
      (("return lower + (upper - lower) * ((rank - below) / count)", "return upper"),)),
    M(7, "histograms of several label sets not summed", "monitoring",
      (("hist[le] = hist.get(le, 0.0) + s.value", "hist[le] = s.value"),)),
    # ---- Part 8: INT8 / INT4 weight-only quantization
    M(8, "INT4 rounds half up (floor(x + 0.5))", "quantization",
      (("codes = torch.round(w / scales[..., None])", "codes = torch.floor(w / scales[..., None] + 0.5)"),)),
    M(8, "INT4 nibble order swapped in both pack and unpack", "quantization",
      (("(u[..., 0::2] | (u[..., 1::2] << 4))", "(u[..., 1::2] | (u[..., 0::2] << 4))"),
       ("torch.stack((low, high), dim=-1)", "torch.stack((high, low), dim=-1)"))),
    M(8, "INT8 zero-row guard missing (scale 0)", "quantization",
      (("scales = torch.where(absmax > 0, absmax / INT8_QMAX, torch.ones_like(absmax))", "scales = absmax / INT8_QMAX"),)),
    M(8, "INT4 zero-group guard missing (scale 0)", "quantization",
      (("scales = torch.where(absmax > 0, absmax / INT4_QMAX, torch.ones_like(absmax))", "scales = absmax / INT4_QMAX"),)),
    M(8, "INT8 divides by 128", "quantization",
      (("absmax / INT8_QMAX, torch.ones_like", "absmax / 128, torch.ones_like"),)),
    M(8, "QuantLinear drops the bias", "quantization",
      (("return F.linear(x, self.dequantized_weight(x.dtype), bias)", "return F.linear(x, self.dequantized_weight(x.dtype))"),)),
    # ---- Part 9: tensor parallelism
    M(9, "row-parallel layer without its all-reduce", "tp_collectives",
      (("    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)\n", ""),)),
    M(9, "row-parallel bias added on every rank", "tp_collectives",
      (("partial = F.linear(x, weight)", "partial = F.linear(x, weight, bias)"),
       ("return partial if bias is None else partial + bias", "return partial"))),
    M(9, "vocab-parallel embedding does not mask ids outside its range", "tp_collectives",
      (("out = out.masked_fill(outside[:, None], 0.0)", "out = out"),)),
    M(9, "distributed argmax forgets the shard's vocab offset", "tp_collectives",
      (("(idx + vocab_start).float()", "idx.float()"),)),
    M(9, "fused qkv sharded as one block of rows", "tensor_parallel",
      (("return torch.cat([column_shard(q, rank, tp_size), column_shard(k, rank, tp_size), column_shard(v, rank, tp_size)], dim=0)",
        "return column_shard(qkv, rank, tp_size)"),)),
)


def graded_files(part: int) -> list[str]:
    """The graded test files of one part (Part 3 includes 3b)."""
    return sorted(str(p) for p in (ROOT / "tests" / "graded").glob(f"test_part{part}[_b]*.py"))


def plant(mutant: Mutant, dest: Path) -> None:
    """Copy ``solutions/`` to ``dest/solutions`` and apply the mutant's substitutions there."""
    target = dest / "solutions"
    shutil.copytree(ROOT / "solutions", target, ignore=shutil.ignore_patterns("__pycache__"))
    path = target / f"{mutant.module}.py"
    text = path.read_text()
    for old, new in mutant.subs:
        found = text.count(old)
        if found != mutant.count:
            raise SystemExit(f"[{mutant.name}] expected {mutant.count} occurrence(s) of {old!r} in solutions/{mutant.module}.py, found {found}")
        text = text.replace(old, new)
    path.write_text(text)


def failing_tests(part: int, workdir: Path) -> tuple[list[str], int]:
    """Run the part's graded tests against ``workdir/solutions``; return (failed test ids, test cases run)."""
    report = workdir / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT)]), "SERVINGLAB_IMPL": "solutions"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--impl", "solutions",
           f"--junitxml={report}", *graded_files(part)]
    # cwd=workdir: `python -m pytest` puts the working folder first on sys.path.
    subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not report.exists():
        return ["<pytest did not run>"], 0
    failed, total = [], 0
    for case in ET.parse(report).iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(case.get("name", "?"))
    return failed, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", type=int, nargs="*", help="parts to check (default: all)")
    parser.add_argument("-k", "--bug", default="", help="only the bugs whose name contains this text")
    parser.add_argument("--min-fail", type=int, default=2, help="graded tests each bug must fail (default 2)")
    parser.add_argument("--list", action="store_true", help="print the bugs and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="name the failing tests")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if (not args.part or m.part in args.part) and args.bug in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.part}  {m.name}  (solutions/{m.module}.py)")
        return 0
    weak = 0
    print(f"{'part':<5} {'bug':<66} graded tests failing")
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
            plant(m, Path(tmp))
            failed, total = failing_tests(m.part, Path(tmp))
        # A parametrized test counts once: its cases are not independent tests.
        tests = sorted({name.split("[")[0] for name in failed})
        flag = "" if len(tests) >= args.min_fail else "   <-- too few"
        weak += len(tests) < args.min_fail
        print(f"{m.part:<5} {m.name:<66} {len(tests):>2} tests ({len(failed)} of {total} cases){flag}", flush=True)
        if args.verbose:
            for name in failed:
                print(f"{'':<7}{name}")
    print(f"{len(chosen) - weak} of {len(chosen)} bugs fail >= {args.min_fail} graded tests")
    return 1 if weak else 0


if __name__ == "__main__":
    sys.exit(main())
