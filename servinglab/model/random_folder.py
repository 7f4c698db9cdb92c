"""A tiny random-weight model folder with a byte-level tokenizer, for serving tests and router benchmarks.

Tests and benchmarks of the server and the router are about HTTP, streaming, timeouts and
failover, not about the text: a 2-layer Llama with random weights serves in milliseconds a
step, starts in seconds and needs no prepared model. The folder has what ``servinglab
serve`` loads from any checkpoint (``config.json``, ``model.safetensors``, a tokenizer);
the tokenizer maps each UTF-8 byte to one token (GPT-2's byte alphabet, no merges), so any
text round-trips exactly and a prompt of N bytes is N tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1 (bos), 2 (eos), as the tiny config says


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte after the three special tokens: vocabulary of 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_serving_config(**overrides: object) -> LlamaConfig:
    """The tiny test Llama (``weights.tiny_llama_config``) sized to :func:`byte_tokenizer`."""
    from servinglab.model.weights import tiny_llama_config

    return tiny_llama_config(vocab_size=len(SPECIAL_TOKENS) + 256, **overrides)


def write_random_model(folder: str | Path, seed: int = 0, **overrides: object) -> Path:
    """Write a tiny random Llama (Hugging Face names) and the byte tokenizer into ``folder``; return it."""
    import torch
    from safetensors.torch import save_file

    from servinglab.model.weights import fused_to_hf, random_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_serving_config(**overrides)
    state = fused_to_hf(random_model(config, dtype=torch.float32, seed=seed).state_dict(), config)
    state.pop("lm_head.weight", None)  # tied to the embedding: the loader re-ties it
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
