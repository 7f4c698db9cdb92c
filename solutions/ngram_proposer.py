"""Part 5, the n-gram proposer: draft tokens by looking the sequence's own past up.

Speculative decoding (:mod:`.speculative`) needs a cheap *proposer* that guesses the
next ``k`` tokens; the target model then verifies all of them in one forward pass. The
cheapest proposer has no model at all: prompt lookup decoding (Saxena, 2023), vLLM's
``ngram`` method (``vllm/v1/spec_decode/ngram_proposer.py``). Text often repeats what
came before (a quoted passage, code being edited, a list's format), so the tokens that
followed the last occurrence of the sequence's latest n-gram are a good guess.

It is deterministic: its draft distribution ``q`` is one-hot on its guess, so
:func:`~.speculative.rejection_sample` takes ``draft_probs=None`` for it. The lab
engine (``servinglab.engine.spec_decode``) calls :meth:`NgramProposer.propose` for each
decoding sequence on a CPU; on a GPU it uses an incremental index that must propose
exactly the same tokens. :mod:`.speculative` re-exports the class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class NgramProposer:
    """Prompt-lookup decoding: guess that text repeats (Saxena's prompt lookup decoding, 2023; vLLM's ``ngram`` method).

    Take the sequence's last ``n`` tokens for ``n`` from ``prompt_lookup_max`` down to
    ``prompt_lookup_min``; at the first (longest) ``n`` that also occurs earlier in the
    sequence, propose the up to ``num_speculative_tokens`` tokens that followed it.
    Among several earlier occurrences the MOST RECENT one wins: recent context is the
    best predictor of what repeats next (a quoted passage being copied, a list format),
    and vLLM's KMP-based search also settles on the latest longest match.
    """

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int, num_speculative_tokens: int) -> None:
        # Store the three arguments as attributes of the same names; raise ValueError naming
        # the parameter unless 1 <= prompt_lookup_min <= prompt_lookup_max and num_speculative_tokens >= 1.
        ### BEGIN SOLUTION
        if not isinstance(prompt_lookup_min, int) or prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be an integer >= 1, got {prompt_lookup_min!r}")
        if not isinstance(prompt_lookup_max, int) or prompt_lookup_max < prompt_lookup_min:
            raise ValueError(f"prompt_lookup_max must be an integer >= prompt_lookup_min ({prompt_lookup_min}), got {prompt_lookup_max!r}")
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}")
        self.prompt_lookup_min = prompt_lookup_min
        self.prompt_lookup_max = prompt_lookup_max
        self.num_speculative_tokens = num_speculative_tokens
        ### END SOLUTION

    def propose(self, token_ids: Sequence[int]) -> list[int]:
        """Return up to ``num_speculative_tokens`` guessed next tokens, ``[]`` if no n-gram matches."""
        # The suffix itself is not an "earlier" occurrence; an occurrence may overlap the suffix
        # (in [5, 6, 5, 6] the 2-gram [5, 6] at 0 is followed by [5, 6]). Tensor.unfold lists n-grams.
        ### BEGIN SOLUTION
        tokens = torch.as_tensor(list(token_ids), dtype=torch.long)
        length = len(tokens)
        for n in range(min(self.prompt_lookup_max, length - 1), self.prompt_lookup_min - 1, -1):
            windows = tokens.unfold(0, n, 1)[:-1]  # every n-gram except the suffix itself
            hits = (windows == tokens[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n  # most recent occurrence; it is always followed by >= 1 token
                return tokens[start : start + self.num_speculative_tokens].tolist()
        return []
        ### END SOLUTION


__all__ = ["NgramProposer"]
