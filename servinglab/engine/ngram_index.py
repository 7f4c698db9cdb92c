"""Prompt lookup in O(1) per step: an incremental n-gram index per sequence (the GPU path's proposer).

Part 5's :class:`NgramProposer` searches the whole sequence every step (``Tensor.unfold``
and a comparison per ``n``): tens of microseconds of small tensor operations per
sequence, i.e. milliseconds per step at batch 64, more than a CUDA-graph decode step
of a small model. vLLM compiles a KMP search for the same reason. Here each sequence
keeps a dict ``n-gram -> start of its latest occurrence`` for every ``n`` in
``[prompt_lookup_min, prompt_lookup_max]``, updated with the tokens committed since the
last call, so a proposal is a few dict lookups. The answer is the student's rule
exactly: the longest suffix n-gram that occurred earlier, its most recent earlier
occurrence, the up to ``k`` tokens that followed it (a test compares the two).
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """The n-grams of one growing sequence, for :meth:`propose`.

    Args:
        prompt_lookup_min, prompt_lookup_max, num_speculative_tokens: as for Part 5's ``NgramProposer``.
    """

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int) -> None:
        self.lo, self.hi, self.k = prompt_lookup_min, prompt_lookup_max, num_speculative_tokens
        self.tokens: list[int] = []
        self.latest: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest occurrence that is not the suffix
        self.indexed = 0  # n-grams ending before this position are in `latest`

    def _extend(self, token_ids: Sequence[int]) -> None:
        self.tokens.extend(token_ids[len(self.tokens) :])
        toks, last = self.tokens, len(self.tokens) - 1
        # Index every n-gram that ends before the last token (the suffix ends at it and is not "earlier").
        for end in range(self.indexed, last):
            for n in range(self.lo, min(self.hi, end + 1) + 1):
                self.latest[tuple(toks[end - n + 1 : end + 1])] = end - n + 1
        self.indexed = max(self.indexed, last)

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Up to ``k`` tokens after the latest earlier occurrence of the longest matching suffix n-gram.

        ``token_ids`` must extend the tokens of the previous call (committed tokens only grow).
        """
        self._extend(token_ids)
        toks = self.tokens
        length = len(toks)
        for n in range(min(self.hi, length - 1), self.lo - 1, -1):
            start = self.latest.get(tuple(toks[length - n :]))
            if start is not None:
                return toks[start + n : start + n + self.k]
        return []
