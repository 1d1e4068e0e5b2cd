"""The compiler versions the presets' plans were made with, and what a run has instead.

A plan's memory and kernels are those of the compiler that made it; another jax or libtpu can lay
the same step out differently. The `tpu`, `gpu` and `aot` extras pin these versions, every plan
records what compiled it, and the trainer warns at start-up when its own differ.
"""

from __future__ import annotations

from importlib import metadata

# The distributions that compile a step, per platform, at the versions configs/train/ was planned with.
PLANNED_WITH = {"jax": "0.10.2", "jaxlib": "0.10.2", "libtpu": "0.0.42", "jax-cuda12-plugin": "0.10.2"}
_PLATFORM_COMPILER = {"tpu": "libtpu", "gpu": "jax-cuda12-plugin"}


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
    names = ["jax", "jaxlib"] + ([_PLATFORM_COMPILER[family]] if family in _PLATFORM_COMPILER else [])
    versions = installed()
    differ = [f"{name} {versions[name] or 'missing'} (planned with {PLANNED_WITH[name]})" for name in names
              if not _matches(versions[name], PLANNED_WITH[name])]
    if not differ:
        return None
    return (f"this run compiles with {', '.join(differ)}: per-chip memory and kernels may differ from the "
            f"preset headers' plans (install nextlong-jax[{family}] for the planned compilers)")
