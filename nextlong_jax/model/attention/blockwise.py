"""Flash-style attention in plain JAX: online softmax over key blocks, O(L) memory.

Forward: for each query block, a loop over the key blocks at or before it (causal blocks above
the diagonal are never computed; blocks sharing no segment are skipped at run time). Backward is a
custom VJP that recomputes block scores from the saved log-sum-exp instead of storing [L, L]
probabilities. The per-block step, and its layouts, are `flash`'s.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from nextlong_jax.model.attention import flash

F32 = jnp.float32


def blockwise_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, block_size: int = 512
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D]."""
    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    block = min(block_size, length)
    pad = -length % block
    if pad:
        # Padding gets segment -1: a segment of its own, sliced off below.
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    qg = q.reshape(b, length + pad, kv_heads, h // kv_heads, d)
    out = _flash(qg, k, v, segment_ids.astype(jnp.int32), block)
    return out.reshape(b, length + pad, h, d)[:, :length]


def _block_mask(segment_ids, i, j, block):
    """bool [B, 1, 1, bq, bk] for query block i against key block j."""
    index = jnp.arange(block)
    return flash.block_mask(i * block + index, j * block + index, flash.block(segment_ids, i, block, 1),
                            flash.block(segment_ids, j, block, 1))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, block):
    return _forward(q, k, v, segment_ids, block)[0]


def _forward(q, k, v, segment_ids, block):
    b, length, kv_heads, groups, d = q.shape
    num_blocks = length // block

    def query_block(_, i):
        q_blk = flash.block(q, i, block, 1)

        def key_block(j, state):
            mask = _block_mask(segment_ids, i, j, block)

            def update(state):
                k_blk, v_blk = flash.block(k, j, block, 1), flash.block(v, j, block, 1)
                return flash.forward_update(state, q_blk, k_blk, v_blk, mask)

            return lax.cond(mask.any(), update, lambda state: state, state)

        init = flash.initial_state((b, kv_heads, groups, block), d)
        out, lse = flash.finalize(lax.fori_loop(0, i + 1, key_block, init))  # causal: key blocks 0..i only
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(num_blocks))
    # out [nb, B, K, G, bq, D] -> [B, L, K, G, D]; lse [nb, B, K, G, bq] -> [B, K, G, L]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, length, kv_heads, groups, d)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kv_heads, groups, length)
    return out, lse


def _flash_fwd(q, k, v, segment_ids, block):
    out, lse = _forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    b, length, kv_heads, groups, d = q.shape
    num_blocks = length // block
    delta = flash.softmax_delta(d_out, out)  # [B, K, G, L]

    def key_block(dq, j):
        k_blk, v_blk = flash.block(k, j, block, 1), flash.block(v, j, block, 1)

        def query_block(i, carry):
            mask = _block_mask(segment_ids, i, j, block)

            def update(carry):
                dq, dk, dv = carry
                dq_blk, dk_blk, dv_blk = flash.backward_update(
                    flash.block(q, i, block, 1), k_blk, v_blk, flash.block(d_out, i, block, 1),
                    flash.block(lse, i, block, 3), flash.block(delta, i, block, 3), mask)
                dq = lax.dynamic_update_slice_in_dim(dq, flash.block(dq, i, block, 3) + dq_blk, i * block, axis=3)
                return dq, dk + dk_blk, dv + dv_blk

            return lax.cond(mask.any(), update, lambda c: c, carry)

        zeros = jnp.zeros((b, kv_heads, block, d), F32)
        dq, dk, dv = lax.fori_loop(j, num_blocks, query_block, (dq, zeros, zeros))  # causal: query blocks j..
        return dq, (dk, dv)

    dq0 = jnp.zeros((b, kv_heads, groups, length, d), F32)
    dq, (dk, dv) = lax.scan(key_block, dq0, jnp.arange(num_blocks))
    dq = dq.transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [B, K, G, L, D] -> [B, L, K, G, D]
    # dk, dv [nb, B, K, bk, D] -> [B, L, K, D]
    dk, dv = (x.transpose(1, 0, 3, 2, 4).reshape(b, length, kv_heads, d) for x in (dk, dv))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
