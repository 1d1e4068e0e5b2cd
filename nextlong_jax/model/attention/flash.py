"""The flash-attention step shared by blockwise and ring attention: one query block against one key block.

The forward folds a key block into an online softmax (running max, running sum, unnormalised
output); the backward recomputes the block's probabilities from the saved log-sum-exp instead of
storing them. Callers own the loops, where the indices and segments of a block come from, which
block pairs to skip, and how gradients are accumulated.

Layouts: query blocks [B, bq, K, G, D] and key/value blocks [B, bk, K, D], as the projections give
them (K kv heads, G query heads per kv head, so GQA never repeats keys). Everything computed here
is in the order dot_general produces, [B, K, G, bq, ...] and [B, K, bk, D], so no dot needs its
output transposed.
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


def block(x: jnp.ndarray, i, size: int, axis: int) -> jnp.ndarray:
    """Block i of `size` along `axis`; i may be traced."""
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def block_mask(q_index, k_index, q_segment, k_segment) -> jnp.ndarray:
    """Original token indices [bq], [bk] and segments [B, bq], [B, bk] -> bool [B, 1, 1, bq, bk]."""
    return visible(q_index, k_index, q_segment, k_segment)[:, None, None]


def initial_state(stats_shape: tuple[int, ...], head_dim: int) -> State:
    """Nothing seen yet; stats_shape is [..., B, K, G, bq]."""
    m = jnp.full(stats_shape, MASK_VALUE, F32)
    return State(m, jnp.zeros_like(m), jnp.zeros((*stats_shape, head_dim), F32))


def scores(q_blk: jnp.ndarray, k_blk: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """[B, bq, K, G, D] x [B, bk, K, D] -> [B, K, G, bq, bk] float32, scaled by 1/sqrt(D) and masked."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=F32) * q_blk.shape[-1] ** -0.5
    return jnp.where(mask, s, MASK_VALUE)


def forward_update(state: State, q_blk, k_blk, v_blk, mask) -> State:
    """Fold key/value block [B, bk, K, D] into the state of query block [B, bq, K, G, D]."""
    s = scores(q_blk, k_blk, mask)
    m_new = jnp.maximum(state.m, s.max(-1))
    # Masked entries are zeroed, not left to exp(MASK_VALUE - m): a row with nothing visible yet has
    # m == MASK_VALUE, and exp(0) would count its masked keys.
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(state.m - m_new)
    pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=F32)
    return State(m_new, alpha * state.l + p.sum(-1), alpha[..., None] * state.acc + pv)


def finalize(state: State) -> tuple[jnp.ndarray, jnp.ndarray]:
    """-> (output [..., B, K, G, bq, D] float32, log-sum-exp [..., B, K, G, bq]).

    Every query sees at least itself, so l > 0 once all its key blocks are folded in.
    """
    return state.acc / state.l[..., None], state.m + jnp.log(state.l)


def softmax_delta(d_out: jnp.ndarray, out: jnp.ndarray) -> jnp.ndarray:
    """delta_i = sum_d dO_i * O_i, the softmax-Jacobian correction: [..., q, K, G, D] -> [..., K, G, q] float32."""
    return jnp.einsum("...qkgd,...qkgd->...kgq", d_out.astype(F32), out.astype(F32))


def backward_update(q_blk, k_blk, v_blk, do_blk, lse_blk, delta_blk, mask):
    """Gradients of one block pair: -> (dq [B, K, G, bq, D], dk [B, K, bk, D], dv [B, K, bk, D]) float32.

    q_blk and do_blk [B, bq, K, G, D], k_blk and v_blk [B, bk, K, D], lse_blk and delta_blk [B, K, G, bq].
    """
    s = scores(q_blk, k_blk, mask)
    p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
    dv = jnp.einsum("bkgqs,bqkgd->bksd", p.astype(do_blk.dtype), do_blk, preferred_element_type=F32)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=F32)
    ds = p * (dp - delta_blk[..., None]) * q_blk.shape[-1] ** -0.5
    dk = jnp.einsum("bkgqs,bqkgd->bksd", ds.astype(q_blk.dtype), q_blk, preferred_element_type=F32)
    dq = jnp.einsum("bkgqs,bskd->bkgqd", ds.astype(k_blk.dtype), k_blk, preferred_element_type=F32)
    return dq, dk, dv
