# Exercise stub generated from solutions/model_shape.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 1 (model shapes): the fields of a model's config.json that its memory depends on.

:class:`ModelShape` reads Hugging Face configs of several families (Llama, GPT-2, T5-style
names) and counts a Llama-family model's weights; :mod:`.kv_cache` turns a shape into
KV-cache bytes and pool sizes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int > 0, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


# The names each field goes by in config.json files of common model families, in lookup order.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "num_kv_heads": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "vocab_size": ("vocab_size",),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
}


@dataclass(frozen=True)
class ModelShape:
    """The published shape of a Llama-family decoder (the fields of its config.json)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size"):
            positive_int(field, getattr(self, field))
        if self.intermediate_size is not None:
            positive_int("intermediate_size", self.intermediate_size)
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_kv_heads "
                f"({self.num_kv_heads}): each KV head serves a whole group of query heads"
            )

    @classmethod
    def from_config(cls, source: str | Path | Mapping[str, Any] | Any, name: str = "") -> ModelShape:
        """Read a Hugging Face config: a config.json path, its folder, a dict or a ``PretrainedConfig``.

        Each field is looked up under the names the common families use (:data:`CONFIG_KEYS`):
        Llama's ``num_hidden_layers`` / ``hidden_size`` / ``num_attention_heads``, GPT-2's
        ``n_layer`` / ``n_embd`` / ``n_head``, T5-style ``num_layers`` / ``d_model`` /
        ``num_heads``. ``num_key_value_heads`` defaults to the head count (plain multi-head
        attention, as in configs written before GQA), ``head_dim`` to ``hidden // heads``,
        as transformers does. A config without a required field raises one ``ValueError``
        naming every missing field and the names that were looked for.
        """
        if isinstance(source, (str, Path)):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            cfg = json.loads(path.read_text())
            name = name or path.parent.name
        elif isinstance(source, Mapping):
            cfg = dict(source)
        else:
            cfg = source.to_dict() if hasattr(source, "to_dict") else dict(vars(source))

        def find(field: str) -> Any:
            return next((cfg[k] for k in CONFIG_KEYS[field] if cfg.get(k) is not None), None)

        required = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
        missing = [f"{f} (looked for {', '.join(CONFIG_KEYS[f])})" for f in required if find(f) is None]
        if missing:
            raise ValueError("config is missing " + "; ".join(missing))
        heads, hidden = find("num_attention_heads"), find("hidden_size")
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}); give head_dim")
            head_dim = hidden // heads
        # GPT-2 ties its LM head to the embedding unless told otherwise; Llama configs say so explicitly.
        tied = cfg.get("tie_word_embeddings", "n_embd" in cfg)
        return cls(
            num_layers=find("num_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=find("num_kv_heads") or heads,
            head_dim=head_dim,
            vocab_size=find("vocab_size"),
            intermediate_size=find("intermediate_size"),
            tie_word_embeddings=bool(tied),
            name=name or str(cfg.get("_name_or_path", "")),
        )

    def num_parameters(self) -> int:
        """Weights of a Llama-family model (no biases), e.g. 6,738,415,616 for Llama-2-7B.

        Embedding (vocab x hidden); per layer q and o projections (hidden x heads x head_dim
        each), k and v projections (hidden x kv_heads x head_dim each), a gated MLP of three
        hidden x intermediate matrices and two RMSNorm weights (hidden each); a final norm;
        an lm_head (vocab x hidden) unless it is tied to the embedding.
        """
        if self.intermediate_size is None:
            raise ValueError("intermediate_size is needed to count parameters (it is in config.json)")
        raise NotImplementedError("num_parameters: your code here")
