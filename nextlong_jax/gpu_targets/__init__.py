"""Compile-only NVIDIA GPU devices, so GPU programs can be lowered and compiled on a CPU machine.

Each `<gpu>.txtpb` beside this file, one per GPU of `nextlong_jax.hardware.GPUS`, is an XLA
`GpuTargetConfigProto` taken from openxla/xla (see its header for the source commit and what was
dropped to suit the installed XLA). With the `jax-cuda12-plugin` installed, jax builds devices from
it that `jax.jit(...).lower(...).compile()` accepts, with no GPU or CUDA driver present. Run with `JAX_PLATFORMS=cpu` so concrete arrays stay on
the CPU; the returned devices report platform "gpu" and the GPU's marketing name as `device_kind`.
"""

from __future__ import annotations

from importlib import resources

import jax

from nextlong_jax.hardware import GPUS


def target_config(gpu: str) -> str:
    """The text proto for `gpu` (one of `GPUS`)."""
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(GPUS)}")
    return resources.files(__package__).joinpath(f"{gpu}.txtpb").read_text()


def compile_only_devices(gpu: str, hosts: int = 1, per_host: int = 8) -> list[jax.Device]:
    """`hosts * per_host` compile-only devices of one GPU model (process_index = host).

    Nothing can run on them; use them for a `Mesh`, then lower and compile with ShapeDtypeStructs.
    """
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{per_host}", target_config=target_config(gpu))
    return list(topology.devices)
