"""The planted bugs of ``scripts/mutation_check.py``: one plausible student mistake per entry.

Each :class:`Mutant` is a text substitution in one reference file of ``solutions/``. A
bug belongs here when a student could write it while believing the code is right; the
check then shows that at least two independent graded tests catch it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    tests: tuple[str, ...] = ()  # graded files (globs) to run instead of the part's own, when another part's tests use the module


M = Mutant
SWAP_TESTS = ("test_part4_*.py", "test_part2_swap.py")  # the scheduler's swap choices are graded with the swap tests
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
    M(2, "prompt's last token cached (a full-prompt hit)", "block_prefix_cache",
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
    M(4, "a preempted sequence goes to the back of the queue", "preemption",
      (("self.waiting.appendleft(seq)", "self.waiting.append(seq)"),)),
    M(4, "chunked prefill ignores the token budget (running sequences)", "scheduler",
      (("num_new = min(num_new, budget)", "num_new = num_new"),)),
    M(4, "chunked prefill ignores the token budget (admission)", "admission",
      (("num_new = min(num_new, budget)", "num_new = num_new"),)),
    M(4, "max_num_seqs off by one", "admission",
      (("len(self.running) < self.max_num_seqs", "len(self.running) <= self.max_num_seqs"),)),
    M(4, "prefix-cache hits not counted as computed", "admission",
      (("seq.num_computed_tokens = seq.num_cached_tokens = num_cached",
        "seq.num_cached_tokens = num_cached"),)),
    # ---- Part 5: speculative decoding
    M(5, "acceptance test inverted (min(1, q/p))", "speculative",
      (("accepted = u * q_x < p_x", "accepted = u * p_x < q_x"),)),
    M(5, "a rejected draft resamples from p, not the residual", "speculative",
      (("residual = (p_at - q_full[rows, num_accepted]).clamp_min(0.0)", "residual = p_at.clone()"),)),
    M(5, "counts every accepted draft, not the leading run", "speculative",
      (("accepted.long().cumprod(dim=1).sum(dim=1)", "accepted.long().sum(dim=1)"),)),
    M(5, "n-gram proposer takes the oldest match", "ngram_proposer",
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
    # ---- Part 2 (swap): the block manager's side of swap preemption
    M(2, "swap_out keeps the device blocks referenced", "block_swap",
      (("            self.pool.free_block(block)  # a shared block", "            pass  # a shared block"),)),
    M(2, "free_swapped leaks the host blocks", "block_swap",
      (("        self.host_free.extend(self.host_tables.pop(seq_id))\n        del self._next_write", "        self.host_tables.pop(seq_id)\n        del self._next_write"),)),
    M(2, "can_swap_out counts one host block too many as free", "block_swap",
      (("return len(self.block_tables[seq_id]) <= self.num_free_host_blocks", "return len(self.block_tables[seq_id]) <= self.num_free_host_blocks + 1"),)),
    M(2, "swap_in copies every block (ignores blocks still cached on the device)", "block_swap",
      (("return [self.pool.cached_block.get(keys[i]) if i < len(keys) else None for i in", "return [None for i in"),)),
    # ---- Part 4 (preemption modes)
    M(4, "a swapped sequence loses its computed tokens", "preemption",
      (("                self.swapped.appendleft(seq)  # the front", "                seq.num_computed_tokens = 0\n                self.swapped.appendleft(seq)  # the front"),), tests=SWAP_TESTS),
    M(4, "a swapped sequence goes to the back of the swapped queue", "preemption",
      (("self.swapped.appendleft(seq)", "self.swapped.append(seq)"),), tests=SWAP_TESTS),
    M(4, "host-full fallback neither counted nor told apart", "preemption",
      (("self.preemption_counts[\"recompute_swap_space_full\"] += 1", "self.preemption_counts[\"recompute\"] += 1"),), tests=SWAP_TESTS),
    # ---- Part 8b: the fused dequantizing GEMM
    M(8, "8b: the two nibbles of a byte swapped in the kernel", "quant_gemm_triton",
      (("low = ((byte & 15) - 8).to(dtype)", "low = ((byte >> 4) - 8).to(dtype)"),
       ("high = ((byte >> 4) - 8).to(dtype)  # column", "high = ((byte & 15) - 8).to(dtype)  # column"))),
    M(8, "8b: INT4 scale per row, not per group", "quant_gemm_triton",
      (("scales_ptr + offs_n * stride_sn + k0 // GROUP", "scales_ptr + offs_n * stride_sn"),)),
    M(8, "8b: INT8 row scale never applied", "quant_gemm_triton",
      (("acc = acc * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0)[None, :]", "acc = acc"),)),
    M(8, "8b: split-K reduction skips the first slice", "quant_gemm_triton",
      (("for s in range(0, SPLIT_K):", "for s in range(1, SPLIT_K):"),)),
    # ---- Part 8c: GPTQ
    M(8, "8c: quantization error not fed back to later columns", "gptq",
      (("wb[:, i:] -= err[:, None] * u[col, col:b1][None, :]", "pass"),
       ("w_all[:, b1:] -= errs @ u[b0:b1, b1:]", "pass"))),
    M(8, "8c: error not divided by the Cholesky diagonal", "gptq",
      (("err = (wb[:, i] - q * s) / u[col, col]", "err = wb[:, i] - q * s"),)),
    M(8, "8c: Hessian without its factor 2 / n", "gptq",
      (("return 2.0 * (x.T @ x) / x.shape[0]", "return x.T @ x"),)),
    # ---- Part 9b: pipeline parallelism
    M(9, "9b: a stage forgets to add the incoming residual", "pipeline_parallel",
      (("x = hidden if residual is None else hidden + residual", "x = hidden"),)),
    M(9, "9b: layer ranges overlap by one (end inclusive)", "pipeline_parallel",
      (("if start <= i < end:", "if start <= i <= end:"),)),
    M(9, "9b: extra layers go to the first stages", "pipeline_parallel",
      (("for i in range(2, num_layers % pp_size + 2):\n        sizes[-i] += 1", "for i in range(num_layers % pp_size):\n        sizes[i] += 1"),)),
    M(9, "9b: tied LM head missing on the last stage", "pipeline_parallel",
      (("if last and tie_word_embeddings and not first:", "if False:"),)),
    M(9, "9b: virtual-engine ties go to the highest index", "pipeline_parallel",
      (("key=lambda i: (num_unfinished[i], i))", "key=lambda i: (num_unfinished[i], -i))"),)),
)
