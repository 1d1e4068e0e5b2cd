"""Attention kernels under the ambient mesh: one call per device, on its shard of q, k, v and the
segment ids, in the layout the model's logical axes give them.

XLA cannot partition a Pallas (Mosaic or Triton) custom call: in a sharded `jit` the TPU compiler
refuses it, and the GPU compiler all-gathers the whole batch onto every device. `shard_map` hands
each device its own rows and heads instead. Attention needs nothing across either, and a query
head and its kv head live on the same `tensor` shard (both axes split into contiguous blocks).
Ring and splash attention add the sequence axis, and exchange across it themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nextlong_jax import load_balance
from nextlong_jax.sharding import LOGICAL_AXIS_RULES


def spec(*names: str | None) -> jax.sharding.PartitionSpec:
    return nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)


def on_each_device(local: Callable, mesh, *more_specs) -> Callable:
    """`local(q, k, v, segment_ids, *more)` on each device's shard: q [B, L, H, D], k/v [B, L, K, D] and
    segment_ids [B, L] as the model shards them, `more` as `more_specs` say; the output shards like q.

    check_vma is off: Pallas calls declare outputs without the per-axis variance it demands, and the
    ring's loop states start as constants (not device-varying), which would need an explicit pcast
    in every cond and scan carry; every value in `local` is per-device anyway.
    """
    q_spec = spec("batch", "length", "heads", "head_dim")
    kv_spec = spec("batch", "length", "kv_heads", "head_dim")
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", "length"), *more_specs),
                         out_specs=q_spec, check_vma=False)


def gather_sequence(axis: str, shards: int, *xs: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """Inside `on_each_device`, the length split over `axis` into `shards` in zig-zag order: each x
    [b, L/S, ...] (this device's rows) all-gathered into [b, L, ...] in original order, as a kernel that
    reads every key wants its keys, values and their segment ids."""
    return tuple(load_balance.unzigzag(lax.all_gather(x, axis, axis=1, tiled=True), shards) for x in xs)


def gather_sequence_summed_in(dtype, axis: str, shards: int, *xs: jnp.ndarray) -> tuple[jnp.ndarray, ...]:
    """`gather_sequence` of keys and values whose gradient is reduce-scattered back in `dtype`, and cast to
    each x's dtype only then: every device's keys see every device's queries, so each key's gradient is
    a sum of S partials, and in bf16 each step of that sum would round."""
    return tuple(_gather_summed_in(dtype, axis, shards, x) for x in xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _gather_summed_in(dtype, axis, shards, x):
    (x,) = gather_sequence(axis, shards, x)
    return x


def _gather_summed_in_fwd(dtype, axis, shards, x):
    return _gather_summed_in(dtype, axis, shards, x), None


def _gather_summed_in_bwd(dtype, axis, shards, _, g):
    # The cotangent has the gathered x's dtype and shape: this device's x is its [b, L/S, ...] share.
    mine = jax.ShapeDtypeStruct((g.shape[0], g.shape[1] // shards, *g.shape[2:]), dtype)
    (summed,) = jax.linear_transpose(lambda x: gather_sequence(axis, shards, x)[0], mine)(g.astype(dtype))
    return (summed.astype(g.dtype),)


_gather_summed_in.defvjp(_gather_summed_in_fwd, _gather_summed_in_bwd)


def per_device(kernel: Callable, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray
               ) -> jnp.ndarray:
    """kernel(q, k, v, segment_ids) on each device's shard; without a mesh, called directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    return on_each_device(kernel, mesh)(q, k, v, segment_ids)
