"""Causal, document-masked, grouped-query attention behind one function.

Backends live in sibling modules. One that cannot run on the current platform falls back to
`blockwise` with a logged warning, so a config written for a TPU or GPU still runs on a laptop.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from nextlong_jax.model.attention import cudnn, splash
from nextlong_jax.model.attention.blockwise import blockwise_attention
from nextlong_jax.model.attention.reference import reference_attention
from nextlong_jax.model.attention.ring import ring_attention

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def resolve_backend(backend: str) -> str:
    """The backend that will actually run here."""
    needs = {"cudnn": (cudnn.available, "a CUDA GPU"), "splash": (splash.available, "a TPU")}
    if backend in needs and not needs[backend][0]():
        if backend not in _warned:
            _warned.add(backend)
            logger.warning("attention backend %r needs %s; falling back to 'blockwise'", backend, needs[backend][1])
        return "blockwise"
    if backend not in ("reference", "blockwise", "cudnn", "splash", "ring"):
        raise ValueError(f"unknown attention backend {backend!r}")
    return backend


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    *,
    backend: str = "blockwise",
    block_size: int = 512,
    token_index: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] with K dividing H; segment_ids [B, L] (0 = padding) or None.

    A token attends to earlier-or-same tokens of its own segment. Scale is 1/sqrt(D).
    Returns [B, L, H, D] in q's dtype.

    "ring" shards the length over the ambient mesh's sequence axis and expects the sequence in
    `load_balance.reorder`'s zig-zag order unless `token_index` [L] (original index of each
    position) says otherwise; other backends expect the original order and ignore `token_index`.
    """
    backend = resolve_backend(backend)
    if backend == "cudnn":
        return cudnn.cudnn_attention(q, k, v, segment_ids)
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if backend == "splash":
        return splash.splash_attention(q, k, v, segment_ids)
    if backend == "reference":
        return reference_attention(q, k, v, segment_ids)
    if backend == "ring":
        return ring_attention(q, k, v, segment_ids, token_index, block_size=block_size)
    return blockwise_attention(q, k, v, segment_ids, block_size=block_size)
