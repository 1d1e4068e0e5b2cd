"""Causal, document-masked, grouped-query attention: one Enum of backends, one dispatch.

Backends live in sibling modules. Kernels bound to a platform (splash on TPU, Pallas Triton and
cuDNN on GPU) are chosen for the platform the program is COMPILED for, which `resolve_backend`
takes as an argument: the trainer passes its mesh's platform, so a plan compiled on a CPU machine
for a TPU slice gets the TPU kernel, and a TPU config run on a laptop falls back, with a warning,
to the pure-JAX backend that serves the same role.
"""

from __future__ import annotations

import enum
import logging
from functools import partial

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from nextlong_jax.model.attention import cudnn, pallas_gpu, splash
from nextlong_jax.model.attention.blocks import Blocks
from nextlong_jax.model.attention.blockwise import blockwise_attention
from nextlong_jax.model.attention.per_device import per_device
from nextlong_jax.model.attention.reference import reference_attention
from nextlong_jax.model.attention.ring import ring_attention

logger = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


class Backend(str, enum.Enum):
    REFERENCE = "reference"  # plain softmax over [L, L] scores: the tests' ground truth
    BLOCKWISE = "blockwise"  # flash-style pure JAX, any platform
    RING = "ring"  # blockwise passed around the `sequence` mesh axis, any platform
    SPLASH = "splash"  # Pallas TPU kernel; over a `sequence` axis, all-gather context parallelism
    PALLAS_GPU = "pallas_gpu"  # Pallas Triton flash attention with segment ids inside the kernel
    CUDNN = "cudnn"  # cuDNN fused attention; packed documents need a dense [L, L] mask


PLATFORM = {Backend.SPLASH: "tpu", Backend.PALLAS_GPU: "gpu", Backend.CUDNN: "gpu"}
SEQUENCE_PARALLEL = frozenset({Backend.RING, Backend.SPLASH})  # take a length sharded over `sequence`
DENSE_MASK = frozenset({Backend.REFERENCE, Backend.CUDNN})  # hold an [L, L] array per sequence

ATTENTION_OUT = "attention_out"
# Checkpoint names of what attention keeps for its backward pass (see `attention`): a remat policy
# saving them spares recomputing attention in the backward pass.
RESIDUAL_NAMES = (ATTENTION_OUT, splash.RESIDUAL_NAME)


def platform_family(platform: str) -> str:
    """jax names GPUs by their runtime ("cuda", "rocm"); backends only care that it is a GPU."""
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(name: str | Backend, platform: str, *, sequence_parallel: bool = False) -> Backend:
    """The backend that runs when compiling for `platform` ("cpu", "tpu", "gpu", "cuda").

    A kernel for another platform falls back (warning once) to ring when the length is sharded,
    else to blockwise.
    """
    try:
        backend = Backend(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(b.value for b in Backend)})") from None
    needed = PLATFORM.get(backend)
    if needed is None or needed == platform_family(platform):
        return backend
    fallback = Backend.RING if sequence_parallel else Backend.BLOCKWISE
    if (backend, platform) not in _warned:
        _warned.add((backend, platform))
        logger.warning("attention backend %r needs a %s, compiling for %s: falling back to %r",
                       backend.value, needed.upper(), platform, fallback.value)
    return fallback


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray | None = None,
    *,
    backend: str | Backend = Backend.BLOCKWISE,
    blocks: Blocks = Blocks(),
    token_index: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] with K dividing H; segment_ids [B, L] (0 = padding) or None.

    A token attends to earlier-or-same tokens of its own segment. Scale is 1/sqrt(D).
    Returns [B, L, H, D] in q's dtype. Runs `backend` as given: resolve it first.

    Sequence-parallel backends shard the length over the ambient mesh's `sequence` axis and expect
    the sequence in `load_balance.reorder`'s zig-zag order (ring: unless `token_index` [L], the
    original index of each position, says otherwise); the others expect the original order.
    """
    backend = Backend(backend)
    if segment_ids is None and backend != Backend.CUDNN:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    match backend:
        case Backend.REFERENCE:
            out = reference_attention(q, k, v, segment_ids)
        case Backend.BLOCKWISE:
            out = blockwise_attention(q, k, v, segment_ids, block_size=blocks.q)
        case Backend.RING:
            out = ring_attention(q, k, v, segment_ids, token_index, block_size=blocks.q)
        case Backend.SPLASH:
            # Names its own residuals: the output in its layout and the log-sum-exp, both needed by
            # its backward kernels, so saving the output alone would not spare the forward kernel.
            return splash.splash_attention(q, k, v, segment_ids, blocks=blocks)
        case Backend.PALLAS_GPU:
            kernel = partial(pallas_gpu.pallas_gpu_attention, block_q=blocks.q, block_k=blocks.kv)
            out = per_device(kernel, q, k, v, segment_ids)
        case Backend.CUDNN:
            out = cudnn.cudnn_attention(q, k, v, segment_ids)
    return checkpoint_name(out, ATTENTION_OUT)
