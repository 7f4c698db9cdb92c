"""``servinglab build-trt``: the shape and precision logic (plain Python), and a clear failure without TensorRT.

The TensorRT build itself needs TensorRT and an NVIDIA GPU; neither is available on the
course machines, so it has never run here. These tests cover what can be checked
anywhere: the optimization profiles derived from the engine limits, the TensorRT 10 vs 11
precision plan, the legacy TensorRT-LLM command line, and the error message.
"""

from __future__ import annotations

import importlib.util

import pytest

from servinglab import cli
from servinglab.model.trt_build import (
    SEED_FLAG_MAP,
    TensorRTUnavailable,
    TrtShapes,
    import_tensorrt,
    optimization_profiles,
    precision_plan,
    trtllm_build_args,
)
from servinglab.model.onnx_export import io_names

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_cover_the_seed_limits():
    shapes = TrtShapes(max_batch_size=8, opt_batch_size=4, max_input_len=2048, max_output_len=512)
    assert shapes.max_seq_len == 2560
    prof = optimization_profiles(shapes, num_layers=30, num_kv_heads=3, head_dim=64)
    assert prof["prefill"] == {"input_ids": ((1, 1), (4, 1024), (8, 2048))}
    decode = prof["decode"]
    assert list(decode) == io_names(30, with_past=True)[0], "one profile entry per decode-graph input, same names"
    assert decode["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert decode["past.29.value"] == ((1, 3, 1, 64), (4, 3, 1279, 64), (8, 3, 2559, 64))
    for graph in prof.values():
        for lo, opt, hi in graph.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), "min <= opt <= max on every axis"


def test_shapes_validation_names_the_parameter():
    with pytest.raises(ValueError, match="max_batch_size"):
        TrtShapes(max_batch_size=0)
    with pytest.raises(ValueError, match="opt_batch_size"):
        TrtShapes(max_batch_size=2, opt_batch_size=4)
    with pytest.raises(ValueError, match="opt_input_len"):
        TrtShapes(max_input_len=16, opt_input_len=32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TrtShapes(max_input_len=8000, max_output_len=512).check_model(8192)
    TrtShapes(max_input_len=2048, max_output_len=512).check_model(8192)


def test_precision_plan_tensorrt_10_flags_vs_11_strong_typing():
    assert precision_plan(10, "fp16") == {"strongly_typed": False, "builder_flags": ["FP16"], "export_dtype": "float32"}
    assert precision_plan(10, "fp32")["builder_flags"] == []
    eleven = precision_plan(11, "fp16")
    assert eleven["strongly_typed"] and eleven["builder_flags"] == [] and eleven["export_dtype"] == "float16"
    with pytest.raises(ValueError, match="precision"):
        precision_plan(10, "int8")
    with pytest.raises(ValueError, match="trt_major"):
        precision_plan(7, "fp16")


def test_trtllm_commands_map_the_seed_flags():
    convert, build = trtllm_build_args(TrtShapes(8, 4, 2048, 512))
    assert convert[:2] == ["python", "convert_checkpoint.py"] and "--dtype" in convert
    joined = " ".join(build)
    assert "--max_seq_len 2560" in joined and "--max_output_len" not in joined
    assert "--gpt_attention_plugin" in build and "--use_gpt_attention_plugin" not in build
    assert SEED_FLAG_MAP["--max_output_len"][0] == "--max_seq_len"
    assert SEED_FLAG_MAP["--use_gemm_plugin"][0] == "--gemm_plugin"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT message does not apply")
def test_build_trt_fails_clearly_without_tensorrt(capsys):
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed"):
        import_tensorrt()
    assert cli.main(["build-trt"]) == 2
    out = capsys.readouterr().out
    assert "TensorRT is not installed" in out and "export-onnx" in out
