"""Turns sequences into what callers see: stop checks and ``CompletionOutput`` (vLLM's output processor).

Kept out of the step loop because it is pure text and token bookkeeping: the tokenizer,
the EOS ids and ``max_model_len`` are all it needs.
"""

from __future__ import annotations

from typing import Any

from servinglab.engine.outputs import CompletionOutput
from servinglab.engine.sampling import SamplingParams
from servinglab.sequence import Sequence, SequenceStatus


class OutputProcessor:
    """Stop conditions and completion text for one engine's sequences."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def stop_reason(self, seq: Sequence) -> SequenceStatus | None:
        """Why ``seq`` stops after its newest token (EOS, stop token or string, length), or ``None``."""
        p: SamplingParams = seq.sampling_params
        n_out = len(seq.output_token_ids)
        last = seq.output_token_ids[-1]
        if n_out >= p.min_tokens:
            if (not p.ignore_eos and last in self.eos_token_ids) or last in p.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED
            if p.stop and self.find_stop(seq) is not None:
                return SequenceStatus.FINISHED_STOPPED
        if (p.max_tokens is not None and n_out >= p.max_tokens) or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def find_stop(self, seq: Sequence) -> tuple[int, str] | None:
        """Earliest stop string in the decoded output: (char index, the string)."""
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=seq.sampling_params.skip_special_tokens)
        hits = [(text.find(s), s) for s in seq.sampling_params.stop if s in text]
        return min(hits) if hits else None

    def completion(self, index: int, seq: Sequence) -> CompletionOutput:
        """Completion ``index`` of a request: text cut at a stop string, finish and stop reasons."""
        p: SamplingParams = seq.sampling_params
        ids = list(seq.output_token_ids)
        stop_reason: int | str | None = None
        text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens) if self.tokenizer is not None else ""
        if seq.status is SequenceStatus.FINISHED_STOPPED:
            found = self.find_stop(seq) if p.stop else None
            if found is not None:
                text, stop_reason = text[: found[0]], found[1]
            elif ids and (ids[-1] in p.stop_token_ids or ids[-1] in self.eos_token_ids):
                stop_reason = ids[-1]
        reason = seq.status.value if seq.is_finished else None
        return CompletionOutput(index, text, ids, reason, stop_reason)
