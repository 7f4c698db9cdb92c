"""Exactness checks that hold in any precision: identical tokens, or a divergence at a near-tie.

Speculative decoding, CUDA graphs, tensor parallelism and a paged engine all promise the
*same greedy tokens* as plain decoding. In exact arithmetic that is a theorem; in
floating point two computations of the same logits (one position per step vs ``k + 1``
positions in one extend pass, one GEMM blocking vs another) differ by rounding, and
where the best and second-best logits are closer than that rounding the greedy choice
may flip. From that token on the two sequences continue from different prefixes, so only
the *first* divergence says anything.

The check, used by the notebooks and tests wherever the same greedy tokens are
promised: the two token lists are identical, or at their first difference both tokens
lie within ``bound`` of the best logit of a reference model (float32) at that exact
prefix. A real bug (a kept draft that was never verified, a missing all-reduce) diverges
where the margin is whole units of logit, so it still fails.

Bounds (logit units, see :data:`NEAR_TIE`): float32 rounding moves a logit of size 10-30
by about 1e-5 per operation, so 0.01 leaves room for thirty layers and nothing more;
bfloat16 keeps 8 bits of mantissa, so one rounding moves such a logit by 0.04-0.12 and
0.5 allows for the errors of thirty layers adding up (measured: a bf16 divergence
between two CPU engines at a float32 margin of 0.057).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NEAR_TIE: dict[str, float] = {"float32": 0.01, "bfloat16": 0.5, "float16": 0.5}
"""Largest gap (logits) below the reference's best at which a greedy flip counts as rounding, per dtype."""


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where ``a`` and ``b`` differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def near_tie_bound(dtype: str | torch.dtype) -> float:
    """:data:`NEAR_TIE` for ``dtype`` (a name such as ``"bfloat16"`` or a ``torch.dtype``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in NEAR_TIE:
        raise ValueError(f"dtype={dtype!r} has no near-tie bound; allowed: {', '.join(NEAR_TIE)}")
    return NEAR_TIE[name]


def divergence_gap(logits: torch.Tensor, token_a: int, token_b: int) -> float:
    """How far below the best logit the worse of the two tokens lies (0 when both are the best)."""
    best = float(logits.max())
    return max(best - float(logits[token_a]), best - float(logits[token_b]))


def check_same_or_near_tie(
    expected: Sequence[int],
    got: Sequence[int],
    next_logits: Callable[[list[int]], torch.Tensor],
    bound: float,
    what: str = "tokens",
    eos_token_id: int | None = None,
) -> str:
    """Pass when ``got == expected`` or their first divergence is a near-tie; AssertionError otherwise.

    ``next_logits(generated_prefix)`` returns the reference model's logits ``[V]`` for the
    token after the prompt plus ``generated_prefix`` (the common tokens before the
    divergence). Where one list ends first (it stopped at EOS without listing it), its
    token there is ``eos_token_id``; without one, a length difference fails. Returns a
    one-line report for printing.
    """
    i = first_divergence(expected, got)
    if i is None:
        return f"{what}: identical ({len(got)} tokens)"
    pair = [seq[i] if i < len(seq) else eos_token_id for seq in (expected, got)]
    if None in pair:
        raise AssertionError(f"{what}: one sequence stops at token {i}, the other goes on ({len(expected)} vs {len(got)} tokens)")
    gap = divergence_gap(next_logits(list(expected[:i])), pair[0], pair[1])
    if gap > bound:
        raise AssertionError(
            f"{what}: diverge at token {i} ({pair[0]} vs {pair[1]}) where it is no near-tie: the worse one is "
            f"{gap:.3f} below the reference's best logit (allowed {bound})")
    return f"{what}: identical up to token {i}, then a near-tie (gap {gap:.4f} <= {bound}): rounding, not a bug"


def causal_lm_next_logits(model: torch.nn.Module, prompt: Sequence[int]) -> Callable[[list[int]], torch.Tensor]:
    """``next_logits`` for :func:`check_same_or_near_tie` from a transformers causal LM (run as it is)."""
    device = next(model.parameters()).device

    @torch.inference_mode()
    def next_logits(prefix: list[int]) -> torch.Tensor:
        ids = torch.tensor([list(prompt) + prefix], device=device)
        return model(ids).logits[0, -1].float().cpu()

    return next_logits
