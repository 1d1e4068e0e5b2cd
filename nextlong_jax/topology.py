"""Named accelerator topologies as compile-only devices, so a CPU machine can plan a TPU or GPU run.

Accepted names (case-insensitive; `FORMS` lists them from the chip table in `nextlong_jax.hardware`),
optionally prefixed by a count `Nx` (N slices of a TPU slice, N hosts of a GPU host):

- TPU slices as Google Cloud names them, `v5p-256`: the number counts TensorCores for chips with
  two (v4, v5p, tpu7x) and chips for the others (v5e, v6e); or libtpu's chip grid, `v5p:4x4x2`.
- GPU hosts, `h100-8` (GPUs per host), from the target descriptions in `nextlong_jax.gpu_targets`.

`compile_only_devices` needs jax to start on the CPU (`JAX_PLATFORMS=cpu`), so that concrete
arrays stay on the host while programs are compiled for the named chips: call
`prepare_environment()` before jax initialises.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from nextlong_jax.compilers import put_planned_ptxas_first
from nextlong_jax.hardware import CHIPS_BY_NAME, GPUS, TPUS, Chip


def _forms() -> str:
    """The accepted names, from the chip table: what the --topology help and its errors say."""
    counted_in_cores = [n for n in TPUS if CHIPS_BY_NAME[n].cores > 1]
    counted_in_chips = [n for n in TPUS if CHIPS_BY_NAME[n].cores == 1]
    return (f"a TPU slice {', '.join(f'{n}-N' for n in TPUS)} (N: TensorCores of {', '.join(counted_in_cores)}; "
            f"chips of {', '.join(counted_in_chips)}) or its chip grid such as v5p:4x4x2; a GPU host "
            f"{', '.join(f'{n}-N' for n in GPUS)} (N: GPUs); prefixed Nx for N slices or hosts, e.g. 2xv5p-256")


FORMS = _forms()


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
        return self.chip.platform

    @property
    def num_devices(self) -> int:
        return math.prod(self.grid) * self.count * self.chip.devices


def _tpu_grid(chip: Chip, chips: int) -> tuple[int, ...]:
    """The usual chip grid of a slice: 2x2x1 for 4 chips, then doubling the smallest dimension."""
    rank = chip.grid_rank
    if chips < 1 or chips & (chips - 1) or (rank == 3 and chips < 4):
        raise TopologyError(f"{chip.name} slices have a power-of-two number of chips{' (4 or more)' * (rank == 3)}, "
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
    tpus, gpus = "|".join(TPUS), "|".join(GPUS)
    if m := re.fullmatch(rf"({tpus}):(\d+(?:x\d+)+)", body):
        chip = CHIPS_BY_NAME[m[1]]
        grid = tuple(int(n) for n in m[2].split("x"))
        if len(grid) != chip.grid_rank or min(grid) < 1:
            raise TopologyError(f"topology {text!r}: {chip.name} grids have {chip.grid_rank} dimensions")
        return Topology(text, chip, grid, count)
    if m := re.fullmatch(rf"({tpus})-(\d+)", body):
        chip, cores = CHIPS_BY_NAME[m[1]], int(m[2])
        if cores % chip.cores:
            raise TopologyError(f"topology {text!r}: {chip.name} slice sizes count {chip.cores} per chip")
        try:
            return Topology(text, chip, _tpu_grid(chip, cores // chip.cores), count)
        except TopologyError as e:
            raise TopologyError(f"topology {text!r}: {e}") from None
    if m := re.fullmatch(rf"({gpus})-(\d+)", body):
        if int(m[2]) < 1:
            raise TopologyError(f"topology {text!r}: a host has at least one GPU")
        return Topology(text, CHIPS_BY_NAME[m[1]], (int(m[2]),), count)
    raise TopologyError(f"unknown topology {text!r} (accepted: {FORMS})")


def prepare_environment() -> None:
    """Run jax on the CPU with quiet accelerator plugins and the planned ptxas; call before any jax
    computation."""
    import jax

    # libtpu otherwise probes cloud metadata for the workers of a slice this machine is not part of.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # No TPU is opened, only the compiler: two compile-only runs at once (a test suite beside a
    # user's run, say) must not fail on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes; jax itself read it when imported
    jax.config.update("jax_platforms", "cpu")
    put_planned_ptxas_first()


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
