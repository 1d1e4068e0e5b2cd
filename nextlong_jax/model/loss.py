"""Next-token loss over the vocabulary in sequence blocks, never holding [L, vocab] logits.

Convention (the one place it is stated): `loss_weights[t]` weighs predicting `input_ids[t]` from
tokens before t, so the hidden state at t-1 is scored against `input_ids[t]`. A token whose segment
differs from its predecessor's (the first token of a packed document) or is padding (segment 0) is
never predicted, whatever its weight.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nextlong_jax.sharding import ambient_shards


def next_token_targets(
    input_ids: jnp.ndarray, loss_weights: jnp.ndarray, segment_ids: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """[B, L] ids and segment ids, weights [..., B, L] -> (targets [B, L], target weights [..., B, L] float32).

    Position t gets target input_ids[t+1] and weight loss_weights[t+1] (zero across a segment boundary,
    into padding, and at the last position). Leading weight axes share one set of targets.
    """
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    weights = jnp.where(same_doc, loss_weights[..., 1:].astype(jnp.float32), 0.0)
    targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weights = jnp.pad(weights, ((0, 0),) * (weights.ndim - 1) + ((0, 1),))
    return targets, weights


def next_token_loss(
    hidden: jnp.ndarray,
    head: jnp.ndarray,
    input_ids: jnp.ndarray,
    loss_weights: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    block_size: int = 1024,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """hidden [B, L, E], head [E, V] -> (sum of weighted nll, sum of weights), float32 scalars.

    Returning the two sums (not their ratio) lets the trainer normalise over the global batch.
    """
    # Shift targets, not hidden: position t predicts t+1.
    targets, weights = next_token_targets(input_ids, loss_weights, segment_ids)
    return target_loss(hidden, head, targets, weights, block_size=block_size)


def target_loss(
    hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *, block_size: int = 1024
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Like `next_token_loss` but targets [B, L] and weights are already aligned with `hidden` (no shift).

    Position-wise, so any token order works (the zig-zag order of ring attention in particular).
    """
    b, length, e = hidden.shape
    weights = weights.astype(jnp.float32)
    # Blocks never straddle two shards of a sequence-sharded length: [B, S, local, ...] with S on the
    # `length` mesh axis, and the scan runs over blocks of `local`. Each device then scores only its
    # own tokens; a scan over blocks of the whole length would make every device gather the hidden
    # state and project all of it onto the vocabulary.
    axis, shards = ambient_shards("length")
    if length % shards:
        raise ValueError(f"length {length} does not split over the {shards} shards of mesh axis {axis!r}")
    local = length // shards
    block = min(block_size, local)
    pad = -local % block
    num_blocks = (local + pad) // block

    def to_blocks(x, names):  # [B, L, ...] -> [nb, B, S, block, ...]
        x = x.reshape(b, shards, local, *x.shape[2:])
        x = jnp.pad(x, ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 3))
        x = jnp.moveaxis(x.reshape(b, shards, num_blocks, block, *x.shape[3:]), 2, 0)
        return nn.with_logical_constraint(x, (None, "batch", "length", None, *names))

    # Rematerialised so the backward pass recomputes one block of logits at a time. (A custom VJP that
    # forms gradients in the forward pass saves that matmul but measured slower on CPU: the [E, V]
    # gradient carry and the scatter into d_logits cost more than the recompute.)
    @jax.checkpoint
    def block_nll(h, t, w):
        logits = jnp.einsum("bcte,ev->bctv", h, head, preferred_element_type=jnp.float32)
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * w)

    def step(total, xs):
        return total + block_nll(*xs), None

    xs = (to_blocks(hidden, ("embed",)), to_blocks(targets, ()), to_blocks(weights, ()))
    nll_sum, _ = lax.scan(step, jnp.zeros((), jnp.float32), xs)
    return nll_sum, jnp.sum(weights)
