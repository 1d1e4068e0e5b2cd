"""Causal, document-masked, grouped-query attention: the backends' table lives in `backends`, the
one dispatch here.

`attention` runs a backend already resolved for the platform the program is compiled for
(`backends.resolve`: the trainer does it once, with its mesh's platform, so a plan compiled on a
CPU machine for a TPU slice gets the TPU kernel). Kernels are imported on first use.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from nextlong_jax.model.attention.backends import (ATTENTION_OUT, BACKENDS, RESIDUAL_NAMES, Backend, BackendError,
                                                   resolve)
from nextlong_jax.model.attention.blocks import Blocks

__all__ = ["ATTENTION_OUT", "RESIDUAL_NAMES", "Backend", "BackendError", "Blocks", "attention", "resolve"]


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    *,
    backend: Backend = Backend.BLOCKWISE,
    blocks: Blocks = Blocks(),
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] with K dividing H; segment_ids [B, L] (0 = padding) or None.

    A token attends to earlier-or-same tokens of its own segment. Scale is 1/sqrt(D).
    Returns [B, L, H, D] in q's dtype.

    Sequence-parallel backends shard the length over the ambient mesh's `sequence` axis and expect
    the sequence in `load_balance.reorder`'s zig-zag order; the others expect the original order.
    """
    backend = Backend(backend)
    if backend is Backend.AUTO:
        raise BackendError("attention_backend=auto must be resolved for a platform first (backends.resolve)")
    if segment_ids is None and backend is not Backend.CUDNN:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    spec = BACKENDS[backend]
    out = spec.load()(q, k, v, segment_ids, blocks=blocks)
    return out if spec.names_residuals else checkpoint_name(out, ATTENTION_OUT)
