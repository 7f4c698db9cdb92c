"""``bench quant``'s RTN-vs-GPTQ quality table on a tiny random Llama (the real model's run is the bench's)."""

from __future__ import annotations

import torch

from servinglab import impl
from servinglab.bench.gptq_quality import (collect_hessians, compare, gptq_model, gptq_model_sequential, log_probs, quality_table,
                                           run_quality)
from servinglab.model.quant import projection_linears
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


def test_sequential_gptq_calibrates_each_layer_through_the_quantized_ones():
    """Layer 0 sees the same inputs either way (same codes as the one-pass GPTQ); layer 1's inputs went
    through the quantized layer 0 (other codes); a pass that stops after a layer collects the same Hessians."""
    config = tiny_llama_config()
    load = lambda: random_model(config, seed=0)  # noqa: E731
    windows = torch.randint(3, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with impl.use_impl("solutions"):
        model = load()
        full = collect_hessians(model, windows)
        first = model.model.layers[0]
        early = collect_hessians(model, windows, linears=[lin for _, _, lin in projection_linears(first)], stop_after=first.mlp.down_proj)
        assert early.keys() == {k for k in full if k.startswith("model.layers.0.")}
        assert all(torch.equal(early[k], full[k]) for k in early)
        one_pass, sequential = gptq_model(load, full, 32), gptq_model_sequential(load, windows, 32)
    a, b = one_pass.state_dict(), sequential.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.0."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.1.") and k.endswith("qweight"))
