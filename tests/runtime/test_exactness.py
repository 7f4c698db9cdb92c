"""The near-tie-aware exactness check the notebooks use for "same greedy tokens" promises."""

from __future__ import annotations

import pytest
import torch

from servinglab.course.exactness import check_same_or_near_tie, divergence_gap, first_divergence, near_tie_bound


def logits_with(best: int, second: int, gap: float, vocab: int = 8) -> torch.Tensor:
    """Logits whose best token is ``best`` and ``second`` lies ``gap`` below it."""
    out = torch.full((vocab,), -10.0)
    out[best], out[second] = 5.0, 5.0 - gap
    return out


def test_first_divergence_counts_length_differences():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_identical_tokens_pass_without_calling_the_reference():
    def never(prefix: list[int]) -> torch.Tensor:
        raise AssertionError("no divergence, no reference pass")

    assert "identical" in check_same_or_near_tie([4, 5, 6], [4, 5, 6], never, 0.01)


def test_divergence_at_a_near_tie_passes_and_elsewhere_fails():
    seen: list[list[int]] = []

    def reference(prefix: list[int]) -> torch.Tensor:
        seen.append(prefix)
        return logits_with(best=3, second=6, gap=0.004)

    report = check_same_or_near_tie([1, 3, 2], [1, 6, 7], reference, near_tie_bound("float32"))
    assert "near-tie" in report and seen == [[1]], "the reference is asked at the common prefix only"
    with pytest.raises(AssertionError, match="no near-tie"):
        check_same_or_near_tie([1, 3], [1, 6], lambda p: logits_with(3, 6, gap=2.0), near_tie_bound(torch.bfloat16))


def test_a_token_the_reference_ranks_low_fails_even_if_the_other_is_best():
    logits = logits_with(best=3, second=6, gap=0.001)
    logits[0] = -3.0  # token 0 is far below the best
    assert divergence_gap(logits, 3, 0) == pytest.approx(8.0)
    with pytest.raises(AssertionError):
        check_same_or_near_tie([3], [0], lambda p: logits, 0.5)


def test_early_stop_compares_against_eos():
    eos = 2
    near = lambda prefix: logits_with(best=eos, second=5, gap=0.2)  # noqa: E731
    assert "near-tie" in check_same_or_near_tie([1, 5, 9], [1], near, 0.5, eos_token_id=eos)
    with pytest.raises(AssertionError, match="stops at token 1"):
        check_same_or_near_tie([1, 5, 9], [1], near, 0.5)


def test_unknown_dtype_names_the_allowed_ones():
    with pytest.raises(ValueError, match="float32, bfloat16"):
        near_tie_bound("int8")
