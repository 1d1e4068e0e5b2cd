"""The compiler versions the presets' plans were made with, and what a run has instead.

A plan's memory and kernels are those of the compiler that made it; another jax or libtpu can lay
the same step out differently. The `tpu`, `gpu` and `aot` extras pin these versions, every plan
records what compiled it, and the trainer warns at start-up when its own differ.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from pathlib import Path

# CUDA 12's ptxas (from PyPI) assembles the Triton kernels' PTX: XLA runs an executable, not a library.
PTXAS = "nvidia-cuda-nvcc-cu12"
# The distributions that compile a step, per platform, at the versions configs/train/ was planned with.
PLANNED_WITH = {"jax": "0.10.2", "jaxlib": "0.10.2", "libtpu": "0.0.42", "jax-cuda12-plugin": "0.10.2",
                PTXAS: "12.9.86"}
_PLATFORM_COMPILERS = {"tpu": ("libtpu",), "gpu": ("jax-cuda12-plugin", PTXAS)}


def installed() -> dict[str, str | None]:
    """The installed version of each distribution in PLANNED_WITH (None: not installed)."""
    versions = {}
    for name in PLANNED_WITH:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _matches(version: str | None, planned: str) -> bool:
    # libtpu's pin is a series (0.0.42.*): its post-releases compile alike.
    return version is not None and (version == planned or version.startswith(planned + "."))


def runtime_mismatch(platform: str) -> str | None:
    """One line naming what differs from the plans for a run on `platform`, or None."""
    family = "gpu" if platform in ("gpu", "cuda", "rocm") else platform
    names = ["jax", "jaxlib", *_PLATFORM_COMPILERS.get(family, ())]
    versions = installed()
    differ = [f"{name} {versions[name] or 'missing'} (planned with {PLANNED_WITH[name]})" for name in names
              if not _matches(versions[name], PLANNED_WITH[name])]
    if not differ:
        return None
    return (f"this run compiles with {', '.join(differ)}: per-chip memory and kernels may differ from the "
            f"preset headers' plans (install nextlong-jax[{family}] for the planned compilers)")


def put_planned_ptxas_first() -> Path | None:
    """XLA runs the first `ptxas` on PATH and only then looks in jax's CUDA directory, so a machine's own
    CUDA toolkit (13.0 here) would assemble the kernels that a `jax[cuda12]` run assembles with the pinned
    wheel's: put the wheel's first, for plans and runs alike. Returns its ptxas (None: not installed)."""
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    found = [Path(d) / "bin" for d in (spec.submodule_search_locations or []) if (Path(d) / "bin" / "ptxas").exists()] \
        if spec else []
    if not found:
        return None
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([str(found[0]), *(d for d in path if d != str(found[0]))])
    return found[0] / "ptxas"
