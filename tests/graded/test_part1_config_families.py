"""Part 1 graded test: KV-cache math from configs of other model families.

The original setup guide's test model is GPT-2, whose config.json names the fields
``n_layer``, ``n_embd`` and ``n_head`` (``transformers``' ``GPT2Config``; GPT-2 small:
12 layers, 768 wide, 12 heads of 64, vocabulary 50,257, no grouped-query attention).
"""

from __future__ import annotations

import pytest

GPT2_SMALL = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
              "n_head": 12, "n_inner": None, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}


@pytest.mark.part(1)
@pytest.mark.points(1)
def test_gpt2_config_gives_its_kv_cache_size(kv_cache) -> None:
    shape = kv_cache.ModelShape.from_config(GPT2_SMALL)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim) == (12, 12, 64)
    # 2 (K and V) x 12 layers x 12 heads x 64 x 2 bytes (fp16) = 36,864 bytes per token.
    mem = kv_cache.calculate_kv_cache_memory(shape, seq_len=1024, batch_size=1, dtype="float16")
    assert mem.bytes_per_token == 36_864, f"GPT-2 small holds 36,864 bytes of fp16 K/V per token, got {mem.bytes_per_token}"
    assert mem.total_bytes == 36_864 * 1024
    with pytest.raises(ValueError) as err:
        kv_cache.ModelShape.from_config({"vocab_size": 10})
    for name in ("num_hidden_layers", "n_layer", "hidden_size", "n_embd", "num_attention_heads", "n_head"):
        assert name in str(err.value), f"the error for a config it cannot read must name {name!r}: {err.value}"
