"""``servinglab bench memory`` and ``bench prefix``: what paging and prefix caching buy.

memory: a ShareGPT-like trace runs through the student's scheduler and block manager
(no model: memory accounting does not depend on the tokens' values) twice in the same
KV memory: paged (16-token blocks) and contiguous pre-allocation, which is the same
code with one block of ``max_model_len`` slots per sequence. Reported: the share of
reserved KV slots that hold real tokens, and the batch size each reaches.

prefix: a shared few-shot prefix workload on the real model, with and without the
prefix cache: TTFT of requests sent one by one, and throughput of all sent at once.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from servinglab.impl import load_part
from servinglab.sequence import Sequence, SequenceStatus


@dataclass
class MemoryRun:
    name: str
    block_size: int
    num_blocks: int
    steps: int
    mean_utilization: float  # real tokens / reserved slots, averaged over steps
    mean_batch: float
    max_batch: int
    utilization_trace: list[float]
    batch_trace: list[int]


def simulate_memory(lengths: list[tuple[int, int]], block_size: int, pool_slots: int, max_num_batched_tokens: int = 4096, max_num_seqs: int = 256) -> MemoryRun:
    """Drive the scheduler + block manager over the trace with fake tokens; every request arrives at once."""
    bm = load_part("block_manager").PagedAttentionConfig(num_blocks=pool_slots // block_size, block_size=block_size)
    sched = load_part("scheduler").Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    targets: dict[int, int] = {}
    for i, (p, o) in enumerate(lengths):
        seq = Sequence([100 + (i * 7 + j) % 1000 for j in range(p)])  # distinct prompts: no sharing
        targets[seq.seq_id] = o
        sched.add_sequence(seq)
    util, batch = [], []
    while sched.has_unfinished():
        out = sched.schedule()
        if out.is_empty:
            raise RuntimeError("scheduler made no progress")
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) >= targets[seq.seq_id]:
                    seq.status = SequenceStatus.FINISHED_LENGTH
                    sched.finish_sequence(seq)
        # Tokens whose K/V sit in the cache vs slots the running sequences hold.
        live = [s for s in sched.running]
        reserved = sum(len(bm.block_tables.get(s.seq_id, ())) for s in live) * block_size
        if reserved:
            util.append(sum(s.num_computed_tokens for s in live) / reserved)
            batch.append(len(live))
    name = "paged" if block_size < pool_slots else "contiguous"
    return MemoryRun(name, block_size, pool_slots // block_size, len(util), statistics.fmean(util), statistics.fmean(batch), max(batch), util, batch)


def run_memory(num_requests: int = 200, max_model_len: int = 2048, pool_slots: int = 32768, block_size: int = 16, seed: int = 0) -> list[MemoryRun]:
    """Paged vs contiguous on the same trace and the same number of KV slots."""
    from servinglab.bench.workloads import sharegpt_like_lengths

    lengths = sharegpt_like_lengths(num_requests, seed=seed, max_len=max_model_len)
    runs = [simulate_memory(lengths, block_size, pool_slots), simulate_memory(lengths, max_model_len, pool_slots)]
    runs[1].name = f"contiguous (max_model_len={max_model_len})"
    runs[0].name = f"paged (block_size={block_size})"
    return runs


def memory_table(runs: list[MemoryRun]) -> str:
    lines = ["| allocation | KV slots | steps | real tokens / reserved slots | mean batch | max batch |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r.name} | {r.block_size * r.num_blocks} | {r.steps} | {r.mean_utilization:.1%} | {r.mean_batch:.1f} | {r.max_batch} |")
    return "\n".join(lines)


@dataclass
class PrefixRun:
    name: str
    mean_ttft_ms: float
    p50_ttft_ms: float
    batch_elapsed_s: float
    num_requests: int
    hit_rate: float


def run_prefix(model_dir: str, num_requests: int = 32, max_tokens: int = 8, dtype: str = "bfloat16") -> list[PrefixRun]:
    """The shared few-shot prefix workload with the prefix cache off, then on."""
    from servinglab.engine.llm import LLM
    from servinglab.engine.sampling import SamplingParams
    from servinglab.bench.workloads import few_shot_prompts

    prompts = few_shot_prompts(num_requests)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    runs = []
    for enabled in (False, True):
        llm = LLM(model=model_dir, dtype=dtype, enable_prefix_caching=enabled)
        llm.generate(["warm-up"], params, use_tqdm=False)
        ttfts = []
        for p in prompts[: num_requests // 2]:  # one at a time: TTFT is the prefill alone
            out = llm.generate(p, params, use_tqdm=False)[0]
            ttfts.append(out.metrics.ttft * 1e3)
        start = time.perf_counter()
        llm.generate(prompts[num_requests // 2 :], params, use_tqdm=False)  # all at once: throughput
        elapsed = time.perf_counter() - start
        stats = llm.engine.block_manager.get_stats()
        runs.append(PrefixRun("prefix cache " + ("on" if enabled else "off"), statistics.fmean(ttfts), statistics.median(ttfts), elapsed, num_requests - num_requests // 2, stats.prefix_cache_hit_rate))
    return runs


def prefix_table(runs: list[PrefixRun]) -> str:
    base = runs[0]
    lines = ["| run | mean TTFT (ms) | p50 TTFT (ms) | batch of requests (s) | requests/s | speedup | prompt tokens from cache |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r.name} | {r.mean_ttft_ms:.0f} | {r.p50_ttft_ms:.0f} | {r.batch_elapsed_s:.2f} | {r.num_requests / r.batch_elapsed_s:.2f} | {base.batch_elapsed_s / r.batch_elapsed_s:.2f}x | {r.hit_rate:.0%} |")
    return "\n".join(lines)
