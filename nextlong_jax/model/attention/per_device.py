"""Run a single-device attention kernel under the ambient mesh: one call per device, on its batch
rows and heads.

XLA cannot partition a Pallas (Mosaic or Triton) custom call: in a sharded `jit` the TPU compiler
refuses it, and the GPU compiler all-gathers the whole batch onto every device. `shard_map` hands
each device its own rows and heads instead. Attention needs nothing across either, and a query
head and its kv head live on the same `tensor` shard (both axes split into contiguous blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextlong_jax.sharding import LOGICAL_AXIS_RULES


def spec(*names: str | None) -> jax.sharding.PartitionSpec:
    return nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES)


def per_device(kernel: Callable, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray
               ) -> jnp.ndarray:
    """kernel(q, k, v, segment_ids) on each device's shard; without a mesh, called directly."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    q_spec = spec("batch", "length", "heads", "head_dim")
    kv_spec = spec("batch", "length", "kv_heads", "head_dim")
    # check_vma off: Pallas calls declare outputs without device-varying axis information.
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, spec("batch", "length")),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)
