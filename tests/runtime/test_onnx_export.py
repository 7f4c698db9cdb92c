"""ONNX export of the decoder (``servinglab export-onnx``) on the tiny random Llama.

Both graphs must pass ``onnx.checker``, keep batch and sequence (prefill) / past length
(decode) dynamic, give onnxruntime logits within LOGITS_RTOL of PyTorch's, and give the
same greedy tokens as PyTorch and as the lab engine (paged cache, Part 3), all in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from servinglab.bench.onnx_parity import LOGITS_RTOL, lab_greedy
from servinglab.model.onnx_export import DenseKVDecoder, OnnxDecoder, export_onnx, io_names, torch_greedy
from servinglab.model.weights import random_model, tiny_llama_config

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_llama_config()
    model = random_model(config, dtype=torch.float32, seed=0)
    out = tmp_path_factory.mktemp("onnx")
    prefill = export_onnx(model, out / "prefill.onnx", with_past=False)
    decode = export_onnx(model, out / "decode.onnx", with_past=True)
    return config, model, prefill, decode, OnnxDecoder.load(prefill, decode, config.num_hidden_layers)


def dims(path, which: str) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    values = graph.input if which == "input" else graph.output
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_graphs_pass_the_checker_with_dynamic_axes(exported):
    config, _, prefill, decode, _ = exported
    for path in (prefill, decode):
        onnx.checker.check_model(str(path), full_check=True)
    ins = dims(prefill, "input")
    assert list(ins) == ["input_ids"] and all(isinstance(d, str) for d in ins["input_ids"]), ins
    outs = dims(prefill, "output")
    assert list(outs) == io_names(config.num_hidden_layers, with_past=False)[1]
    dec = dims(decode, "input")
    assert list(dec) == io_names(config.num_hidden_layers, with_past=True)[0]
    assert isinstance(dec["past.0.key"][2], str), "the past length must be a dynamic axis"


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 9), (2, 30)])
def test_prefill_logits_match_pytorch(exported, batch, seq):
    config, model, _, _, ort_model = exported
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        want = [t.numpy() for t in DenseKVDecoder(model, with_past=False)(ids)]
    got = ort_model.run_prefill(ids)
    scale = float(np.abs(want[0]).max())
    assert got[0].shape == (batch, seq, config.vocab_size)
    assert float(np.abs(got[0] - want[0]).max()) <= LOGITS_RTOL * scale
    for g, w in zip(got[1:], want[1:]):  # the K/V the decode graph continues from
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_identical_to_pytorch_and_lab_engine(exported):
    config, model, _, _, ort_model = exported
    ids = torch.randint(3, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(5))
    ort_tokens = ort_model.greedy(ids, 12)
    assert torch.equal(ort_tokens, torch_greedy(model, ids, 12))
    fresh = random_model(config, dtype=torch.float32, seed=0)  # the engine owns its model object
    assert ort_tokens.tolist() == lab_greedy(fresh, config, ids.tolist(), 12)


def test_export_refuses_a_bfloat16_model(tmp_path):
    model = random_model(tiny_llama_config(), dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(model, tmp_path / "x.onnx", with_past=False)
