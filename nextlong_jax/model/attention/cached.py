"""Attention of one new token per row to a key/value cache: the decode step's attention.

The keys come in parts that live apart (the prompt's cache, sharded over `sequence` as the training
forward left it; the generated tokens' tail, whole on each device; the token itself), so the
softmax is combined across parts from each part's running max and sum, as flash-decoding combines
blocks; within the sharded part GSPMD splits the same reductions over the shards. Nothing is
concatenated, so the prompt's cache is never gathered or copied. Order within a part does not
matter (the prompt's cache may be in zig-zag order): a key counts where its segment matches.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from nextlong_jax.model.attention.mask import MASK_VALUE

F32 = jnp.float32


def cache_layout(x: jnp.ndarray) -> jnp.ndarray:
    """[B, T, K, D] keys or values as the cache holds them, [B, K, T, D]: each kv head's keys contiguous,
    so that a decode step reads them as one matrix (in the attention's layout, XLA on a CPU transposes the
    whole cache at every step: 4x slower at 2K tokens)."""
    return jnp.swapaxes(x, 1, 2)


class LayerCache(NamedTuple):
    """One layer's keys and values ([B, K, T, D] each, stacked [layers, ...] outside the layer scan):
    the prompt's, as prefill computed them, and the tail the generated tokens are written into."""

    k: jnp.ndarray
    v: jnp.ndarray
    tail_k: jnp.ndarray
    tail_v: jnp.ndarray

    def parts(self, k: jnp.ndarray, v: jnp.ndarray, seen: tuple[jnp.ndarray, jnp.ndarray]) -> list:
        """`cached_attention`'s parts for the new token's k/v [B, 1, K, D], given what each row sees
        (bool [B, T] of the prompt, [B, N] of the tail): prompt, tail, then the token itself."""
        itself = jnp.ones(k.shape[:2], bool)
        return [(self.k, self.v, seen[0]), (self.tail_k, self.tail_v, seen[1]),
                (cache_layout(k), cache_layout(v), itself)]


def cached_attention(q: jnp.ndarray, parts: list[tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]) -> jnp.ndarray:
    """q [B, 1, H, D]; parts of (k [B, K, T, D], v [B, K, T, D], visible bool [B, T]) -> [B, 1, H, D].

    Every row must see at least one key (the token itself is a part of its own), and unseen slots
    must hold finite values (their weight is exactly 0, but 0 * inf is not): prefill leaves padding
    finite and the tail starts as zeros.
    """
    b, _, h, d = q.shape
    kv_heads = parts[0][0].shape[1]
    qg = q.reshape(b, kv_heads, h // kv_heads, d)  # query heads grouped under their kv head
    scores = [jnp.where(seen[:, None, None, :],
                        jnp.einsum("bkgd,bktd->bkgt", qg, k, preferred_element_type=F32) * d**-0.5, MASK_VALUE)
              for k, _, seen in parts]
    top = jnp.max(jnp.stack([s.max(axis=-1) for s in scores]), axis=0)  # [B, K, G]
    weights = [jnp.exp(s - top[..., None]) for s in scores]
    total = sum(w.sum(axis=-1) for w in weights)
    out = sum(jnp.einsum("bkgt,bktd->bkgd", w.astype(v.dtype), v, preferred_element_type=F32)
              for w, (_, v, _) in zip(weights, parts))
    return (out / total[..., None]).reshape(b, 1, h, d).astype(q.dtype)
