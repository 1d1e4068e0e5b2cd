"""Next-token loss over the vocabulary in sequence blocks, never holding [L, vocab] logits.

Convention (the one place it is stated): `loss_weights[t]` weighs predicting `input_ids[t]` from
tokens before t, so the hidden state at t-1 is scored against `input_ids[t]`. A token whose segment
differs from its predecessor's (the first token of a packed document) or is padding (segment 0) is
never predicted, whatever its weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from nextlong_jax.sharding import ambient_shards, mesh_axes

# The name the vocabulary-block loop carries in compiled programs (plans check its body for collectives).
LOOP_SCOPE = "loss_vocab_blocks"


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
    gathers_head: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """hidden [B, L, E], head [E, V] -> (sum of weighted nll, sum of weights), float32 scalars.

    Returning the two sums (not their ratio) lets the trainer normalise over the global batch.
    """
    # Shift targets, not hidden: position t predicts t+1.
    targets, weights = next_token_targets(input_ids, loss_weights, segment_ids)
    return target_loss(hidden, head, targets, weights, block_size=block_size, gathers_head=gathers_head)[:2]


def target_loss(
    hidden: jnp.ndarray, head: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray, *, block_size: int = 1024,
    gathers_head: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Like `next_token_loss` but targets [B, L] and weights are already aligned with `hidden` (no shift).

    Returns (sum of weighted nll, sum of weights, nll [B, L] of every token whatever its weight). The
    per-token nll is for metrics and is not differentiated. Position-wise, so any token order works
    (the zig-zag order of ring attention in particular). `gathers_head`: see `Runtime.loss_gathers_head`.
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

    def from_blocks(x):  # [nb, B, S, block, ...] -> [B, L, ...]
        x = jnp.moveaxis(x, 0, 2).reshape(b, shards, local + pad, *x.shape[4:])[:, :, :local]
        return x.reshape(b, length, *x.shape[3:])

    h, t, w = to_blocks(hidden, ("embed",)), to_blocks(targets, ()), to_blocks(weights, ())
    nll_sum, nll = _blocked_nll(h, head, t, w, gathers_head)
    return nll_sum, jnp.sum(weights), lax.stop_gradient(from_blocks(nll))


def _block_logits(h, head):
    return jnp.einsum("bcte,ev->bctv", h, head, preferred_element_type=jnp.float32)


def _nll_of(logits, t):
    """logits [..., T, V], targets [..., T] -> (nll [..., T], log-sum-exp [..., T])."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_nll(h, head, t, w, gathers_head):
    """Blocks h [nb, B, S, T, E], t and w [nb, B, S, T] -> (sum of w * nll, nll [nb, B, S, T])."""
    return _per_device(_scan_nll, gathers_head)(h, head, t, w)


def _blocked_nll_fwd(h, head, t, w, gathers_head):
    total, nll, d_h, d_head = _per_device(_scan_nll_and_grads, gathers_head)(h, head, t, w)
    return (total, nll), (d_h, d_head.astype(head.dtype), nll)


def _blocked_nll_bwd(gathers_head, residuals, cotangents):
    d_h, d_head, nll = residuals
    g, _ = cotangents  # the per-token nll is returned under stop_gradient: its cotangent is zero
    return g.astype(d_h.dtype) * d_h, g.astype(d_head.dtype) * d_head, None, g * nll


_blocked_nll.defvjp(_blocked_nll_fwd, _blocked_nll_bwd)


@dataclasses.dataclass(frozen=True)
class _Collectives:
    """Where one device's loss meets the others': the mesh axes the head's embedding dimension is
    sharded over (`gather`), and those the tokens are (`tokens`, whose partial sums are added up)."""
    gather: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    per_block: bool = False  # no shard_map: XLA gathers the head, and reduce-scatters dHead, at every block

    def accumulator(self, d_head):
        # Sharded like the head, so XLA reduce-scatters each block's dHead rather than keep it whole.
        return nn.with_logical_constraint(d_head, ("embed", "vocab")) if self.per_block else d_head

    def head(self, head):
        """The whole head on every device, once per loss (not once per block)."""
        return lax.all_gather(head, self.gather, axis=0, tiled=True) if self.gather else head

    def total(self, x):
        return lax.psum(x, self.tokens) if self.tokens else x

    def head_grad(self, d_head):
        """This device's partial dHead [E, V] -> the sum over every token, in the head's own sharding: one
        reduce-scatter where the head's shards are token shards too (the presets: fsdp and sequence)."""
        summed = tuple(a for a in self.tokens if a not in self.gather)
        d_head = lax.psum(d_head, summed) if summed else d_head
        if not self.gather:
            return d_head
        if set(self.gather) <= set(self.tokens):
            return lax.psum_scatter(d_head, self.gather, scatter_dimension=0, tiled=True)
        d_head = lax.psum(d_head, tuple(a for a in self.gather if a in self.tokens))
        shard = d_head.shape[0] // lax.psum(1, self.gather)
        return lax.dynamic_slice_in_dim(d_head, lax.axis_index(self.gather) * shard, shard)


def _scan_nll(h, head, t, w, collectives=_Collectives()):
    head = collectives.head(head.astype(h.dtype))

    def step(total, xs):
        h, t, w = xs
        nll, _ = _nll_of(_block_logits(h, head), t)
        return total + jnp.sum(nll * w), nll

    with jax.named_scope(LOOP_SCOPE):
        total, nll = lax.scan(step, jnp.zeros((), jnp.float32), (h, t, w))
    return collectives.total(total), nll


def _scan_nll_and_grads(h, head, t, w, collectives=_Collectives()):
    # The gradient is formed here, one block of logits at a time, and only scaled in the backward
    # pass: three vocabulary projections per block instead of four for a rematerialised backward.
    # dHead accumulates this device's tokens in fp32 and is reduced once, after the last block. The head
    # arrives in the parameters' dtype and its gradient leaves in it: cast to bf16 and back, it would
    # round, and XLA's TPU pass that sinks a gradient accumulation's reduce-scatter out of its loop
    # fails on the convert pair (a RET_CHECK in while_loop_all_reduce_code_motion, 8B steps on v5p).
    full_head = collectives.head(head.astype(h.dtype))

    def step(carry, xs):
        total, d_head = carry
        h_blk, t_blk, w_blk = xs
        logits = _block_logits(h_blk, full_head)
        nll, lse = _nll_of(logits, t_blk)
        d_logits = jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(t_blk, full_head.shape[-1], dtype=jnp.float32)
        d_logits = (d_logits * w_blk[..., None]).astype(h_blk.dtype)
        d_h = jnp.einsum("bctv,ev->bcte", d_logits, full_head, preferred_element_type=jnp.float32)
        d_head = d_head + jnp.einsum("bcte,bctv->ev", h_blk, d_logits, preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * w_blk), collectives.accumulator(d_head)), (nll, d_h.astype(h_blk.dtype))

    zeros = (jnp.zeros((), jnp.float32), collectives.accumulator(jnp.zeros(full_head.shape, jnp.float32)))
    with jax.named_scope(LOOP_SCOPE):
        (total, d_head), (nll, d_h) = lax.scan(step, zeros, (h, t, w))
    return collectives.total(total), nll, d_h, collectives.head_grad(d_head)


def _per_device(scan, gathers_head: bool = True):
    """`scan` on each device's own blocks under `shard_map`, when a mesh is set: GSPMD would otherwise
    gather the fsdp-sharded head and reduce-scatter its gradient inside the loop, once per block (what
    `gathers_head` False asks for). Mesh axes the vocabulary is sharded over (`tensor`) stay automatic,
    so logits split over the vocabulary as the head does and XLA adds up their softmax."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return scan
    if not gathers_head:
        return functools.partial(scan, collectives=_Collectives(per_block=True))
    (vocab,) = mesh_axes(("vocab",))
    manual = tuple(a for a in mesh.axis_names if a not in _names(vocab))

    def spec(names, shape):
        """The mesh axes (manual ones only) of each dimension, as the rules in force place them."""
        dims = []
        for axis, size in zip(mesh_axes(names), shape):
            kept = tuple(a for a in _names(axis) if a in manual)
            dims.append(kept if kept and size % math.prod(mesh.shape[a] for a in kept) == 0 else None)
        return P(*dims)

    def run(h, head, t, w):
        blocks = spec((None, "batch", "length", None, "embed"), h.shape)
        tokens = spec((None, "batch", "length", None), t.shape)
        head_spec = spec(("embed", None), head.shape)
        collectives = _Collectives(gather=_names(head_spec[0]), tokens=tuple(a for d in tokens for a in _names(d)))
        outs = (P(), tokens) if scan is _scan_nll else (P(), tokens, blocks, head_spec)
        return jax.shard_map(functools.partial(scan, collectives=collectives), in_specs=(blocks, head_spec, tokens, tokens),
                             out_specs=outs, axis_names=set(manual), check_vma=False)(h, head, t, w)

    return run


def _names(axis) -> tuple[str, ...]:
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
