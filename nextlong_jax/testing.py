"""Tiny random-weight HF Llama models for parity tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import numpy as np

from nextlong_jax.hf_weights import hf_to_params
from nextlong_jax.model.config import LlamaConfig


def tiny_hf_dict(**overrides: Any) -> dict[str, Any]:
    base = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False)
    return {**base, **overrides}


def hf_model(hf_dict: dict[str, Any], seed: int = 0, std: float = 0.1):
    """A torch LlamaForCausalLM in fp32 eval mode, weights wide enough that logits are O(1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**hf_dict)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def params_from_hf(model, config: LlamaConfig) -> dict[str, Any]:
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    return hf_to_params(state.__getitem__, config)


def hf_logits(model, input_ids: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long)
        return model(torch.as_tensor(input_ids, dtype=torch.long), position_ids=pos).logits.float().numpy()
