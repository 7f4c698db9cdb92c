"""``bench quant``'s RTN-vs-GPTQ quality table on a tiny random Llama (the real model's run is the bench's)."""

from __future__ import annotations

import torch

from servinglab import impl
from servinglab.bench.gptq_quality import collect_hessians, compare, gptq_model, log_probs, quality_table, run_quality
from servinglab.model.weights import random_model, tiny_llama_config


def test_rtn_and_gptq_rows_on_a_tiny_model():
    config = tiny_llama_config()
    load = lambda: random_model(config, seed=0)  # noqa: E731
    windows = torch.randint(3, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with impl.use_impl("solutions"):
        model = load()
        hessians = collect_hessians(model, windows[:2])
        assert len(hessians) == 4 * config.num_hidden_layers
        h = hessians["model.layers.0.mlp.down_proj"]
        assert tuple(h.shape) == (config.intermediate_size,) * 2 and torch.allclose(h, h.T)
        q = gptq_model(load, hessians, 32)
        assert {type(m).__name__ for m in q.modules()} >= {"QuantLinear"}
        base = log_probs(model, windows[2:])
        ppl, kl = compare(base, base, windows[2:])
        assert kl == 0.0 and ppl > 1.0
        rows = run_quality(load, windows[:2], windows[2:], (32,), progress=False)
    assert [r.name for r in rows] == ["unquantized", "RTN int8", "RTN int4 g32", "GPTQ int4 g32"]
    assert all(r.kl >= 0 for r in rows) and rows[0].kl == 0
    assert "GPTQ int4 g32" in quality_table(rows)
