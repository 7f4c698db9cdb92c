"""Part 5 (analysis): Leviathan et al.'s expected acceptance, tokens per step and speedup.

Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
ICML 2023 (arXiv 2211.17192), section 3: with acceptance rate ``a`` and ``k`` drafts a
target pass yields ``(1 - a^(k+1)) / (1 - a)`` tokens on average, and with a draft that
costs ``c`` target passes per token the wall-time speedup is that divided by ``k c + 1``.
"""

from __future__ import annotations

import torch


def expected_acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """``sum_x min(p(x), q(x))`` over the last dim: the chance one draft is accepted (1 - TV distance)."""
    ### BEGIN SOLUTION
    if target_probs.shape != draft_probs.shape:
        raise ValueError(f"draft_probs must have target_probs' shape {tuple(target_probs.shape)}, got {tuple(draft_probs.shape)}")
    return torch.minimum(target_probs, draft_probs).sum(-1)
    ### END SOLUTION


def expected_tokens_per_step(a: float, k: int) -> float:
    """Tokens one target pass yields, ``(1 - a^(k+1)) / (1 - a)`` (Leviathan et al. 2023; ``k + 1`` at a = 1)."""
    ### BEGIN SOLUTION
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"a (acceptance rate) must be in [0, 1], got {a!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return float(k + 1) if a == 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
    ### END SOLUTION


def expected_speedup(a: float, k: int, c: float) -> float:
    """Wall-time speedup ``(1 - a^(k+1)) / ((1 - a)(k c + 1))``, ``c`` = draft cost / target cost (Leviathan et al. 2023)."""
    ### BEGIN SOLUTION
    if not c >= 0.0:
        raise ValueError(f"c (draft cost / target cost) must be >= 0, got {c!r}")
    return expected_tokens_per_step(a, k) / (k * c + 1.0)
    ### END SOLUTION
