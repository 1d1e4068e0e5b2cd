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
from nextlong_jax.model.attention.blocks import Blocks

F32 = jnp.float32


def blockwise_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray, *, blocks: Blocks = Blocks()
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D], in query and key blocks of
    `blocks.q` tokens."""
    length = q.shape[1]
    block = min(blocks.q, length)
    pad = -length % block
    if pad:
        # Padding gets segment -1: a segment of its own, sliced off below.
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    out = _flash(*flash.heads_major(q, k, v), segment_ids.astype(jnp.int32), block)
    return flash.tokens_major(out)[:, :length].astype(q.dtype)


def _block_mask(segment_ids, i, j, block):
    """bool [B, bq, bk] for query block i against key block j."""
    index = jnp.arange(block)
    return flash.block_mask(i * block + index, j * block + index, flash.block(segment_ids, i, block, 1),
                            flash.block(segment_ids, j, block, 1))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, block):
    return _forward(q, k, v, segment_ids, block)[0]


def _forward(q, k, v, segment_ids, block):
    """Heads-major q [B, K, G, L, D], k/v [B, K, L, D] -> (out like q, lse [B, K, G, L])."""
    b, kv_heads, groups, length, d = q.shape
    num_blocks = length // block
    k_t = flash.key_transposed(k)

    def query_block(_, i):
        q_blk = flash.block(q, i, block, 3)

        def key_block(j, state):
            def update(mask):
                return flash.forward_update(state, q_blk, flash.block(k_t, j, block, 3), flash.block(v, j, block, 2),
                                            mask)

            return flash.by_visibility(_block_mask(segment_ids, i, j, block), update, lambda: state)

        init = flash.initial_state((b, kv_heads, groups, block), d)
        out, lse = flash.finalize(lax.fori_loop(0, i + 1, key_block, init))  # causal: key blocks 0..i only
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = lax.scan(query_block, None, jnp.arange(num_blocks))
    # out [nb, B, K, G, bq, D] -> [B, K, G, L, D]; lse [nb, B, K, G, bq] -> [B, K, G, L]
    out = jnp.moveaxis(out, 0, 3).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv_heads, groups, length)
    return out, lse


def _flash_fwd(q, k, v, segment_ids, block):
    out, lse = _forward(q, k, v, segment_ids, block)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    b, kv_heads, groups, length, d = q.shape
    num_blocks = length // block
    delta = flash.softmax_delta(d_out, out)  # [B, K, G, L]
    q_t, d_out_t, k_t = flash.query_transposed(q), flash.query_transposed(d_out), flash.key_transposed(k)

    def key_block(dq_t, j):
        k_blk, k_t_blk, v_blk = flash.block(k, j, block, 2), flash.block(k_t, j, block, 3), flash.block(v, j, block, 2)

        def query_block(i, carry):
            dq_t, dk, dv = carry

            def grads(mask):
                qb = flash.QueryBlock(flash.block(q, i, block, 3), flash.block(q_t, i, block, 4),
                                      flash.block(d_out, i, block, 3), flash.block(d_out_t, i, block, 4),
                                      flash.block(lse, i, block, 3), flash.block(delta, i, block, 3))
                return flash.backward_update(qb, k_blk, k_t_blk, v_blk, mask)

            zeros = (jnp.zeros((b, kv_heads, d, groups, block), F32),) + (jnp.zeros((b, kv_heads, block, d), F32),) * 2
            # The switch returns block contributions, not the updated carry: a branch returning the
            # whole dq buffer makes XLA copy it on every block pair.
            dq_blk, dk_blk, dv_blk = flash.by_visibility(_block_mask(segment_ids, i, j, block), grads, lambda: zeros)
            dq_t = lax.dynamic_update_slice_in_dim(dq_t, flash.block(dq_t, i, block, 4) + dq_blk, i * block, axis=4)
            return dq_t, dk + dk_blk, dv + dv_blk

        zeros = jnp.zeros((b, kv_heads, block, d), F32)
        dq_t, dk, dv = lax.fori_loop(j, num_blocks, query_block, (dq_t, zeros, zeros))  # causal: query blocks j..
        return dq_t, (dk, dv)

    dq_t0 = jnp.zeros((b, kv_heads, d, groups, length), F32)
    dq_t, (dk, dv) = lax.scan(key_block, dq_t0, jnp.arange(num_blocks))
    dq = jnp.moveaxis(dq_t, 2, 4).astype(q.dtype)  # [B, K, D, G, L] -> [B, K, G, L, D]
    # dk, dv [nb, B, K, bk, D] -> [B, K, L, D]
    dk, dv = (jnp.moveaxis(x, 0, 2).reshape(k.shape) for x in (dk, dv))
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
