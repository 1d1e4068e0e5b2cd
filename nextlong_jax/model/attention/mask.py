"""The one attention mask every backend implements: causal, and only within a segment.

Segment id 0 marks padding; padding tokens form a segment of their own, so real tokens never see
them and every query row keeps at least itself (no empty softmax rows, no NaNs).
"""

from __future__ import annotations

import jax.numpy as jnp

# Finite, so fully masked score rows inside a block stay NaN-free in the online softmax.
MASK_VALUE = -1e30


def visible(q_index: jnp.ndarray, k_index: jnp.ndarray, q_segment: jnp.ndarray, k_segment: jnp.ndarray) -> jnp.ndarray:
    """q_index [Lq], k_index [Lk] token indices; segments [B, Lq], [B, Lk] -> bool [B, Lq, Lk]."""
    causal = k_index[None, :] <= q_index[:, None]
    return causal[None] & (q_segment[:, :, None] == k_segment[:, None, :])
