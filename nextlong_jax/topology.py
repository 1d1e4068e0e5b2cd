"""Named accelerator topologies as compile-only devices, so a CPU machine can plan a TPU or GPU run.

Accepted names (case-insensitive), optionally prefixed by a count `Nx` (N slices of a TPU slice,
N hosts of a GPU host):

- TPU slices as Google Cloud names them: `v4-128`, `v5p-256`, `tpu7x-64` (TensorCores: two per
  chip), `v5e-256`, `v6e-64` (chips); or libtpu's chip grid, `v5p:4x4x2`.
- GPU hosts: `h100-8`, `h200-8`, `a100-8`, `b200-8` (GPUs per host), from the target descriptions
  in `nextlong_jax.gpu_targets`.

`compile_only_devices` needs jax to start on the CPU (`JAX_PLATFORMS=cpu`), so that concrete
arrays stay on the host while programs are compiled for the named chips: call
`prepare_environment()` before jax initialises.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from nextlong_jax.hardware import CHIPS_BY_NAME, Chip

TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1, "tpu7x": 2}  # the unit of the slice name's number
TPU_GRID_RANK = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2, "tpu7x": 3}
DEVICES_PER_CHIP = {"tpu7x": 2}  # jax sees each Ironwood die as a device
GPU_CHIPS = ("h100", "h200", "a100", "b200")
FORMS = ("v4-128, v5p-256, v5e-256, v6e-64, tpu7x-64, v5p:4x4x2, h100-8, h200-8, a100-8, b200-8; "
         "a leading count such as 2xv5p-256 or 4xh100-8 for several slices or hosts")


class TopologyError(ValueError):
    """A topology name this module cannot read."""


@dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    grid: tuple[int, ...]  # TPU: chips per slice along each ICI dimension; GPU: (GPUs per host,)
    count: int = 1  # TPU slices, or GPU hosts

    @property
    def platform(self) -> str:
        return "gpu" if self.chip.name in GPU_CHIPS else "tpu"

    @property
    def num_devices(self) -> int:
        return math.prod(self.grid) * self.count * DEVICES_PER_CHIP.get(self.chip.name, 1)


def _tpu_grid(chip: str, chips: int) -> tuple[int, ...]:
    """The usual chip grid of a slice: 2x2x1 for 4 chips, then doubling the smallest dimension."""
    rank = TPU_GRID_RANK[chip]
    if chips < 1 or chips & (chips - 1) or (rank == 3 and chips < 4):
        raise TopologyError(f"{chip} slices have a power-of-two number of chips{' (4 or more)' * (rank == 3)}, "
                            f"not {chips}")
    grid = [2, 2, 1] if rank == 3 and chips == 4 else [1] * rank
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[len(grid) - 1 - grid[::-1].index(smallest)] *= 2
    return tuple(grid)


def parse_topology(text: str) -> Topology:
    name = text.strip().lower()
    count, body = 1, name
    if m := re.fullmatch(r"(\d+)x(.+)", name):
        count, body = int(m[1]), m[2]
    if count < 1:
        raise TopologyError(f"topology {text!r}: the count must be at least 1")
    if m := re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x):(\d+(?:x\d+)+)", body):
        grid = tuple(int(n) for n in m[2].split("x"))
        if len(grid) != TPU_GRID_RANK[m[1]] or min(grid) < 1:
            raise TopologyError(f"topology {text!r}: {m[1]} grids have {TPU_GRID_RANK[m[1]]} dimensions")
        return Topology(text, CHIPS_BY_NAME[m[1]], grid, count)
    if m := re.fullmatch(r"(v4|v5p|v5e|v6e|tpu7x)-(\d+)", body):
        cores = int(m[2])
        if cores % TPU_CORES_PER_CHIP[m[1]]:
            raise TopologyError(f"topology {text!r}: {m[1]} slice sizes count {TPU_CORES_PER_CHIP[m[1]]} per chip")
        try:
            return Topology(text, CHIPS_BY_NAME[m[1]], _tpu_grid(m[1], cores // TPU_CORES_PER_CHIP[m[1]]), count)
        except TopologyError as e:
            raise TopologyError(f"topology {text!r}: {e}") from None
    if m := re.fullmatch(rf"({'|'.join(GPU_CHIPS)})-(\d+)", body):
        if int(m[2]) < 1:
            raise TopologyError(f"topology {text!r}: a host has at least one GPU")
        return Topology(text, CHIPS_BY_NAME[m[1]], (int(m[2]),), count)
    raise TopologyError(f"unknown topology {text!r} (accepted: {FORMS})")


def prepare_environment() -> None:
    """Run jax on the CPU with quiet accelerator plugins; call before any jax computation."""
    import jax

    # libtpu otherwise probes cloud metadata for the workers of a slice this machine is not part of.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No TPU is opened, only the compiler: two compile-only runs at once (a test suite beside a
    # user's run, say) must not fail on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes; jax itself read it when imported
    jax.config.update("jax_platforms", "cpu")


def compile_only_devices(topology: Topology) -> list:
    """Devices that jax can compile for but not run on, in the topology's native order."""
    from jax.experimental import topologies

    if topology.platform == "gpu":
        from nextlong_jax.gpu_targets import compile_only_devices as gpu_devices

        return gpu_devices(topology.chip.name, hosts=topology.count, per_host=topology.grid[0])
    kwargs = {"num_slices": topology.count}
    if topology.chip.name == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as v4 pods run by default
    if math.prod(topology.grid) < 4:  # a slice smaller than libtpu's default 2x2 host is one host
        kwargs["chips_per_host_bounds"] = (*topology.grid, 1, 1)[:3]
    grid = "x".join(map(str, topology.grid))
    return list(topologies.get_topology_desc(platform="tpu", topology_name=f"{topology.chip.name}:{grid}",
                                             **kwargs).devices)
