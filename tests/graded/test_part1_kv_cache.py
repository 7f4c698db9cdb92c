"""Graded tests for Part 1: KV-cache memory math.

Model shapes are the published config.json values collected in docs/references.md (layers,
hidden, heads, kv heads, head_dim, vocab) plus each config.json's ``intermediate_size``
and ``tie_word_embeddings``. Expected numbers are worked out here from first principles,
not read back from the code under test.

Bugs these tests guard against, each caught by at least two of them (a published or
hand-computed number, and a comparison with the bytes the runtime really allocates;
``scripts/mutation_check.py`` plants them): K and V not both counted; query heads used
where the KV heads belong (grouped-query attention ignored); the weights not divided
among tensor-parallel ranks; blocks per sequence rounded down instead of up; tied
embeddings counted twice in the parameter count (and so in the default weight bytes).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from servinglab.model.cache import KVCacheSpec, allocate_kv_cache, kv_cache_nbytes

KIB, GIB = 1024, 1024**3
GPU_80GB = 80 * GIB  # an "80GB" A100/H100 carries 80 GiB of HBM

# name: (layers, hidden, heads, kv_heads, head_dim, vocab, intermediate, tied) - each model's config.json
CONFIGS = {
    "SmolLM2-135M": (30, 576, 9, 3, 64, 49152, 1536, True),
    "Llama-2-7B": (32, 4096, 32, 32, 128, 32000, 11008, False),
    "Llama-2-13B": (40, 5120, 40, 40, 128, 32000, 13824, False),
    "Llama-2-70B": (80, 8192, 64, 8, 128, 32000, 28672, False),
    "Llama-3.1-8B": (32, 4096, 32, 8, 128, 128256, 14336, False),
}


def shape(kv_cache, name: str):
    return kv_cache.ModelShape(*CONFIGS[name], name=name)


def llama_params(layers, hidden, heads, kv, hd, vocab, inter, tied) -> int:
    """Independent count: embeddings (+ lm_head), q/k/v/o, gated MLP, two norms per layer, final norm."""
    per_layer = hidden * hd * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.part(1)
@pytest.mark.points(2)
def test_bytes_per_token_of_published_models(kv_cache):
    """docs/references.md: Llama-2-13B needs 800 KiB per token in fp16 (the vLLM paper's OPT-13B figure)."""
    per_token = lambda name, dt: kv_cache.calculate_kv_cache_memory(shape(kv_cache, name), 1, dtype=dt).bytes_per_token
    assert per_token("Llama-2-13B", "float16") == 800 * KIB, "Llama-2-13B fp16 needs 800 KiB per token: KV bytes per token = 2 x layers x kv_heads x head_dim x bytes per element"
    assert per_token("Llama-2-7B", "float16") == 512 * KIB, "Llama-2-7B fp16 needs 512 KiB per token: KV bytes per token = 2 x layers x kv_heads x head_dim x bytes per element"
    assert per_token("Llama-2-70B", "float16") == 2 * 80 * 8 * 128 * 2 == 320 * KIB, "Llama-2-70B has 8 KV heads (GQA): use num_kv_heads x head_dim, not hidden_size"  # GQA: 8 kv heads
    assert per_token("Llama-3.1-8B", "bfloat16") == 2 * 32 * 8 * 128 * 2 == 128 * KIB, "Llama-3.1-8B has 8 KV heads (GQA): use num_kv_heads x head_dim, not hidden_size"
    assert per_token("SmolLM2-135M", "bfloat16") == 2 * 30 * 3 * 64 * 2 == 23040, "SmolLM2-135M: 2 x 30 layers x 3 KV heads x 64 x 2 bytes = 23,040"


@pytest.mark.part(1)
@pytest.mark.points(1)
def test_per_sequence_and_per_batch(kv_cache):
    mem = kv_cache.calculate_kv_cache_memory(shape(kv_cache, "Llama-2-13B"), seq_len=4096, batch_size=8, dtype="fp16")
    assert mem.bytes_per_token == 800 * KIB, "bytes_per_token of Llama-2-13B in fp16 should be 800 KiB"
    assert mem.bytes_per_sequence == 800 * KIB * 4096, "bytes_per_sequence = bytes_per_token x seq_len"
    assert mem.total_bytes == 800 * KIB * 4096 * 8, "total_bytes = bytes_per_sequence x batch_size"
    assert mem.total_gib == pytest.approx(25.0), "total_gib = total_bytes / 2**30"  # 3.125 GiB per 4k-token sequence


@pytest.mark.part(1)
@pytest.mark.points(2)
def test_dtype_names_and_torch_dtypes(kv_cache):
    s = shape(kv_cache, "Llama-3.1-8B")
    total = lambda dt: kv_cache.calculate_kv_cache_memory(s, seq_len=1000, batch_size=3, dtype=dt).total_bytes
    fp16 = 2 * 32 * 8 * 128 * 2 * 1000 * 3
    for dt in ("float16", "fp16", "bfloat16", "bf16", torch.float16, torch.bfloat16):
        assert total(dt) == fp16, dt
    for dt in ("float32", "fp32", torch.float32):
        assert total(dt) == 2 * fp16, dt
    for dt in ("fp8", "float8_e4m3fn", "int8", torch.float8_e4m3fn, torch.int8):
        assert total(dt) == fp16 // 2, dt


@pytest.mark.part(1)
@pytest.mark.points(3)
def test_seed_formula_overstates_gqa_models(kv_cache):
    """docs/references.md: a hidden_size-based formula overstates GQA models by heads / kv_heads."""
    expected_ratio = {"Llama-2-70B": 8, "Llama-3.1-8B": 4, "SmolLM2-135M": 3, "Llama-2-13B": 1, "Llama-2-7B": 1}
    for name, ratio in expected_ratio.items():
        s = shape(kv_cache, name)
        seed = kv_cache.seed_formula_kv_bytes(s, seq_len=4096, batch_size=2, dtype="float16")
        layers, hidden = CONFIGS[name][:2]
        assert seed == 2 * layers * hidden * 2 * 4096 * 2, name
        right = kv_cache.calculate_kv_cache_memory(s, seq_len=4096, batch_size=2, dtype="float16").total_bytes
        assert seed == ratio * right, name


@pytest.mark.part(1)
@pytest.mark.points(3)
def test_from_config_json(kv_cache, tmp_path):
    # Fields as in meta-llama/Llama-3.1-8B's config.json (other keys omitted).
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128,
           "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (tmp_path / "llama31").mkdir()
    (tmp_path / "llama31" / "config.json").write_text(json.dumps(cfg))
    for source in (tmp_path / "llama31", tmp_path / "llama31" / "config.json", str(tmp_path / "llama31"), cfg):
        s = kv_cache.ModelShape.from_config(source)
        assert kv_cache.calculate_kv_cache_memory(s, 1, dtype="bf16").bytes_per_token == 128 * KIB, "from_config: read num_key_value_heads and head_dim from config.json"
    # An older config without num_key_value_heads or head_dim means plain multi-head attention.
    old = {k: v for k, v in cfg.items() if k not in ("num_key_value_heads", "head_dim")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    s = kv_cache.ModelShape.from_config(tmp_path / "old.json")
    assert (s.num_kv_heads, s.head_dim) == (32, 128), "from_config: num_key_value_heads missing means one KV head per attention head; head_dim = hidden / heads"
    assert kv_cache.calculate_kv_cache_memory(s, 1, dtype="bf16").bytes_per_token == 512 * KIB, "from_config: the shape read from config.json gives the wrong KV bytes per token"


@pytest.mark.part(1)
@pytest.mark.points(1)
def test_num_parameters(kv_cache):
    # Published sizes: Llama-2-7B 6.74B, Llama-2-70B 68.98B, Llama-3.1-8B 8.03B, SmolLM2-135M 134.5M.
    published = {"Llama-2-7B": 6_738_415_616, "Llama-2-70B": 68_976_648_192,
                 "Llama-3.1-8B": 8_030_261_248, "SmolLM2-135M": 134_515_008}
    for name, count in published.items():
        assert llama_params(*CONFIGS[name]) == count, name
        assert shape(kv_cache, name).num_parameters() == count, name


def expected_fit(name: str, seq_len: int, weight_dtype_bytes: int, tp: int = 1, block: int = 16, util: float = 0.9):
    """(blocks, sequences) on one 80 GiB GPU, computed independently of the code under test."""
    layers, _, _, kv, hd, *_ = CONFIGS[name]
    budget = int(GPU_80GB * util) - math.ceil(llama_params(*CONFIGS[name]) * weight_dtype_bytes / tp)
    block_bytes = block * 2 * layers * (kv // tp) * hd * weight_dtype_bytes
    blocks = budget // block_bytes
    return blocks, blocks // -(-seq_len // block)


@pytest.mark.part(1)
@pytest.mark.points(4)
def test_max_concurrent_sequences_on_80gb(kv_cache):
    # Llama-2-7B fp16: 72 GiB budget - 12.55 GiB weights = 59.45 GiB of 8 MiB blocks -> 7609 blocks, 256 per 4k seq.
    s7 = shape(kv_cache, "Llama-2-7B")
    assert expected_fit("Llama-2-7B", 4096, 2) == (7609, 29), "the test's own reference calculation changed (course bug, not yours)"
    assert kv_cache.num_kv_blocks(s7, GPU_80GB, gpu_memory_utilization=0.9, block_size=16, dtype="float16") == 7609, "num_kv_blocks: (memory x utilization - weight bytes) // (block_size x KV bytes per token)"
    assert kv_cache.max_concurrent_sequences(s7, GPU_80GB, 4096, gpu_memory_utilization=0.9, dtype="float16") == 29, "max_concurrent_sequences = num_kv_blocks // ceil(seq_len / block_size)"
    # A sequence one token past a block boundary needs a whole extra block: 7609 // 3 = 2536, not 7609 // 2.
    assert kv_cache.max_concurrent_sequences(s7, GPU_80GB, 33, gpu_memory_utilization=0.9, dtype="float16") == 2536, (
        "a 33-token sequence needs ceil(33 / 16) = 3 blocks of 16: 7609 // 3 = 2536 sequences"
    )
    s31 = shape(kv_cache, "Llama-3.1-8B")
    assert kv_cache.max_concurrent_sequences(s31, GPU_80GB, 4096, dtype="bf16") == expected_fit("Llama-3.1-8B", 4096, 2)[1], "Llama-3.1-8B: GQA (8 KV heads) fits about four times the requests of Llama-2-7B"
    # Llama-2-70B cannot fit on one 80 GiB GPU in fp16; with TP=4 each GPU holds a quarter of weights and KV heads.
    s70 = shape(kv_cache, "Llama-2-70B")
    assert kv_cache.max_concurrent_sequences(s70, GPU_80GB, 4096, dtype="fp16", tensor_parallel_size=4) == \
        expected_fit("Llama-2-70B", 4096, 2, tp=4)[1]
    # Explicit weight bytes, activations and an fp8 cache.
    got = kv_cache.num_kv_blocks(s31, GPU_80GB, 0.5, 32, "bf16", kv_cache_dtype="fp8", weight_bytes=16 * GIB,
                                 activation_bytes=2 * GIB)
    assert got == (40 * GIB - 16 * GIB - 2 * GIB) // (32 * 2 * 32 * 8 * 128 * 1), "with weight_bytes and activation_bytes given, both come off the budget before dividing into blocks"


@pytest.mark.part(1)
@pytest.mark.points(4)
def test_prediction_matches_real_allocation(kv_cache):
    """The runtime's real cache tensors take exactly the predicted bytes (SmolLM2-135M shape)."""
    s = shape(kv_cache, "SmolLM2-135M")
    spec = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64)
    for dtype, num_blocks, block_size in ((torch.bfloat16, 12, 16), (torch.float32, 5, 32), (torch.bfloat16, 3, 1)):
        real = kv_cache_nbytes(allocate_kv_cache(spec, num_blocks, block_size, dtype))
        tokens = num_blocks * block_size
        assert kv_cache.calculate_kv_cache_memory(s, seq_len=tokens, dtype=dtype).total_bytes == real, "the prediction must equal the bytes servinglab.model.cache really allocates"
        assert kv_cache.calculate_kv_cache_memory(s, seq_len=block_size, batch_size=num_blocks, dtype=dtype).total_bytes == real, "blocks x block_size tokens must predict exactly the allocated bytes"
        # Given exactly that much memory for the cache, num_kv_blocks finds the same number of blocks.
        assert kv_cache.num_kv_blocks(s, real, 1.0, block_size, dtype, weight_bytes=0) == num_blocks, "memory that holds exactly num_blocks blocks must give num_blocks"
        assert kv_cache.num_kv_blocks(s, real - 1, 1.0, block_size, dtype, weight_bytes=0) == num_blocks - 1, "one byte less than num_blocks blocks must give num_blocks - 1 (round down)"
        # Sequences one token longer than a block need two blocks each (ceil, not floor).
        assert kv_cache.max_concurrent_sequences(s, real, block_size + 1, 1.0, block_size, dtype, weight_bytes=0) == num_blocks // 2, (
            f"a {block_size + 1}-token sequence occupies 2 blocks of {block_size}: {num_blocks} blocks hold {num_blocks // 2} of them"
        )
    # Default weight_bytes: SmolLM2-135M has 134,515,008 parameters (its embedding is tied to the LM head,
    # so counted once), 269,030,016 bytes in bf16. Memory for the weights plus 12 blocks gives 12 blocks.
    real = kv_cache_nbytes(allocate_kv_cache(spec, 12, 16, torch.bfloat16))
    assert kv_cache.num_kv_blocks(s, 134_515_008 * 2 + real, 1.0, 16, torch.bfloat16) == 12, (
        "weights + 12 blocks of memory must give 12 blocks: default weight_bytes = num_parameters() x 2 bytes, tied embeddings counted once"
    )
    # Tensor parallelism: each of 3 ranks holds 1 of SmolLM2's 3 KV heads and a third of the weights.
    one_head = kv_cache_nbytes(allocate_kv_cache(KVCacheSpec(num_layers=30, num_kv_heads=1, head_dim=64), 10, 16, torch.bfloat16))
    weights = 300_000_000
    assert kv_cache.num_kv_blocks(s, weights // 3 + one_head, 1.0, 16, torch.bfloat16, weight_bytes=weights, tensor_parallel_size=3) == 10, (
        "TP=3: a rank's memory = weight_bytes / 3 + its cache (1 KV head of 3) must give the blocks that cache holds"
    )


@pytest.mark.part(1)
@pytest.mark.points(3)
def test_bad_input_raises_value_error(kv_cache):
    s = shape(kv_cache, "Llama-3.1-8B")
    assert kv_cache.max_concurrent_sequences(s, GPU_80GB, 4096, dtype="bf16") > 0, "valid input must give a positive answer"  # good input works
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache.calculate_kv_cache_memory(s, seq_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        kv_cache.calculate_kv_cache_memory(s, seq_len=16, batch_size=-1)
    with pytest.raises(ValueError, match="dtype"):
        kv_cache.calculate_kv_cache_memory(s, seq_len=16, dtype="fp13")
    with pytest.raises(ValueError, match="num_kv_heads"):
        kv_cache.ModelShape(32, 4096, 32, 5, 128, 128256, 14336)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache.max_concurrent_sequences(s, GPU_80GB, 4096, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_cache.num_kv_blocks(s, GPU_80GB, gpu_memory_utilization=0)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        kv_cache.num_kv_blocks(s, GPU_80GB, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="block_size"):
        kv_cache.num_kv_blocks(s, GPU_80GB, block_size=0)
    # Llama-2-70B in fp16 (138 GB of weights) does not fit on one 80 GiB GPU.
    with pytest.raises(ValueError, match="gpu_memory_bytes"):
        kv_cache.max_concurrent_sequences(shape(kv_cache, "Llama-2-70B"), GPU_80GB, 4096, dtype="fp16")
