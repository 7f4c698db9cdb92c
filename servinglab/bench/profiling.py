"""Where a decode step's time goes: PyTorch profiler self-times, grouped by role.

Used by notebook 04 and handy in a shell::

    from servinglab.bench.profiling import profile_decode_steps
    profile_decode_steps(llm.engine, prompts, steps=4)

The groups follow a decode step's anatomy: the matrix products of the projections, MLP
and LM head (bound by reading weights at small batches, by arithmetic at large ones),
attention (gathering K/V through the block tables, then SDPA, plus the cache writes),
sampling, and everything else (norms, RoPE, activations, dtype conversions, Python).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

from torch.profiler import ProfilerActivity, profile

from servinglab.engine.sampling import SamplingParams

# Op names (self time, so nested ops are not counted twice) and the group they belong to.
GROUPS: dict[str, tuple[str, ...]] = {
    "matrix products": ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"),
    "attention": ("scaled_dot_product", "aten::index_select", "aten::index_copy_"),
    "sampling": ("aten::argmax", "aten::multinomial", "aten::topk", "aten::sort"),
}
OTHER = "everything else"


def group_of(op_name: str) -> str:
    """The group of a profiler op name (substring match on :data:`GROUPS`)."""
    for group, names in GROUPS.items():
        if any(name in op_name for name in names):
            return group
    return OTHER


def profile_decode_steps(engine, prompts: Seq[list[int]], steps: int = 4) -> dict[str, float]:
    """Profile ``steps`` decode-only steps of ``engine`` with ``prompts`` all running.

    Args:
        engine: an idle :class:`~servinglab.engine.LLMEngine`.
        prompts: token-id prompts; each runs greedy with room for ``steps + 2`` more tokens.
        steps: decode steps to profile (after one unprofiled warm-up step).

    Returns:
        Milliseconds per step by group (:data:`GROUPS` plus ``"everything else"``), and
        ``"wall"``: the step's wall-clock time measured outside the profiler.
    """
    if engine.has_unfinished_requests():
        raise ValueError("profile_decode_steps needs an idle engine (it has unfinished requests)")
    if not prompts or steps < 1:
        raise ValueError(f"need at least one prompt and steps >= 1, got {len(prompts)} prompts and steps={steps}")
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 4, ignore_eos=True)
    ids = [engine.add_request(list(p), params) for p in prompts]
    try:
        while any(s.is_prefill for s in [*engine.scheduler.waiting, *engine.scheduler.running]):
            engine.step()  # prefill (maybe in chunks) until every sequence decodes
        engine.step()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - start) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
    finally:
        for request_id in ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():  # overlap scheduling: commit (discard) the step still in flight
            engine.step()
    totals = dict.fromkeys([*GROUPS, OTHER], 0.0)
    for event in prof.key_averages():
        totals[group_of(event.key)] += event.self_cpu_time_total / 1000 / steps
    return {**totals, "wall": 1000 * wall}
