"""Graded tests for Part 9: Megatron-style tensor parallelism (Shoeybi et al. 2019).

The sharding tests are plain tensor math on tiny shapes. The forward tests start two
real gloo ranks on loopback (``servinglab.model.distributed.run_on_ranks``: spawned
processes, a free port, a timeout, the group always destroyed) and compare the
student's parallel pieces with the same computation done whole, in float32.

The decoder layer below is written out in plain torch (norm, fused qkv, RoPE,
grouped-query causal attention, o_proj, SwiGLU MLP): the same function runs once with
the full weights and ``F.linear`` for o_proj/down_proj, and once per rank with the
student's shards and ``row_parallel_linear``. Model shapes: docs/references.md, section 1
(each model's config.json, ``intermediate_size`` included); the split itself: Megatron-LM
(Shoeybi et al., arXiv 1909.08053, section 3), in docs/references.md too.

The two ranks are started once for the module (a fixture): each rank runs every check
and reports each result, or the error it raised, separately, so a stub that raises in
one function fails only the tests of that function. Each collective is pinned twice:
a hand-computed case (exact numbers a student can check on paper) and a comparison with
the same computation done whole.

Bugs these tests guard against, each caught by at least two of them
(``scripts/mutation_check.py`` plants them): a row-parallel layer without its
all-reduce, or with its bias added on every rank; a vocabulary-parallel embedding that
does not mask the ids outside its range; a distributed argmax that returns ids local to
a shard; a fused qkv matrix sharded as one block of rows instead of per q, k and v.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from servinglab import impl as impl_mod
from servinglab.model.distributed import run_on_ranks

pytestmark = pytest.mark.part(9)

TINY = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48, vocab_size=64)
SMOLLM2 = dict(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152)
LLAMA2_70B = dict(hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672, vocab_size=32000)


def full_state(shape: dict, layers: int = 2, tied: bool = False, bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random engine-style state dict (fused qkv_proj and gate_up_proj) of the given shape."""
    g = torch.Generator().manual_seed(seed)
    h, d, inter = shape["hidden_size"], shape["head_dim"], shape["intermediate_size"]
    qkv_rows = (shape["num_heads"] + 2 * shape["num_kv_heads"]) * d
    rnd = lambda *s: torch.randn(*s, generator=g) / (s[-1] ** 0.5 if len(s) > 1 else 10.0)
    sd = {"model.embed_tokens.weight": torch.randn(shape["vocab_size"], h, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        sd[p + "self_attn.qkv_proj.weight"] = rnd(qkv_rows, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, shape["num_heads"] * d)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        sd[p + "mlp.gate_up_proj.weight"] = rnd(2 * inter, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, inter)
        if bias:
            sd[p + "self_attn.qkv_proj.bias"] = rnd(qkv_rows)
            sd[p + "self_attn.o_proj.bias"] = rnd(h)
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    if not tied:
        sd["lm_head.weight"] = rnd(shape["vocab_size"], h)
    return sd


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE at positions 0..T-1 for ``x`` ``[T, heads, d]``."""
    t, _, d = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def layer_forward(x, sd, heads: int, kv_heads: int, head_dim: int, row_linear, prefix: str = "model.layers.0.") -> torch.Tensor:
    """One Llama decoder layer over one sequence ``x`` ``[T, hidden]`` with ``heads`` local heads."""
    t = x.shape[0]
    h = rms(x, sd[prefix + "input_layernorm.weight"])
    qkv = F.linear(h, sd[prefix + "self_attn.qkv_proj.weight"], sd.get(prefix + "self_attn.qkv_proj.bias"))
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = rope(q.view(t, heads, head_dim)), rope(k.view(t, kv_heads, head_dim))
    v = v.view(t, kv_heads, head_dim)
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    att = att.transpose(0, 1).reshape(t, heads * head_dim)
    x = x + row_linear(att, sd[prefix + "self_attn.o_proj.weight"], sd.get(prefix + "self_attn.o_proj.bias"))
    h = rms(x, sd[prefix + "post_attention_layernorm.weight"])
    gate, up = F.linear(h, sd[prefix + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
    return x + row_linear(F.silu(gate) * up, sd[prefix + "mlp.down_proj.weight"], None)


def plain_linear(x, w, b, group=None):
    return F.linear(x, w, b)


# ---------------------------------------------------------------- rank functions (run in spawned processes)
def _layer_rank(tp, rank: int, world: int) -> dict:
    shape = tp.TPShape(**TINY)
    sd = full_state(TINY, layers=1, bias=True)
    x = torch.randn(7, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    want = layer_forward(x, sd, 4, 2, 8, plain_linear)
    local = tp.shard_state_dict(sd, shape, rank, world)
    got = layer_forward(x, local, 4 // world, 2 // world, 8, tp.row_parallel_linear)
    return {"max_err": float((got - want).abs().max()), "shape": tuple(got.shape)}


def _vocab_rank(tp, rank: int, world: int) -> dict:
    vocab, hidden = TINY["vocab_size"], TINY["hidden_size"]
    g = torch.Generator().manual_seed(2)
    table = torch.randn(vocab, hidden, generator=g)
    ids = torch.tensor([0, 1, 31, 32, 33, 63, 5, 40])  # both halves, both edges of the split
    start = rank * vocab // world
    shard = table[start : start + vocab // world].clone()
    emb = tp.vocab_parallel_embedding(ids, shard, start)
    hidden_states = torch.randn(3, hidden, generator=g)
    full_logits = hidden_states @ table.T
    # Row 1: a tie between id 10 (rank 0) and id 40 (rank 1) at the row's maximum.
    full_logits[1, 10] = full_logits[1, 40] = full_logits[1].max() + 1.0
    local = full_logits[:, start : start + vocab // world].clone()
    gathered = tp.gather_logits(local)
    greedy = tp.distributed_argmax(local, start)
    return {
        "emb_exact": bool(torch.equal(emb, F.embedding(ids, table))),
        "emb_shape": tuple(emb.shape),
        "logits_exact": bool(gathered.shape == full_logits.shape and torch.equal(gathered, full_logits)),
        "logits_shape": tuple(gathered.shape),
        "greedy": greedy.tolist(),
        "want_greedy": full_logits.argmax(dim=-1).tolist(),
    }


def _hand_rank(tp, rank: int, world: int) -> dict:
    """Tiny cases worked out by hand for two ranks (see each test's comment)."""
    assert world == 2
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    w = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # [out=2, in=4]; rank r holds input columns 2r, 2r + 1
    cols = slice(2 * rank, 2 * rank + 2)
    row = tp.row_parallel_linear(x[:, cols], w[:, cols].clone(), torch.tensor([10.0, 20.0]))
    table = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # rank r holds ids 2r, 2r + 1
    emb = tp.vocab_parallel_embedding(torch.tensor([3, 0, 2]), table[2 * rank : 2 * rank + 2].clone(), 2 * rank)
    # Logits over a vocabulary of 4 for 2 tokens; rank r holds ids 2r, 2r + 1.
    logits = torch.tensor([[0.5, 2.0, 1.0, 3.0], [4.0, 1.0, 4.0, 0.0]])
    local = logits[:, 2 * rank : 2 * rank + 2].clone()
    return {"row": row.tolist(), "emb": emb.tolist(), "gathered": tp.gather_logits(local).tolist(),
            "greedy": tp.distributed_argmax(local, 2 * rank).tolist()}


def _all_checks_rank(rank: int, world: int, impl: str) -> dict:
    """Every rank-side check, each result or error reported on its own (runs in a spawned rank)."""
    tp = impl_mod.load_part("tensor_parallel", impl)
    out = {}
    for name, fn in (("hand", _hand_rank), ("layer", _layer_rank), ("vocab", _vocab_rank)):
        try:
            out[name] = fn(tp, rank, world)
        except Exception as exc:  # both ranks run the same code, so both fail at the same point
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """The checks' results on two real gloo ranks (started once for this module)."""
    return run_on_ranks(_all_checks_rank, 2, impl_mod.current_impl(), timeout_s=120)


def rank_results(two_ranks: list[dict], name: str) -> list[dict]:
    for r, res in enumerate(two_ranks):
        assert isinstance(res[name], dict), f"rank {r} raised: {res[name]}"
    return [res[name] for res in two_ranks]


# ---------------------------------------------------------------- sharding math
@pytest.mark.points(3)
def test_divisibility_errors_name_the_parameter(tensor_parallel):
    tp = tensor_parallel
    smol = tp.TPShape(**SMOLLM2)
    tp.check_tp_size(smol, 3)  # 9 heads, 3 KV heads, 1536, 49152: all divide by 3
    tp.check_tp_size(smol, 1)
    with pytest.raises(ValueError) as err:
        tp.check_tp_size(smol, 2)
    msg = str(err.value)
    assert "num_attention_heads" in msg and "9" in msg, f"TP=2 on SmolLM2 must say num_attention_heads (9) does not divide: {msg!r}"
    assert "[1, 3]" in msg, f"the message must list the sizes that work for SmolLM2 ([1, 3]): {msg!r}"
    big = tp.TPShape(**LLAMA2_70B)
    tp.check_tp_size(big, 4)
    tp.check_tp_size(big, 8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tp.check_tp_size(big, 16)  # 64 heads divide by 16, 8 KV heads do not
    with pytest.raises(ValueError, match="intermediate_size"):
        tp.check_tp_size(tp.TPShape(**{**TINY, "intermediate_size": 49}), 2)
    with pytest.raises(ValueError, match="vocab_size"):
        tp.check_tp_size(tp.TPShape(**{**TINY, "vocab_size": 65}), 2)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        tp.check_tp_size(smol, 0)


@pytest.mark.points(1)
def test_local_shape(tensor_parallel):
    tp = tensor_parallel
    local = tp.local_shape(tp.TPShape(**LLAMA2_70B), 4)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (16, 2, 7168, 8000), local
    assert (local.hidden_size, local.head_dim) == (8192, 128), "hidden_size and head_dim are never split"


@pytest.mark.points(2)
def test_column_and_row_shards(tensor_parallel):
    tp = tensor_parallel
    w = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)  # [out=6, in=8]
    assert tp.shard_range(12, 2, 3) == (8, 12)
    cols = [tp.column_shard(w, r, 2) for r in range(2)]
    rows = [tp.row_shard(w, r, 2) for r in range(2)]
    assert [tuple(c.shape) for c in cols] == [(3, 8)] * 2, "column-parallel shards split the output features (dim 0)"
    assert [tuple(r.shape) for r in rows] == [(6, 4)] * 2, "row-parallel shards split the input features (dim 1 of [out, in])"
    assert torch.equal(torch.cat(cols, 0), w) and torch.equal(torch.cat(rows, 1), w), "concatenated shards must give the matrix back"
    x = torch.randn(5, 8)
    partial = sum(F.linear(x[:, r * 4 : (r + 1) * 4], rows[r]) for r in range(2))
    assert torch.allclose(partial, F.linear(x, w), atol=1e-4), "sum over ranks of x_r @ W_r^T must equal x @ W^T"
    with pytest.raises(ValueError, match="rank"):
        tp.column_shard(w, 2, 2)


@pytest.mark.points(2)
def test_qkv_split_keeps_heads_whole(tensor_parallel):
    tp = tensor_parallel
    shape = tp.TPShape(**TINY)  # 4 heads, 2 KV heads, head_dim 8: q rows 0..31, k 32..47, v 48..63
    qkv = torch.arange(64, dtype=torch.float32)[:, None].expand(64, 3).clone()  # row i holds i
    shards = [tp.shard_qkv(qkv, shape, r, 2) for r in range(2)]
    want0 = list(range(0, 16)) + list(range(32, 40)) + list(range(48, 56))  # q heads 0-1, kv head 0 (k and v)
    want1 = list(range(16, 32)) + list(range(40, 48)) + list(range(56, 64))
    for r, want in enumerate((want0, want1)):
        got = shards[r][:, 0].long().tolist()
        assert got == want, f"rank {r}: qkv shard must be [its q heads | its k heads | its v heads]; rows {got} != {want}"
    q = torch.cat([s[:16] for s in shards]); k = torch.cat([s[16:24] for s in shards]); v = torch.cat([s[24:] for s in shards])
    assert torch.equal(torch.cat([q, k, v]), qkv), "the q, k and v parts of the shards must concatenate back to the fused matrix"
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tp.shard_qkv(torch.zeros((4 + 2 * 1) * 8, 32), tp.TPShape(**{**TINY, "num_kv_heads": 1}), 0, 2)


@pytest.mark.points(1)
def test_gate_up_split(tensor_parallel):
    tp = tensor_parallel
    shape = tp.TPShape(**TINY)  # intermediate 48: gate rows 0..47, up rows 48..95
    gu = torch.arange(96, dtype=torch.float32)[:, None].clone()
    got = [tp.shard_gate_up(gu, shape, r, 2)[:, 0].long().tolist() for r in range(2)]
    assert got[0] == list(range(0, 24)) + list(range(48, 72)), f"rank 0 must hold gate rows 0-23 and the same up rows, got {got[0]}"
    assert got[1] == list(range(24, 48)) + list(range(72, 96)), f"rank 1 must hold gate rows 24-47 and up rows 72-95, got {got[1]}"


@pytest.mark.points(2)
def test_shard_state_dict(tensor_parallel):
    tp = tensor_parallel
    shape = tp.TPShape(**TINY)
    sd = full_state(TINY, layers=2, bias=True)
    shards = [tp.shard_state_dict(sd, shape, r, 2) for r in range(2)]
    for r, local in enumerate(shards):
        assert set(local) == set(sd), f"rank {r}'s shard must keep every key"
        p = "model.layers.1."
        assert tuple(local[p + "self_attn.qkv_proj.weight"].shape) == ((2 + 2 * 1) * 8, 32)
        assert tuple(local[p + "self_attn.qkv_proj.bias"].shape) == ((2 + 2 * 1) * 8,)
        assert tuple(local[p + "self_attn.o_proj.weight"].shape) == (32, 16), "o_proj is row-parallel: [hidden, local heads * head_dim]"
        assert torch.equal(local[p + "self_attn.o_proj.bias"], sd[p + "self_attn.o_proj.bias"]), "a row-parallel bias stays whole"
        assert tuple(local[p + "mlp.gate_up_proj.weight"].shape) == (48, 32)
        assert tuple(local[p + "mlp.down_proj.weight"].shape) == (32, 24), "down_proj is row-parallel: [hidden, intermediate / k]"
        assert tuple(local["model.embed_tokens.weight"].shape) == (32, 32) and tuple(local["lm_head.weight"].shape) == (32, 32)
        assert torch.equal(local["model.norm.weight"], sd["model.norm.weight"]), "norms are replicated"
    assert torch.equal(torch.cat([s["lm_head.weight"] for s in shards]), sd["lm_head.weight"])
    replicated = sum(v.numel() for k, v in sd.items() if k.endswith(("norm.weight", "o_proj.bias", "down_proj.bias")))
    total = sum(v.numel() for v in sd.values())
    per_rank = [sum(v.numel() for v in s.values()) for s in shards]
    assert per_rank == [(total - replicated) // 2 + replicated] * 2, f"each rank holds 1/k of the weights plus the replicated ones: {per_rank}"
    with pytest.raises(ValueError, match="rotary"):
        tp.shard_state_dict({**sd, "model.rotary.weight": torch.zeros(3)}, shape, 0, 2)


# ---------------------------------------------------------------- real ranks
@pytest.mark.points(2)
def test_row_parallel_linear_by_hand(tensor_parallel, two_ranks):
    # x = [1, 2, 3, 4], W = [[1, 0, 0, 1], [0, 1, 1, 0]], bias [10, 20]: x W^T + b = [1 + 4, 2 + 3] + b = [15, 25].
    # Rank 0 holds columns 0-1 (partial [1, 2]), rank 1 columns 2-3 (partial [4, 3]); one all-reduce sums them.
    for r, res in enumerate(rank_results(two_ranks, "hand")):
        assert res["row"] == [[15.0, 25.0]], (
            f"rank {r}: row_parallel_linear gave {res['row']}, expected [[15, 25]] on every rank "
            "(partial products summed by an all-reduce, the bias added once after it)"
        )


@pytest.mark.points(2)
def test_vocab_parallel_embedding_and_argmax_by_hand(tensor_parallel, two_ranks):
    # Table rows [1, 10], [2, 20], [3, 30], [4, 40]; rank 0 holds ids 0-1, rank 1 ids 2-3. Ids [3, 0, 2]:
    # each rank zeroes the rows of ids outside its range, the all-reduce adds the two halves.
    # Logits [[0.5, 2, 1, 3], [4, 1, 4, 0]]: greedy ids 3 and 0 (a tie between ids 0 and 2 goes to the smaller).
    for r, res in enumerate(rank_results(two_ranks, "hand")):
        assert res["emb"] == [[4.0, 40.0], [1.0, 10.0], [3.0, 30.0]], (
            f"rank {r}: vocab_parallel_embedding gave {res['emb']}, expected rows 3, 0, 2 of the table "
            "(mask ids outside this rank's range to zero before the all-reduce)"
        )
        assert res["gathered"] == [[0.5, 2.0, 1.0, 3.0], [4.0, 1.0, 4.0, 0.0]], f"rank {r}: gather_logits gave {res['gathered']}"
        assert res["greedy"] == [3, 0], f"rank {r}: distributed_argmax gave {res['greedy']}, expected global ids [3, 0]"


@pytest.mark.points(5)
def test_parallel_layer_equals_the_whole_layer_on_two_gloo_ranks(tensor_parallel, two_ranks):
    for r, res in enumerate(rank_results(two_ranks, "layer")):
        assert res["shape"] == (7, TINY["hidden_size"]), f"rank {r}: the layer output must be the full [T, hidden], got {res['shape']}"
        assert res["max_err"] < 1e-5, (
            f"rank {r}: the 2-rank layer differs from the whole layer by {res['max_err']:.3g} in float32 "
            "(o_proj/down_proj need row shards and one all-reduce each, the bias added once, q/k/v split by whole heads)"
        )


@pytest.mark.points(4)
def test_vocab_parallel_embedding_and_logits_on_two_gloo_ranks(tensor_parallel, two_ranks):
    for r, res in enumerate(rank_results(two_ranks, "vocab")):
        assert res["emb_shape"] == (8, TINY["hidden_size"]), f"rank {r}: embedding shape {res['emb_shape']}"
        assert res["emb_exact"], f"rank {r}: vocab-parallel embedding must equal the whole table's lookup (mask, zero, all-reduce)"
        assert res["logits_shape"] == (3, TINY["vocab_size"]), f"rank {r}: gathered logits shape {res['logits_shape']}"
        assert res["logits_exact"], f"rank {r}: gathered logits must be the full rows in vocabulary order"
        assert res["greedy"] == res["want_greedy"], f"rank {r}: distributed argmax {res['greedy']} != argmax {res['want_greedy']} (ties: smallest id)"
