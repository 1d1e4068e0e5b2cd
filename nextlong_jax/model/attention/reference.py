"""Plain softmax attention: materialises [L, L] scores; the ground truth for tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nextlong_jax.model.attention.blocks import Blocks
from nextlong_jax.model.attention.mask import MASK_VALUE, visible


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *,
                        blocks: Blocks = Blocks()) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D]; all [L, L] scores at once
    (`blocks` unused)."""
    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, length, kv_heads, h // kv_heads, d)  # query heads grouped under their kv head
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * d**-0.5
    index = jnp.arange(length)
    mask = visible(index, index, segment_ids, segment_ids)[:, None, None]  # [B, 1, 1, L, L]
    p = jax.nn.softmax(jnp.where(mask, s, MASK_VALUE), axis=-1)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, length, h, d).astype(q.dtype)
