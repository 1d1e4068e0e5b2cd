"""Warm start: the parameters of a Hugging Face Llama directory, checked against the configured model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.train_setup import TrainError

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")


def hf_params(hf_dir: Path, model_config: LlamaConfig) -> Any:
    """Weights of an HF Llama directory; its architecture must equal the configured one (rope may differ)."""
    from nextlong_jax.convert import read_hf_config, read_hf_params

    hf = read_hf_config(hf_dir)
    diff = [f"{f}: config {getattr(model_config, f)} vs {hf_dir} {getattr(hf, f)}"
            for f in SHAPE_FIELDS if getattr(model_config, f) != getattr(hf, f)]
    if diff:
        raise TrainError("--init-from-hf architecture differs from the config (" + "; ".join(diff) + ")")
    params = read_hf_params(hf_dir, model_config)
    return jax.tree.map(lambda x: np.asarray(x, model_config.jnp_param_dtype), params)
