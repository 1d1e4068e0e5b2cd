"""Pallas splash attention (TPU): causal mask, segment ids and GQA handled inside the kernel.

Runs per device; under a sharded mesh it belongs inside `shard_map` (done by the sequence-parallel
issue), which is why the kernel is built for the local shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def available() -> bool:
    return jax.default_backend() == "tpu"


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    groups = h // kv_heads
    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * groups)
    # One MQA kernel serves the G query heads that share a kv head; vmap over kv heads and batch.
    kernel = sa.make_splash_mqa(mask, head_shards=1, q_seq_shards=1)
    qg = (q * d**-0.5).reshape(b, length, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, D]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, L, D]

    def one(qg1, k1, v1, seg):  # [G, L, D], [L, D], [L, D], [L]
        return kernel(qg1, k1, v1, segment_ids=sa.SegmentIds(q=seg, kv=seg))

    per_kv_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_kv_head)(qg, kt, vt, segment_ids.astype(jnp.int32))  # [B, K, G, L, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, h, d)
