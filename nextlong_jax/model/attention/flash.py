"""The flash-attention step shared by blockwise and ring attention: one query block against one key block.

The forward folds a key block into an online softmax (running max, running sum, unnormalised
output); the backward recomputes the block's probabilities from the saved log-sum-exp instead of
storing them. Callers own the loops, where the indices and segments of a block come from, which
block pairs to skip, and how gradients are accumulated.

Layout: heads-major, K kv heads and G query heads per kv head (so GQA never repeats keys), with
queries pre-scaled by 1/sqrt(D) (`heads_major`). Each product is laid out as a plain [m, k] x [k, n]
matmul: the forward computes scores [.., G*bq, bk] from q and keys transposed (kT), the backward
computes TRANSPOSED scores [.., bk, G*bq] from k and queries transposed (qT), and so takes dV, dK
and dq^T without transposing any [bq, bk] tile. Measured on XLA:CPU at bench/model.py's shapes, the
transposes XLA otherwise inserts for dV = P^T dO and dK = dS^T Q cost a third of attention's time.

    q [B, K, G, L, D]  qT [B, K, D, G, L]  k, v [B, K, L, D]  kT [B, K, D, L]
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from nextlong_jax.model.attention.mask import MASK_VALUE, visible

F32 = jnp.float32


class State(NamedTuple):
    """Online-softmax state of a query block, float32."""

    m: jnp.ndarray  # running max of the scores [..., B, K, G, bq]
    l: jnp.ndarray  # running sum of exp(score - m) [..., B, K, G, bq]
    acc: jnp.ndarray  # running sum of exp(score - m) * v [..., B, K, G, bq, D]


class QueryBlock(NamedTuple):
    """What the backward pass needs of a query block: q, d_out [B, K, G, bq, D], their transposes
    [B, K, D, G, bq], and the log-sum-exp and softmax delta [B, K, G, bq]."""

    q: jnp.ndarray
    qT: jnp.ndarray
    d_out: jnp.ndarray
    d_outT: jnp.ndarray
    lse: jnp.ndarray
    delta: jnp.ndarray


def heads_major(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q [B, L, H, D], k/v [B, L, K, D] -> q [B, K, G, L, D] scaled by 1/sqrt(D), k and v [B, K, L, D]."""
    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    q = (q * d**-0.5).reshape(b, length, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def tokens_major(out: jnp.ndarray) -> jnp.ndarray:
    """[B, K, G, L, D] -> [B, L, K*G, D]: the inverse of `heads_major` for outputs."""
    b, kv_heads, groups, length, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, kv_heads * groups, d)


def query_transposed(x: jnp.ndarray) -> jnp.ndarray:
    """q or d_out [..., G, L, D] -> [..., D, G, L]."""
    return jnp.moveaxis(x, -1, -3)


def key_transposed(x: jnp.ndarray) -> jnp.ndarray:
    """k [..., L, D] -> [..., D, L]."""
    return jnp.swapaxes(x, -1, -2)


def block(x: jnp.ndarray, i, size: int, axis: int) -> jnp.ndarray:
    """Block i of `size` along `axis`; i may be traced."""
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def block_mask(q_index, k_index, q_segment, k_segment) -> jnp.ndarray:
    """Original token indices [bq], [bk] and segments [B, bq], [B, bk] -> bool [B, bq, bk]."""
    return visible(q_index, k_index, q_segment, k_segment)


def initial_state(stats_shape: tuple[int, ...], head_dim: int) -> State:
    """Nothing seen yet; stats_shape is [..., B, K, G, bq]."""
    m = jnp.full(stats_shape, MASK_VALUE, F32)
    return State(m, jnp.zeros_like(m), jnp.zeros((*stats_shape, head_dim), F32))


def by_visibility(mask: jnp.ndarray, update, skip):
    """update(mask) for a block pair with some keys hidden, update(None) when every key is visible
    (no masking work on the tile: most pairs below the diagonal), skip() when none is."""
    visibility = mask.any().astype(jnp.int32) + mask.all().astype(jnp.int32)
    return lax.switch(visibility, [skip, lambda: update(mask), lambda: update(None)])


def forward_update(state: State, q_blk, kT_blk, v_blk, mask) -> State:
    """Fold keys kT_blk [B, K, D, bk] and values v_blk [B, K, bk, D] into the state of query block
    q_blk [B, K, G, bq, D]; mask [B, bq, bk], or None when all are visible."""
    s = jnp.einsum("bkgqd,bkds->bkgqs", q_blk, kT_blk, preferred_element_type=F32)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    m_new = jnp.maximum(state.m, s.max(-1))
    # A row with nothing visible yet has m_new == MASK_VALUE, and exp(s - m_new) would count its
    # masked keys as exp(0); shifting such rows by 0 instead makes them exp(MASK_VALUE) = 0.
    p = jnp.exp(s - jnp.where(m_new == MASK_VALUE, 0.0, m_new)[..., None])
    alpha = jnp.exp(state.m - m_new)
    pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=F32)
    return State(m_new, alpha * state.l + p.sum(-1), alpha[..., None] * state.acc + pv)


def finalize(state: State) -> tuple[jnp.ndarray, jnp.ndarray]:
    """-> (output [..., B, K, G, bq, D] float32, log-sum-exp [..., B, K, G, bq]).

    Every query sees at least itself, so l > 0 once all its key blocks are folded in.
    """
    return state.acc / state.l[..., None], state.m + jnp.log(state.l)


def softmax_delta(d_out: jnp.ndarray, out: jnp.ndarray) -> jnp.ndarray:
    """delta_i = sum_d dO_i * O_i, the softmax-Jacobian correction: [..., D] -> [...] float32."""
    return jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)


def backward_update(qb: QueryBlock, k_blk, kT_blk, v_blk, mask):
    """Gradients of one block pair: -> (dq^T [B, K, D, G, bq], dk [B, K, bk, D], dv [B, K, bk, D]) float32.

    k_blk and v_blk [B, K, bk, D], kT_blk [B, K, D, bk], mask [B, bq, bk] or None when all are
    visible. dq comes transposed (a plain kT x dS^T product); callers accumulate it so and
    transpose once.
    """
    s_t = jnp.einsum("bksd,bkdgq->bksgq", k_blk, qb.qT, preferred_element_type=F32)
    if mask is not None:
        s_t = jnp.where(jnp.swapaxes(mask, 1, 2)[:, None, :, None], s_t, MASK_VALUE)  # [B, 1, bk, 1, bq]
    p_t = jnp.exp(s_t - qb.lse[:, :, None])  # lse is finite: every query sees itself
    dv = jnp.einsum("bksgq,bkgqd->bksd", p_t.astype(qb.d_out.dtype), qb.d_out, preferred_element_type=F32)
    dp_t = jnp.einsum("bksd,bkdgq->bksgq", v_blk, qb.d_outT, preferred_element_type=F32)
    ds_t = p_t * (dp_t - qb.delta[:, :, None])
    dk = jnp.einsum("bksgq,bkgqd->bksd", ds_t.astype(qb.q.dtype), qb.q, preferred_element_type=F32)
    dq_t = jnp.einsum("bkds,bksgq->bkdgq", kT_blk, ds_t.astype(kT_blk.dtype), preferred_element_type=F32)
    return dq_t, dk, dv
