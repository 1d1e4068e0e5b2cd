"""Device mesh and the one table mapping logical axis names to mesh axes.

Model code names array dimensions (`batch`, `embed`, ...); this table decides where they live.
Rules are tried in order and a mesh axis is used once per array, so `embed` is sharded over
`fsdp` and `sequence` on parameters (and the optimizer state, which follows them) but left whole
on activations, whose `batch` and `length` already took those axes. Sharding parameters over
`sequence` too is what lets a sequence-parallel run whose `sequence` axis covers a whole host
(fsdp=1) hold 1/8 of the state per device instead of all of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", ("fsdp", "sequence")),
    ("head_dim", None),
    ("layers", None),
)


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order; at most one may be -1 (takes the remaining devices)."""
    sizes = [data, fsdp, tensor, sequence]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"{num_devices} devices do not split into {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all). Over several TPU slices, `data` spans the slices, so only
    data-parallel gradient reduction crosses the slower network between them."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(len(devices), data, fsdp, tensor, sequence)
    # Auto axes: GSPMD propagates shardings from the logical constraints.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    # Axes follow the chips' physical torus where they can; where an axis size matches no product of
    # physical dimensions (sequence=2 on a 4x4x4 v4-128), a physical axis is split rather than refused.
    if slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    elif shape[0] % slices:
        raise ValueError(f"mesh data={shape[0]} must be a multiple of the {slices} slices it spans")
    else:
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1, 1), devices,
                                                    allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of `nn.Partitioned` leaves (e.g. `jax.eval_shape(model.init, ...)`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, names: tuple[str | None, ...]) -> NamedSharding:
    """Sharding for one array given its logical axis names (inputs, targets, ...)."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(names, LOGICAL_AXIS_RULES))


def mesh_axes(names: tuple[str | None, ...]) -> jax.sharding.PartitionSpec:
    """The mesh axes of logical `names` under the rules in force (`axis_rules`, which may leave an axis
    whole), or the table outside any."""
    return nn.logical_to_mesh_axes(names, nn.get_logical_axis_rules() or LOGICAL_AXIS_RULES)


def ambient_shards(name: str) -> tuple[str | None, int]:
    """(mesh axis, number of shards) of logical axis `name` on the ambient `jax.set_mesh` mesh.

    (axis, 1) when no mesh is set or the mesh lacks that axis: the dimension is then whole on each device.
    """
    (axis,) = mesh_axes((name,))
    mesh = jax.sharding.get_abstract_mesh()
    if axis is None or mesh.empty or axis not in mesh.axis_names:
        return axis, 1
    return axis, mesh.shape[axis]


def axis_rules(sharded_length: bool = True):
    """Context in which `nn.with_logical_constraint` inside the model uses this table; without
    `sharded_length` the `length` axis stays whole (a decode step's one token per row)."""
    rules = LOGICAL_AXIS_RULES if sharded_length else tuple(r for r in LOGICAL_AXIS_RULES if r[0] != "length")
    return nn.logical_axis_rules(rules)
