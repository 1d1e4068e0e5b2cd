"""cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs, fp16/bf16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nextlong_jax.model.attention.blocks import Blocks


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray | None, *,
                    blocks: Blocks = Blocks()) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] (GQA handled by the kernel) -> [B, L, H, D]; cuDNN tiles it
    (`blocks` unused).

    Without segments the kernel's own causal mask is used. With segments the public API only takes
    a dense mask, so document masking costs an [L, L] boolean (and jax's additive bias made from it)
    per sequence: the trainer refuses this backend at long lengths, where `pallas_gpu` takes the
    segment ids inside the kernel instead.
    """
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=same[:, None], is_causal=True, implementation="cudnn")
