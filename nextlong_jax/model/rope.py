"""Rotary position embedding with the Hugging Face scaling types, driven by explicit positions.

Positions are given per token (not implied by the index) so packed documents restart at 0.
Frequencies follow transformers' `modeling_rope_utils` formula for formula, in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nextlong_jax.model.config import LlamaConfig


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, factor: float, low: float, high: float, old_len: int) -> np.ndarray:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def static_inv_freq(config: LlamaConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies for every type whose frequencies do not depend on length."""
    inv_freq = _base_inv_freq(config.rope_theta, config.head_dim)
    scaling = config.rope_scaling
    if scaling is None or scaling.rope_type in ("default", "dynamic"):
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    return _llama3_inv_freq(inv_freq, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                            scaling.original_max_position_embeddings)


def _dynamic_inv_freq(config: LlamaConfig, positions: jnp.ndarray) -> jnp.ndarray:
    # HF's dynamic NTK grows the base once the longest position exceeds max_position_embeddings;
    # like HF, the length is max(positions) + 1 over the whole batch, computed in float32.
    dim, factor, max_len = config.head_dim, config.rope_scaling.factor, config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def rope_tables(config: LlamaConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """positions [B, L] int -> (cos, sin), each [B, L, head_dim] float32."""
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic":
        inv_freq = _dynamic_inv_freq(config, positions)
    else:
        inv_freq = jnp.asarray(static_inv_freq(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim // 2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [B, L, heads, head_dim]; the rotate-half convention of HF Llama checkpoints."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
