"""Ring attention: sequence parallelism over the mesh axis that the logical name `length` maps to.

Each device of the sequence axis keeps its queries and passes its keys and values (with their
segment ids and original token indices) to the next device, S-1 times, folding every visiting
chunk into an online softmax. The causal mask compares ORIGINAL token indices, never local offsets,
so any order of the sequence works (zig-zag load balancing in particular, see
`nextlong_jax.load_balance`). Within a ring step the chunk pair is processed in blocks, and block
pairs with nothing visible are skipped at run time: that is where load balancing pays off.

Backward is a custom VJP: it recomputes scores from the saved log-sum-exp and sends the key/value
gradients around the ring with the keys and values, one extra hop bringing them home. The
per-block step, forward and backward, is `flash`'s, in its heads-major layout (K kv heads, G query
heads per kv head), so GQA never materialises repeated keys; heads sharded over `tensor` stay
local since a query head and its kv head live on the same shard. Keys travel transposed (kT), the
form both passes multiply by.

The mesh is the ambient one (`jax.set_mesh(mesh)`), which is also where the trainer's jit and the
model's sharding constraints get it, so no mesh has to be threaded through the model config.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from nextlong_jax import load_balance
from nextlong_jax.model.attention import flash
from nextlong_jax.model.attention.blocks import Blocks
from nextlong_jax.model.attention.blockwise import blockwise_attention
from nextlong_jax.model.attention.per_device import on_each_device, spec
from nextlong_jax.sharding import ambient_shards

F32 = jnp.float32


def ring_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    blocks: Blocks = Blocks(),
    token_index: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D], sharded like q, in blocks of
    at most `blocks.q` tokens.

    `token_index` [L] gives the original index of each position; None means the zig-zag order of
    `load_balance.reorder` for the ambient sequence axis size. Without a sequence axis (or size 1)
    this is `blockwise_attention`, for which the order must be the original one.
    """
    axis, shards = ambient_shards("length")
    if shards == 1:
        return blockwise_attention(q, k, v, segment_ids, blocks=blocks)
    length = q.shape[1]
    chunk = length // shards
    # At most half a local chunk: zig-zag chunks are two halves far apart, and a block straddling
    # both is never fully masked, so it could not be skipped.
    block = min(blocks.q, max(chunk // 2, 1))
    if length % shards or chunk % block:
        raise ValueError(f"ring attention needs length ({length}) / {shards} shards divisible by block {block}")
    if token_index is None:
        token_index = jnp.asarray(load_balance.token_index(length, shards))

    def local(q, k, v, segment_ids, token_index):
        q, k, v = flash.heads_major(q, k, v)  # this device's slice: heads may be split over `tensor`
        out = _ring(q, flash.key_transposed(k), v, segment_ids.astype(jnp.int32), token_index.astype(jnp.int32),
                    axis, shards, block)
        return flash.tokens_major(out).astype(v.dtype)

    return on_each_device(local, jax.sharding.get_abstract_mesh(), spec("length"))(q, k, v, segment_ids, token_index)


def _rotate(tree, axis: str, shards: int):
    """Send every leaf to the next device on the ring."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)


def _to_blocks(x: jnp.ndarray, axis: int, block: int) -> jnp.ndarray:
    """Split `axis` into (n, block) and move n to the front, ready to be scanned over."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _from_blocks(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Inverse of `_to_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def _key_block(kv, j, block: int):
    """Block j of a visiting (kT, v, segment_ids, token_index) chunk."""
    k_t, v, seg, index = kv
    return (flash.block(k_t, j, block, 3), flash.block(v, j, block, 2), flash.block(seg, j, block, 1),
            flash.block(index, j, block, 0))


def _loop(n: int, body, init):
    """`lax.fori_loop(0, n, body, init)` kept a while loop, which JAX's partial evaluation cannot split.

    A static-length fori_loop becomes a scan, and when the ring runs inside another scan (the layer
    stack) JAX hoists every part of it that depends only on loop-invariant inputs out of that scan:
    here the masks, which depend only on segment ids and token indices. That stacked a [bq, bk] mask
    per block pair per ring step (gigabytes at 32K tokens). In a while loop they stay per iteration.
    """
    def step(state):
        i, carry = state
        return i + 1, body(i, carry)

    return lax.while_loop(lambda state: state[0] < n, step, (jnp.zeros((), jnp.int32), init))[1]


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ring(q, k_t, v, segment_ids, token_index, axis, shards, block):
    """Heads-major q [B, K, G, Lq, D] (scaled), kT [B, K, D, Lc], v [B, K, Lc, D] -> out like q."""
    return _ring_fwd(q, k_t, v, segment_ids, token_index, axis, shards, block)[0]


def _attend(queries, kv, state: flash.State, block: int) -> flash.State:
    """Fold one visiting chunk into the online-softmax state of every local query block.

    queries: blocked (q [nq, B, K, G, bq, D], segment ids [nq, B, bq], token index [nq, bq]);
    state: `flash.State` of every query block, with a leading nq axis.
    """
    num_keys = kv[1].shape[2] // block

    def query_block(_, xs):
        q_blk, q_seg, q_index, state = xs

        def key_block(j, state):
            k_t_blk, v_blk, k_seg, k_index = _key_block(kv, j, block)
            return flash.by_visibility(flash.block_mask(q_index, k_index, q_seg, k_seg),
                                       lambda mask: flash.forward_update(state, q_blk, k_t_blk, v_blk, mask),
                                       lambda: state)

        return None, _loop(num_keys, key_block, state)

    _, state = lax.scan(query_block, None, (*queries, state))
    return state


def _ring_fwd(q, k_t, v, segment_ids, token_index, axis, shards, block):
    b, kv_heads, groups, _, d = q.shape
    queries = (_to_blocks(q, 3, block), _to_blocks(segment_ids, 1, block), _to_blocks(token_index, 0, block))
    state = flash.initial_state((queries[0].shape[0], b, kv_heads, groups, block), d)
    kv = (k_t, v, segment_ids, token_index)
    state = _attend(queries, kv, state, block)

    def step(carry, _):
        state, kv = carry
        kv = _rotate(kv, axis, shards)
        return (_attend(queries, kv, state, block), kv), None

    (state, _), _ = lax.scan(step, (state, kv), None, length=shards - 1)
    out_blocks, lse = flash.finalize(state)  # [nq, B, K, G, bq, D], [nq, B, K, G, bq]
    out_blocks = out_blocks.astype(q.dtype)
    return _from_blocks(out_blocks, 3), (queries, k_t, v, segment_ids, token_index, out_blocks, lse)


def _attend_bwd(queries, d_out, lse, delta, kv, dq_t, block: int):
    """Gradient contributions of one visiting chunk: dq^T [nq, B, K, D, G, bq] (local, accumulated), and
    dk, dv [nk, B, K, bk, D].

    Blocked like `_attend`; d_out like q blocks, lse and delta [nq, B, K, G, bq].
    """
    q, q_seg, q_index = queries
    num_q, num_keys = q.shape[0], kv[1].shape[2] // block
    b, kv_heads, _, _, d = q.shape[1:]
    q_t, d_out_t = flash.query_transposed(q), flash.query_transposed(d_out)

    def key_block(dq_t, j):
        k_t_blk, v_blk, k_seg, k_index = _key_block(kv, j, block)
        k_blk = flash.key_transposed(k_t_blk)

        def query_block(i, carry):
            dq_t, dk, dv = carry

            def grads(mask):
                qb = flash.QueryBlock(q[i], q_t[i], d_out[i], d_out_t[i], lse[i], delta[i])
                return flash.backward_update(qb, k_blk, k_t_blk, v_blk, mask)

            zeros = (jnp.zeros(dq_t.shape[1:], F32),) + (jnp.zeros((b, kv_heads, block, d), F32),) * 2
            # Contributions out of the switch, not the carry: see blockwise's backward.
            dq_blk, dk_blk, dv_blk = flash.by_visibility(flash.block_mask(q_index[i], k_index, q_seg[i], k_seg),
                                                         grads, lambda: zeros)
            return dq_t.at[i].add(dq_blk), dk + dk_blk, dv + dv_blk

        zeros = jnp.zeros((b, kv_heads, block, d), F32)
        dq_t, dk, dv = _loop(num_q, query_block, (dq_t, zeros, zeros))
        return dq_t, (dk, dv)

    return lax.scan(key_block, dq_t, jnp.arange(num_keys))


def _ring_bwd(axis, shards, block, residuals, d_out):
    queries, k_t, v, segment_ids, token_index, out_blocks, lse = residuals
    d_out = _to_blocks(d_out, 3, block)
    delta = flash.softmax_delta(d_out, out_blocks)  # [nq, B, K, G, bq]
    kv = (k_t, v, segment_ids, token_index)
    q = queries[0]
    dq_t = jnp.zeros(q.shape[:3] + (q.shape[-1], q.shape[3], block), F32)  # [nq, B, K, D, G, bq]
    dq_t, dkv = _attend_bwd(queries, d_out, lse, delta, kv, dq_t, block)

    def step(carry, _):
        dq_t, kv, dkv = carry
        kv, dkv = _rotate((kv, dkv), axis, shards)
        dq_t, step_dkv = _attend_bwd(queries, d_out, lse, delta, kv, dq_t, block)
        return (dq_t, kv, jax.tree.map(jnp.add, dkv, step_dkv)), None

    (dq_t, _, dkv), _ = lax.scan(step, (dq_t, kv, dkv), None, length=shards - 1)
    # After S-1 hops each chunk's gradient sits one device short of the chunk's owner.
    dk, dv = (_from_blocks(x, 2) for x in _rotate(dkv, axis, shards))  # [nk, B, K, bk, D] -> [B, K, Lc, D]
    dq = _from_blocks(jnp.moveaxis(dq_t, 3, 5), 3)  # [nq, B, K, D, G, bq] -> [B, K, G, Lq, D]
    return dq.astype(q.dtype), flash.key_transposed(dk).astype(k_t.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
