"""Accelerator chips as their makers publish them: dense bf16 peak (MFU's denominator) and HBM, and
how slices and hosts of them are named (`nextlong_jax.topology`). This table is the one list of chips.

Chips are recognised by `Device.device_kind` as the chip itself reports it, which is not always
its marketing name: a v5p says "TPU v5", a v5e "TPU v5 lite", a v6e "TPU v6 lite", an Ironwood "TPU7x". Compile-only
devices (`nextlong_jax.topology`) report the same kinds, so a plan made on a CPU machine and a run
on the real chip read the same row.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jax


@dataclass(frozen=True)
class Chip:
    """One jax device's share of an accelerator chip (the whole chip but for Ironwood, which jax
    sees as two devices, one per TensorCore die)."""

    name: str  # the name slice and host topologies use: v5p-64, h100-8
    kind: str  # regular expression matched in full against `Device.device_kind`
    bf16_flops: float  # dense, per device
    hbm_bytes: int  # published decimal gigabytes, per device
    platform: str  # "tpu" or "gpu"
    # What the runtime reports as the device's memory, where it differs from the published figure
    # (GPUs: CUDA's total, the `device_memory_size` of the target in `nextlong_jax.gpu_targets`).
    usable_bytes: int | None = None
    cores: int = 1  # TPU: TensorCores per chip, the unit of a slice name's number (a v5p-8 is 4 chips)
    grid_rank: int = 1  # TPU: dimensions of a slice's chip grid (the ICI torus or mesh)
    devices: int = 1  # jax devices per chip
    plannable: bool = True  # compile-only devices exist for it (GPUs: a target in `nextlong_jax.gpu_targets`)

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / 2**30

    @property
    def budget_gib(self) -> float:
        """Per-device memory a program may use: on a GPU, the share jax's allocator takes of what
        CUDA reports (`gpu_memory_fraction`); on a TPU, the published HBM."""
        usable = (self.usable_bytes or self.hbm_bytes) / 2**30
        return usable * gpu_memory_fraction() if self.platform == "gpu" else usable


GB = 10**9
CHIPS: tuple[Chip, ...] = (
    Chip("v4", r"TPU v4", 275e12, 32 * GB, "tpu", cores=2, grid_rank=3),
    Chip("v5p", r"TPU v5", 459e12, 95 * GB, "tpu", cores=2, grid_rank=3),
    Chip("v5e", r"TPU v5 lite", 197e12, 16 * GB, "tpu", cores=1, grid_rank=2),
    Chip("v6e", r"TPU v6 lite", 918e12, 32 * GB, "tpu", cores=1, grid_rank=2),
    # Ironwood: 2,307 TF bf16 and 192 GB per chip, seen by jax as one device per die
    Chip("tpu7x", r"TPU7x", 2307e12 / 2, 192 * GB // 2, "tpu", cores=2, grid_rank=3, devices=2),
    Chip("h100", r"NVIDIA H100.*", 989e12, 80 * GB, "gpu", usable_bytes=84942979072),
    Chip("h200", r"NVIDIA H200.*", 989e12, 141 * GB, "gpu", usable_bytes=151397597184),
    Chip("a100", r"NVIDIA A100.*80GB.*", 312e12, 80 * GB, "gpu", usable_bytes=85100068864),
    Chip("a100-40gb", r"NVIDIA A100.*", 312e12, 40 * GB, "gpu", plannable=False),
    Chip("b200", r"NVIDIA B200.*", 2250e12, 180 * GB, "gpu", usable_bytes=191514411008),
    Chip("l40s", r"NVIDIA L40S.*", 362e12, 48 * GB, "gpu", plannable=False),
)
CHIPS_BY_NAME = {chip.name: chip for chip in CHIPS}
# The chips `nextlong_jax.topology` names slices (TPUs) and hosts (GPUs) of.
TPUS = tuple(chip.name for chip in CHIPS if chip.platform == "tpu" and chip.plannable)
GPUS = tuple(chip.name for chip in CHIPS if chip.platform == "gpu" and chip.plannable)


def chip_of(device: jax.Device) -> Chip | None:
    """The first chip whose kind matches the device's; None for CPUs and unknown chips."""
    return next((chip for chip in CHIPS if re.fullmatch(chip.kind, device.device_kind)), None)


def published_bf16_peak(device: jax.Device) -> float | None:
    """FLOP/s for a known accelerator; None for CPUs and unknown chips."""
    chip = chip_of(device)
    return chip.bf16_flops if chip else None


# jax preallocates this share of a GPU's memory at start-up (its default is 0.75: a plan that fits
# 80 GB could run out at 59 GiB). The trainer and evaluator raise it, unless the user set it.
GPU_MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# The rest (~8 GiB of an H100): the CUDA context, cuDNN/cuBLAS workspaces, NCCL's and NVLS's buffers.
# NVIDIA's JAX-Toolbox ("Tips for high-performance LLMs with JAX and XLA") sets 0.8-0.9.
GPU_MEMORY_FRACTION = 0.90


def gpu_memory_fraction() -> float:
    return float(os.environ.get(GPU_MEMORY_FRACTION_ENV, GPU_MEMORY_FRACTION))


def claim_gpu_memory() -> None:
    """Set jax's GPU allocator share before its backend starts (a no-op where the user chose one)."""
    os.environ.setdefault(GPU_MEMORY_FRACTION_ENV, str(GPU_MEMORY_FRACTION))
