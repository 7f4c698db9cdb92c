"""Part 2 graded tests: a cached block is reused only after the same whole prefix.

A block's K/V depends on every token before it, not only on its own tokens, which is why
vLLM chains each block's hash with its parent's (``hash(parent_hash, block_tokens)``). A
hash of the block's tokens alone would let two prompts that contain the same block after
*different* prefixes share it, and the second prompt would attend to K/V computed for the
first prompt's context: wrong text, no error. These tests catch that at the block level
and at the level of the tokens the engine generates.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from servinglab import LLM, SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config

TAIL = [50, 51, 52, 53]  # one full block (block_size 4) that both prompts contain


def prefill(m, seq_id: int, tokens: list[int]) -> int:
    """Allocate a prompt and publish its computed full blocks, as the engine does after a prefill."""
    cached = m.allocate_blocks(seq_id, tokens)
    m.cache_blocks(seq_id, tokens, len(tokens))
    return cached


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_equal_blocks_after_different_prefixes_are_not_shared(block_manager: ModuleType) -> None:
    m = block_manager.PagedAttentionConfig(num_blocks=16, block_size=4, enable_prefix_caching=True)
    head_a, head_b = [1, 2, 3, 4], [9, 8, 7, 6]
    a = head_a + [70, 71, 72, 73] + [60]
    b = head_b + TAIL + [60]  # TAIL after head_b
    c = head_a + TAIL + [61]  # TAIL after head_a: only head_a's block may be reused
    prefill(m, 1, a)
    prefill(m, 2, b)
    hits = m.allocate_blocks(3, c)
    assert hits == 4, (
        f"c shares only its first block with a, but got {hits} cached tokens: its second block holds the same "
        "tokens as b's second block after a different first block, and a block's hash must chain its parent's "
        "hash so such blocks never match"
    )
    assert m.block_tables[3][0] == m.block_tables[1][0], "c's first block is a's first block (same prefix)"
    assert m.block_tables[3][1] != m.block_tables[2][1], "c must not reuse b's second block: its K/V saw b's first block"
    # The same whole prefix still hits: both full blocks of b are reused.
    assert m.allocate_blocks(4, b[:8] + [61]) == 8, "a prompt that starts with b's two full blocks must reuse both"
    assert m.block_tables[4][:2] == m.block_tables[2][:2], "those two blocks are b's own"


@pytest.mark.part(2)
@pytest.mark.points(2)
def test_engine_output_is_unchanged_by_a_false_prefix_match(block_manager: ModuleType) -> None:
    """Through the engine (your Parts 2, 3 and 4): c's greedy tokens after a and b were served equal c's alone."""
    config = tiny_llama_config()
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    gen = torch.Generator().manual_seed(3)
    head_a, head_b, mid, tail, rest = (torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (8, 8, 8, 8, 5))
    a, b, c = head_a + mid + rest, head_b + tail + rest, head_a + tail + rest

    def engine(caching: bool) -> LLM:
        model = random_model(config, dtype=torch.float32, seed=0)
        return LLM(model_obj=model, hf_config=config, dtype="float32", block_size=4, num_kv_blocks=64,
                   enable_prefix_caching=caching)

    alone = engine(False).generate([c], greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm = engine(True)
    llm.generate([a, b], greedy, use_tqdm=False)
    out = llm.generate([c], greedy, use_tqdm=False)[0]
    assert out.metrics.num_cached_tokens == len(head_a), (
        f"c shares its first {len(head_a)} tokens with a, but reused {out.metrics.num_cached_tokens}: the blocks after "
        "them hold the same tokens as b's, after another prefix, so their K/V belong to b's context"
    )
    assert out.outputs[0].token_ids == alone, "c's greedy tokens changed after a and b were served: c attended to b's K/V"
