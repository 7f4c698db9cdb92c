"""The offline quality measures of ``servinglab bench quant``: the stdlib text, windows, perplexity, agreement."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from servinglab.bench.quality import greedy_agreement, perplexity, stdlib_docstring_text, text_fingerprint, token_windows
from servinglab.model.quant import quantize_model
from servinglab.model.weights import random_model, tiny_llama_config


def test_stdlib_text_is_deterministic_and_fingerprinted():
    text = stdlib_docstring_text()
    assert text == stdlib_docstring_text(), "the extraction must not depend on anything but the Python version"
    assert len(text) > 20_000 and "argparse" in text.lower()
    fp = text_fingerprint(text)
    assert fp["sha256"] == hashlib.sha256(text.encode()).hexdigest() and fp["chars"] == len(text)


def test_windows_and_their_errors():
    w = token_windows(list(range(100)), 10, 3)
    assert w.shape == (3, 10) and w[1, 0] == 10
    with pytest.raises(ValueError, match="num_windows"):
        token_windows(list(range(100)), 10, 11)


def test_perplexity_of_a_model_and_its_int8_copy():
    config = tiny_llama_config()
    windows = torch.randint(3, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    dense = perplexity(random_model(config, seed=0), windows, batch=2)
    quant = random_model(config, seed=0)
    quantize_model(quant, "int8")
    q8 = perplexity(quant, windows, batch=2)
    assert math.isfinite(dense) and dense > 1  # random weights give peaked logits: a huge perplexity on random tokens
    assert abs(math.log(q8) - math.log(dense)) / math.log(dense) < 0.05, "int8 per channel changes the mean NLL by little"


def test_greedy_agreement():
    got = greedy_agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]])
    assert got == {"identical": 0.5, "mean_common_prefix": 2.0}
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])
