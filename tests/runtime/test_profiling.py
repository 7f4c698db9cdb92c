"""servinglab.bench.profiling: decode steps split by role, engine left idle."""

from __future__ import annotations

import pytest
import torch

from servinglab import LLM
from servinglab.bench.profiling import GROUPS, OTHER, group_of, profile_decode_steps
from servinglab import SamplingParams
from servinglab.model.weights import random_model, tiny_llama_config


@pytest.fixture
def engine():
    config = tiny_llama_config()
    llm = LLM(model_obj=random_model(config, dtype=torch.float32, seed=0), hf_config=config,
              dtype="float32", num_kv_blocks=64, block_size=4, device="cpu")
    return llm.engine


def test_groups_of_op_names():
    assert group_of("aten::mm") == group_of("mkldnn::_linear_pointwise") == "matrix products"
    assert group_of("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert group_of("aten::argmax") == "sampling"
    assert group_of("aten::rsqrt") == OTHER


def test_profile_reports_every_group_and_frees_the_engine(engine):
    free = engine.block_manager.num_free_blocks
    result = profile_decode_steps(engine, [list(range(3, 20)), list(range(7, 15))], steps=2)
    assert set(result) == {*GROUPS, OTHER, "wall"}
    assert result["matrix products"] > 0 and result["attention"] > 0 and result["wall"] > 0
    assert not engine.has_unfinished_requests() and engine.block_manager.num_free_blocks == free


def test_profile_refuses_a_busy_engine_and_bad_arguments(engine):
    with pytest.raises(ValueError, match="steps"):
        profile_decode_steps(engine, [[1, 2, 3]], steps=0)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="idle engine"):
        profile_decode_steps(engine, [[1, 2, 3]], steps=1)
