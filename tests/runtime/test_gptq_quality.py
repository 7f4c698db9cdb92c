"""``bench quant``'s RTN-vs-GPTQ quality table and its GPTQ calibration (true-sequential, act-order) on a tiny
random Llama (the real model's run is the bench's)."""

from __future__ import annotations

import torch

from servinglab import impl
from servinglab.bench.gptq_calibrate import SEQUENTIAL_ORDER, gptq_int4, gptq_replace, sequential_hessians
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


def test_layer_by_layer_walk_gives_the_full_forward_hessians():
    """Without quantizing, the walk over cached layer inputs equals the full-forward hook pass, bitwise;
    so does a pass that stops after a layer."""
    config = tiny_llama_config()
    windows = torch.randint(3, config.vocab_size, (5, 32), generator=torch.Generator().manual_seed(0))
    with impl.use_impl("solutions"):
        model = random_model(config, seed=0)
        full = collect_hessians(model, windows)
        walked = sequential_hessians(model, windows)
        first = model.model.layers[0]
        early = collect_hessians(model, windows, linears=[lin for _, _, lin in projection_linears(first)], stop_after=first.mlp.down_proj)
    assert walked.keys() == full.keys() and all(torch.equal(walked[k], full[k]) for k in full)
    assert early.keys() == {k for k in full if k.startswith("model.layers.0.")}
    assert all(torch.equal(early[k], full[k]) for k in early)


def test_sequential_gptq_calibrates_each_projection_through_the_quantized_ones():
    """Each projection's Hessian is the full-forward one of a model where exactly the projections before it
    (earlier layers, then q/k/v -> o -> gate/up -> down in its own layer) are already GPTQ-quantized: o_proj's
    inputs went through the quantized q/k/v, down_proj's through the quantized gate/up."""
    config = tiny_llama_config()
    load = lambda: random_model(config, seed=0)  # noqa: E731
    windows = torch.randint(3, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with impl.use_impl("solutions"):
        quantized = load()
        used = sequential_hessians(quantized, windows, gptq_replace(32))
        assert projection_linears(quantized) == []  # every plain nn.Linear projection was replaced
        unquantized = collect_hessians(load(), windows)
        order = [(f"model.layers.{i}.{part}", name) for i in range(config.num_hidden_layers) for part, name in SEQUENTIAL_ORDER]
        assert list(used) == [f"{parent}.{name}" for parent, name in order]
        partial = load()
        for parent, name in order:
            key = f"{parent}.{name}"
            reference = collect_hessians(partial, windows, linears=[partial.get_submodule(key)])[key]
            assert torch.equal(used[key], reference), key
            # Then this projection too is quantized, as the walk did, before the next one's Hessian.
            setattr(partial.get_submodule(parent), name, quantized.get_submodule(key))
    assert torch.equal(used["model.layers.0.self_attn.qkv_proj"], unquantized["model.layers.0.self_attn.qkv_proj"])
    for key in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"):
        assert not torch.allclose(used[key], unquantized[key]), key


def test_sequential_gptq_model_matches_the_one_pass_codes_only_where_the_inputs_are_unquantized():
    """Layer 0's qkv_proj sees the same inputs either way (same codes as the one-pass GPTQ); o_proj and
    every later projection see inputs through quantized ones (other codes)."""
    config = tiny_llama_config()
    load = lambda: random_model(config, seed=0)  # noqa: E731
    windows = torch.randint(3, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with impl.use_impl("solutions"):
        one_pass, sequential = gptq_model(load, collect_hessians(load(), windows), 32), gptq_model_sequential(load, windows, 32)
    a, b = one_pass.state_dict(), sequential.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.0.self_attn.qkv_proj."))
    for proj in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"):
        assert not torch.equal(a[f"{proj}.qweight"], b[f"{proj}.qweight"]), proj


def test_act_order_keeps_part_8a_groups_and_puts_codes_back_in_place():
    """A diagonal Hessian correlates nothing: GPTQ in any column order gives round-to-nearest's codes and scales,
    so with a scrambled diagonal (a non-trivial order) act-order must give back exactly RTN's layout."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 256, generator=gen)
    with impl.use_impl("solutions"):
        quant = impl.load_part("quantization")
        packed, scales = gptq_int4(weight, torch.diag(0.1 + torch.rand(256, generator=gen)), 64, act_order=True)
        rtn_packed, rtn_scales = quant.quantize_int4(weight, 64)
    assert torch.equal(packed, rtn_packed) and torch.equal(scales, rtn_scales)


def test_act_order_lowers_the_output_error_on_outlier_channels():
    """Correlated inputs with a few loud channels (as LLM activations have): quantizing those columns first,
    while the columns correlated with them can still absorb their error, at least halves the output error
    of the natural order (seeded; about 4x here)."""
    gen = torch.Generator().manual_seed(0)
    loud = torch.ones(256)
    loud[torch.randperm(256, generator=gen)[:8]] = 20.0
    x = (torch.randn(2048, 64, generator=gen) @ torch.randn(64, 256, generator=gen) + 0.5 * torch.randn(2048, 256, generator=gen)) * loud
    weight = torch.randn(64, 256, generator=gen) / 16
    with impl.use_impl("solutions"):
        gptq, quant = impl.load_part("gptq"), impl.load_part("quantization")
        h = gptq.hessian_from_inputs(x)
        errors = [gptq.output_error(x, weight, quant.dequantize_int4(*gptq_int4(weight, h, 64, act_order=a), 64)) for a in (False, True)]
        assert torch.equal(gptq_int4(weight, h, 64, act_order=False)[0], gptq.gptq_quantize_int4(weight, h, 64)[0])
    assert errors[1] < 0.5 * errors[0], errors
