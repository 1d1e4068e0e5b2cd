"""Pallas Triton flash attention (NVIDIA GPUs): causal mask and packed documents inside the kernel.

cuDNN through `jax.nn.dot_product_attention` only takes document boundaries as a dense [L, L] mask.
Here the segment ids [B, L] go into the kernel, which compares them tile by tile, so no [L, L]
array exists in either pass and memory stays linear in L.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Segment id for positions added to reach a whole number of blocks. They come last, so causality
# already hides them from real tokens; an id no real token has (>= 0) keeps them out of any document.
_PAD_SEGMENT = -1
# Largest forward tile whose blocks of q, k and v fit a GPU's shared memory at head_dim 128 in bf16:
# configs written for TPU (512) or CPU blocks are clamped to it rather than failing to compile.
MAX_BLOCK = 128


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pallas_gpu_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] (K divides H), segment_ids [B, L] int -> [B, L, H, D].

    Causal, within-segment attention, scale 1/sqrt(D); 0 marks padding, which is a segment of its
    own. Forward and backward both run the Triton kernels of
    `jax.experimental.pallas.ops.gpu.attention.mha` (its custom VJP).

    Runs per device: XLA cannot partition the Triton custom call and would all-gather sharded
    inputs, so under a mesh call it inside `shard_map` (`check_vma=False`: the kernel declares its
    outputs without varying-axis info).

    Limits of that kernel, and what this wrapper does about them:
      * It wants as many kv heads as query heads. Grouped-query attention is a `vmap` over the
        H // K query heads of each kv head with K/V unbatched, so no repeated K/V copy is made and
        the forward shares each K/V block among the group; in the backward each group produces its
        own dK/dV, which vmap sums (a transient [H // K, B, L, K, D] buffer).
      * L must be a multiple of the blocks: L is padded up to max(block_q, block_k) with segment
        id -1 and the result sliced back. The backward pass cuts q and kv into equally many blocks
        and holds more tiles in shared memory, so all four of its blocks are min(block_q, block_k, 64)
        (128 exceeds a B200's 227 KiB per block at D=128 bf16).
      * Blocks must be powers of two (Triton tile shapes). D need not be: the kernel pads it to the
        next power of two with masked loads.
      * Shared memory bounds block x D x itemsize when compiled. Measured on the H100 target:
        bf16/fp16 with D=128 and blocks 128 fit, D=256 needs blocks of 64; float32 compiles
        (dots may run in TF32) but D=128 needs blocks of 64. Blocks above MAX_BLOCK are clamped;
        a tile still too large fails at compile with RESOURCE_EXHAUSTED, not here.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, length, h, d = q.shape
    kv_heads = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != d or h % kv_heads:
        raise ValueError(f"need q [B, L, H, D], k = v [B, L, K, D] with K | H; got {q.shape}, {k.shape}, {v.shape}")
    if segment_ids.shape != (b, length):
        raise ValueError(f"segment_ids must be [B, L] = {(b, length)}, got {segment_ids.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (_power_of_two(block_q) and _power_of_two(block_k)):
        raise ValueError(f"blocks must be powers of two; got {block_q=}, {block_k=}")

    block_q, block_k = min(block_q, MAX_BLOCK), min(block_k, MAX_BLOCK)
    block = max(block_q, block_k)
    pad = -length % block
    segment_ids = segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
    bwd = min(block_q, block_k, 64)
    sizes = pallas_attention.BlockSizes(block_q=block_q, block_k=block_k, block_q_dkv=bwd,
                                        block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd)

    def one_group(q1):  # [B, L', K, D]: one query head per kv head, K/V shared by all groups
        return pallas_attention.mha(q1, k, v, segment_ids, sm_scale=d**-0.5, causal=True,
                                    block_sizes=sizes, interpret=interpret)

    groups = h // kv_heads
    qg = q.reshape(b, length + pad, kv_heads, groups, d)  # heads are kv-head-major, as in reference
    out = jax.vmap(one_group, in_axes=3, out_axes=3)(qg)
    return out.reshape(b, length + pad, h, d)[:, :length].astype(q.dtype)
