"""Notebook 05's graded check tells a correct Part 5 from a wrong one, on every device it may run on.

The check (``servinglab.course.exactness.check_same_or_near_tie``) lets speculative greedy
tokens differ from plain greedy tokens only at a near-tie of the target. That makes it
robust to rounding (bf16 on a GPU verifies k + 1 positions in one pass where plain decoding
does one) but it must stay sharp: a Part 5 that keeps the drafts without verifying them
must still fail it. Run here on the real SmolLM2-135M-Instruct with the notebook's prompt,
proposer and ``k``, on the CPU in float32, and on CUDA in float32 and bfloat16 (``gpu``).
"""

from __future__ import annotations

import pytest
import torch

from servinglab import impl
from servinglab.course.exactness import causal_lm_next_logits, check_same_or_near_tie, near_tie_bound
from servinglab.engine.draft_model import cached_logits_fn
from servinglab.engine.sampling import SamplingParams
from servinglab.model.prepare import default_model_dir, is_prepared

pytestmark = pytest.mark.skipif(not is_prepared(), reason="model not prepared: run `servinglab prepare-model`")
NOTICE = ("The reading room on the second floor opens at nine in the morning and closes at six in the evening. "
          "Members may borrow up to five books at a time for three weeks. Members must return books to the front desk, "
          "not to the shelves. Food and drinks are not allowed in the reading room, but members may drink water.")
MAX_TOKENS, K = 64, 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", torch.float32, id="cpu-float32"),
           pytest.param("cuda", torch.float32, id="cuda-float32", marks=[pytest.mark.gpu, CUDA]),
           pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=[pytest.mark.gpu, CUDA])]


def unverified_rejection_sample(draft_token_ids, draft_probs, target_probs, generator=None, num_draft_tokens=None):
    """The planted bug: every draft is kept, the target only supplies the bonus token."""
    batch, k = draft_token_ids.shape
    bonus = target_probs[:, k].argmax(dim=-1, keepdim=True).to(draft_token_ids.device)
    return torch.cat([draft_token_ids.long(), bonus], dim=1), torch.full((batch,), k, dtype=torch.long)


@pytest.fixture(scope="module")
def tok_and_prompt():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tok.apply_chat_template([{"role": "user", "content": "Rewrite this notice, replacing the word 'Members' with "
                                    f"'Visitors':\n\n{NOTICE}"}], add_generation_prompt=True)
    return tok, list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("device, dtype", DEVICES)
def test_notebook_check_passes_the_reference_and_fails_unverified_drafts(tok_and_prompt, device, dtype, monkeypatch):
    from transformers import AutoModelForCausalLM

    tok, prompt = tok_and_prompt
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).to(device).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=MAX_TOKENS, do_sample=False)
    reference = out[0, len(prompt):].tolist()
    spec = impl.load_part("speculative", "solutions")
    greedy, bound = SamplingParams(temperature=0.0), near_tie_bound(model.dtype)
    oracle = causal_lm_next_logits(model, prompt)

    def run() -> list[int]:
        return spec.SpeculativeDecoding().generate_with_speculation(
            cached_logits_fn(model), spec.NgramProposer(1, 3, K), prompt, max_tokens=MAX_TOKENS, params=greedy, k=K,
            eos_token_id=tok.eos_token_id).token_ids

    print(check_same_or_near_tie(reference, run(), oracle, bound, "reference Part 5", eos_token_id=tok.eos_token_id))
    monkeypatch.setattr(spec, "rejection_sample", unverified_rejection_sample)
    with pytest.raises(AssertionError, match="no near-tie|stops at token"):
        check_same_or_near_tie(reference, run(), oracle, bound, "unverified drafts", eos_token_id=tok.eos_token_id)
