"""The transformers oracle the runtime tests compare against."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding with transformers' KV cache, never stopping (EOS included as a token).

    ``generate(min_new_tokens=...)`` would forbid EOS instead, which is not what
    ``ignore_eos`` means in vLLM (EOS may be generated, it just does not end the request).
    """
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(num_tokens):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens
