"""The attention backends as one table, and the one place a configured backend becomes the one that runs.

Every kernel takes one signature (`Kernel`). Nothing here imports one at import time: each record
holds a function that imports its kernel on first use, so reading a config or a data pipeline never
loads Pallas. A backend is resolved once, when
the trainer (or a plan, or the evaluator) knows the platform it compiles for, and the model then
carries the `Backend` member, never a name to be looked up again.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from nextlong_jax.model.attention.blocks import Blocks

if TYPE_CHECKING:
    import jax.numpy as jnp

logger = logging.getLogger(__name__)

# A dense-mask backend's [L, L] mask and bias are 1 GiB per sequence at this length.
DENSE_MASK_MAX_LEN = 16384
# Checkpoint names of what attention keeps for its backward pass: a remat policy saving them spares
# recomputing attention there. The kernels name their own residuals (output and log-sum-exp, both
# needed by their backward kernels); the pure-JAX backends' output carries ATTENTION_OUT.
ATTENTION_OUT = "attention_out"
SPLASH_RESIDUALS = "splash_residuals"
PALLAS_GPU_RESIDUALS = "pallas_gpu_residuals"
RESIDUAL_NAMES = (ATTENTION_OUT, SPLASH_RESIDUALS, PALLAS_GPU_RESIDUALS)


class BackendError(ValueError):
    """A backend the configuration names cannot run where it is compiled for."""


class Backend(enum.StrEnum):  # str() and f-strings give the name users write
    AUTO = "auto"  # the platform's fastest: see `resolve`
    REFERENCE = "reference"  # plain softmax over [L, L] scores: the tests' ground truth
    BLOCKWISE = "blockwise"  # flash-style pure JAX, any platform
    RING = "ring"  # blockwise passed around the `sequence` mesh axis, any platform
    SPLASH = "splash"  # Pallas TPU kernel; over `sequence`, all-gather context parallelism
    PALLAS_GPU = "pallas_gpu"  # Pallas Triton kernel with segment ids; over `sequence`, all-gather
    CUDNN = "cudnn"  # cuDNN fused attention; packed documents need a dense [L, L] mask


class Kernel(Protocol):
    def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segment_ids: jnp.ndarray | None, *,
                 blocks: Blocks) -> jnp.ndarray:
        """q [B, L, H, D], k/v [B, L, K, D] (K divides H), segment_ids [B, L] (0 = padding) -> [B, L, H, D] in
        q's dtype, sharded like q; `blocks` tiles the kernels that tile (the Spec's `block_fields`)."""
        ...


def _reference() -> Kernel:
    from nextlong_jax.model.attention.reference import reference_attention
    return reference_attention


def _blockwise() -> Kernel:
    from nextlong_jax.model.attention.blockwise import blockwise_attention
    return blockwise_attention


def _ring() -> Kernel:
    from nextlong_jax.model.attention.ring import ring_attention
    return ring_attention


def _splash() -> Kernel:
    from nextlong_jax.model.attention.splash import splash_attention
    return splash_attention


def _pallas_gpu() -> Kernel:
    from nextlong_jax.model.attention.pallas_gpu import pallas_gpu_attention
    return pallas_gpu_attention


def _cudnn() -> Kernel:
    from nextlong_jax.model.attention.cudnn import cudnn_attention
    return cudnn_attention


def _as_configured(blocks: Blocks) -> Blocks:
    return blocks


def _pallas_gpu_tiles(blocks: Blocks) -> Blocks:
    from nextlong_jax.model.attention.pallas_gpu import kernel_blocks
    return kernel_blocks(blocks)


@dataclass(frozen=True)
class Spec:
    platforms: frozenset[str]  # platform families it compiles for ("cpu", "tpu", "gpu")
    sequence_parallel: bool  # takes a length sharded over the `sequence` mesh axis
    dense_mask: bool  # holds an [L, L] mask per sequence (refused above DENSE_MASK_MAX_LEN)
    block_fields: tuple[str, ...]  # the `Blocks` fields it reads
    load: Callable[[], Kernel]  # imports the kernel
    names_residuals: bool = False  # checkpoint-names what it keeps (else its output is ATTENTION_OUT)
    tiles: Callable[[Blocks], Blocks] = _as_configured  # the tiles it runs for configured blocks (plans report them)


_ANY = frozenset({"cpu", "tpu", "gpu"})
BACKENDS: dict[Backend, Spec] = {
    Backend.REFERENCE: Spec(_ANY, False, True, (), _reference),
    Backend.BLOCKWISE: Spec(_ANY, False, False, ("q",), _blockwise),
    Backend.RING: Spec(_ANY, True, False, ("q",), _ring),
    Backend.SPLASH: Spec(frozenset({"tpu"}), True, False,
                         ("q", "kv", "q_bwd", "kv_bwd", "fused_bwd", "kv_compute", "kv_bwd_compute"), _splash,
                         names_residuals=True),
    Backend.PALLAS_GPU: Spec(frozenset({"gpu"}), True, False, ("q", "kv", "q_bwd", "kv_bwd"), _pallas_gpu,
                             names_residuals=True, tiles=_pallas_gpu_tiles),
    Backend.CUDNN: Spec(frozenset({"gpu"}), False, True, (), _cudnn),
}
# What `auto` runs, per platform family: (unsharded length, length sharded over `sequence`).
AUTO = {"tpu": (Backend.SPLASH, Backend.SPLASH), "gpu": (Backend.PALLAS_GPU, Backend.PALLAS_GPU),
        "cpu": (Backend.BLOCKWISE, Backend.RING)}


def platform_family(platform: str) -> str:
    """jax names GPUs by their runtime ("cuda", "rocm"); backends only care that it is a GPU."""
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def parse(name: str | Backend) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise BackendError(f"unknown attention backend {name!r} (known: {', '.join(b.value for b in Backend)})") from None


def _names(backends) -> str:
    return ", ".join(b.value for b in backends)


def require_sequence_parallel(backend: Backend, sequence_shards: int) -> None:
    """Refuse a backend that would run single-device attention on a sharded (zig-zag) length."""
    if sequence_shards > 1 and not (backend is Backend.AUTO or BACKENDS[backend].sequence_parallel):
        raise BackendError(f"mesh.sequence={sequence_shards} needs a backend that takes a sharded length "
                           f"({_names(b for b, s in BACKENDS.items() if s.sequence_parallel)} or auto), "
                           f"not runtime.attention_backend={backend.value}")


def resolve(name: str | Backend, platform: str, *, sequence_shards: int = 1, length: int = 0,
            allow_fallback: bool = False) -> Backend:
    """The backend that runs when compiling for `platform` ("cpu", "tpu", "gpu", "cuda", ...).

    `auto` is the platform's choice (`AUTO`). A named backend runs as named, or is refused in one
    line when the platform cannot compile it, the length is sharded over `sequence_shards` > 1 and
    it cannot take that, or it holds a dense mask over more than DENSE_MASK_MAX_LEN tokens.
    `allow_fallback` turns the platform refusal into a warning and runs `auto`'s choice instead.
    """
    family = platform_family(platform)
    sharded = sequence_shards > 1
    backend = parse(name)
    choice = AUTO.get(family, AUTO["cpu"])[sharded]
    if backend is Backend.AUTO:
        return choice
    spec = BACKENDS[backend]
    if family not in spec.platforms:
        runs_here = _names(b for b, s in BACKENDS.items() if family in s.platforms)
        message = (f"runtime.attention_backend={backend.value} runs on {'/'.join(sorted(spec.platforms))}, but this "
                   f"program is compiled for {family}: use auto ({choice.value} here) or one of {runs_here}")
        if not allow_fallback:
            raise BackendError(message + " (runtime.attention_allow_fallback=true runs auto's choice instead)")
        logger.warning("%s; running %s (attention_allow_fallback)", message, choice.value)
        return choice
    require_sequence_parallel(backend, sequence_shards)
    if spec.dense_mask and length > DENSE_MASK_MAX_LEN:
        gib = length**2 * 5 / 2**30  # bool mask + f32 bias per row
        raise BackendError(f"runtime.attention_backend={backend.value} builds an [L, L] mask for packed documents "
                           f"(~{gib:.0f} GiB per sequence at {length} tokens); above {DENSE_MASK_MAX_LEN} tokens "
                           f"use auto or one of {_names(b for b, s in BACKENDS.items() if not s.dense_mask)}")
    return backend
