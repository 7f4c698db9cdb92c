"""The pipeline bubble, measured (Part 9b): ``m`` equal micro-batches through ``p`` stages.

:func:`measure_bubble` sends ``m`` identical prefill micro-batches into a
pipeline-parallel engine's ranks back to back (no scheduling between them), collects
the results, and reads every stage's compute intervals (each rank records them after
its ``recv`` and before its ``send``). The idle share ``1 - busy / (p x makespan)``
(the student's ``measured_bubble_fraction``) is compared with GPipe's
``(p - 1) / (m + p - 1)`` (``gpipe_bubble_fraction``). The formula assumes equal stage
costs and free hand-offs: an uneven layer split, the send/recv and the driver's
pickling add idle time; on a shared CPU the ranks also compete for cores.
``servinglab bench tp --pp 2`` prints the table; notebook 09 runs a small version.
"""

from __future__ import annotations

import statistics
from typing import Any

from servinglab.impl import load_part
from servinglab.interfaces import ScheduledSequence, SchedulerOutput
from servinglab.sequence import Sequence


def measure_bubble(llm: Any, microbatches: tuple[int, ...] = (1, 2, 4), tokens: int = 128, repeats: int = 3,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Measured and GPipe bubble fractions of a pipeline-parallel ``LLM`` at each micro-batch count.

    Each micro-batch is one ``tokens``-token prefill in its own KV blocks (the engine's
    pool must hold ``max(microbatches) * tokens`` tokens). Returns one row per count with
    the median over ``repeats`` runs.
    """
    import numpy as np

    engine = llm.engine
    executor = engine.tp_executor
    if executor is None or executor.pp_size < 2:
        raise ValueError("measure_bubble needs an LLM with pipeline_parallel_size >= 2")
    pp = load_part("pipeline_parallel")
    bs = engine.config.block_size
    per = -(-tokens // bs)
    if max(microbatches) * per > engine.num_kv_blocks:
        raise ValueError(f"{max(microbatches)} micro-batches of {tokens} tokens need {max(microbatches) * per} KV blocks, "
                         f"the engine has {engine.num_kv_blocks}")
    rng = np.random.default_rng(seed)
    prompt = rng.integers(100, engine.hf_config.vocab_size, tokens).tolist()
    slot_of, executor.slot_of = executor.slot_of, None  # these sequences live outside the schedulers
    stages = [r * executor.tp_size for r in range(executor.pp_size)]  # tensor-parallel rank 0 of every stage
    rows = []
    try:
        for m in microbatches:
            fractions = []
            for _ in range(repeats + 1):  # the first run warms up
                executor.rank_stats(reset=True)
                pending = []
                for j in range(m):
                    seq = Sequence(prompt_token_ids=list(prompt))
                    out = SchedulerOutput([ScheduledSequence(seq, tokens)])
                    pending.append(executor.submit(out, {seq.seq_id: list(range(j * per, (j + 1) * per))}))
                for sample in pending:
                    executor.collect(sample)
                busy = [executor.rank_stats()[r]["busy"] for r in stages]
                fractions.append(pp.measured_bubble_fraction(busy))
            measured = statistics.median(fractions[1:])
            ideal = pp.gpipe_bubble_fraction(executor.pp_size, m)
            rows.append({"pp": executor.pp_size, "microbatches": m, "measured": measured, "gpipe": ideal,
                         "relative_error": abs(measured - ideal) / ideal if ideal else float("nan")})
    finally:
        executor.slot_of = slot_of
    return rows


def bubble_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: micro-batches, measured bubble, GPipe's, and their relative difference."""
    lines = ["| PP | micro-batches m | measured bubble | GPipe (p-1)/(m+p-1) | relative difference |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['pp']} | {r['microbatches']} | {r['measured']:.3f} | {r['gpipe']:.3f} | {r['relative_error']:.0%} |")
    return "\n".join(lines)
