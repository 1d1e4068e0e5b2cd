"""Pallas splash attention (TPU): causal mask, segment ids and GQA inside the kernel.

Three things make the bare kernel usable in the sharded trainer:

* shard_map. A Mosaic kernel cannot be partitioned by XLA, so it runs inside `jax.shard_map` over
  the ambient mesh: batch split over the batch axes, heads over `tensor` (a query head and its kv
  head share a shard), and each device calls the kernel on its local shape. GQA is native to the
  kernel (k/v [K, L, D] beside q [H, L, D]); K/V are never repeated.
* Context parallelism over `sequence`, the all-gather strategy (MaxText's default): each device
  keeps its queries, all-gathers K/V and their segment ids, and runs the kernel on local queries
  against all keys. Tokens arrive in zig-zag order (`load_balance`), so the gathered keys are put
  back in original order and each query row carries its ORIGINAL index (the mask's `q_sequence`);
  the kernel's causal test `q >= k` is then exact and the block tables skip what is invisible.
  The tables are built for all L query rows at once (`q_seq_shards` = S) and sharded over
  `sequence` with the kernel passed as a shard_map argument, so each device gets its own rows.
  Backward: the transpose of the all-gather reduce-scatters dK/dV to their owners, in float32
  (`DKV_DTYPE`, `per_device.gather_sequence_summed_in`), then casts them to K/V's dtype: each key's
  gradient is a sum of S devices' partials, and in bf16 every step of that sum would round. The
  partials themselves leave the kernel in K's dtype, each rounded once: jax 0.10.2's dK/dV kernel
  accumulates in float32 but declares its outputs `ShapeDtypeStruct.like(k)` (tokamax 0.0.12's copy
  writes float32 only with its dynamic grid and GQA), so unlike `pallas_gpu`'s kernels only the sum
  across `sequence` runs in float32. The price: the gathered dK/dV wait for the reduce-scatter in
  float32, 2 x L x K x D x 4 B per example (4 GiB at 512K tokens with 8 kv heads, twice bf16's).
* Cached, vectorised mask tables. splash's own `process_mask` visits every block pair in Python
  (about 20 s at 64K tokens with 512 blocks, quadratic in length), and calling it as is would
  repeat that at every trace. For a causal mask the tables follow from each block's min/max token
  index, so `_mask_info` computes them with numpy (6 ms at 64K, 0.3 s at 512K), in exactly splash's layout
  (a test checks equality with `process_mask`), and `_kernel` caches the kernel per (length,
  shards, blocks, interpret). Tables stay numpy so building never places arrays on a device.

The kernel's residuals (output [H, L, D] and log-sum-exp [H, L] per example) carry the checkpoint
name `backends.SPLASH_RESIDUALS`: a remat policy that saves it skips re-running the forward kernel in the
backward pass (saving only the attention output does not, the backward kernels need the lse too).

Tuning, as MaxText's long-context TPU configs do: large fetched blocks (`Blocks.q`/`kv`, 1024-2048
at 128K and beyond) with a separate compute block (`kv_compute`, `kv_bwd_compute`: splash's
block_kv_compute and block_kv_dkv_compute); the fused backward (`fused_bwd`: dq accumulated inside
the dK/dV kernel, one backward kernel instead of two, at the price of a partial dq per key block).
jax 0.10.2's splash (and tokamax 0.0.12's copy) has no megacore split of the dq and dK/dV kernels:
their grids are all "arbitrary" (the kernel's own comment: the kv prefetch schedule assumes no
megacore, and dK/dV reduces over heads and query blocks), and BlockSizes takes no megacore option.
Rather than keep a fork of those kernels, each example's kv heads are split in `CORE_GROUPS` and the
kernel vmapped over the groups too: a vmapped axis is "parallel" to Mosaic, so every kernel, dK/dV
included, has a grid axis a v4/v5p chip's two TensorCores share (test_splash reads the semantics in
the compiled v5p program). The groups are independent attention problems (GQA keeps each query head
with its kv head), so the numbers are those of one call.

Limits: blocks are multiples of 128 (TPU lanes) dividing the local lengths; the tables live in the
TPU's scalar memory (1 MiB on v5p) with (L/S / q) x (L / kv) entries each, so 512K tokens with 512
blocks needs sequence sharding or larger blocks (2 MiB otherwise: the compile fails).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info_lib
from jax.sharding import NamedSharding, PartitionSpec

from nextlong_jax import load_balance
from nextlong_jax.model.attention.backends import SPLASH_RESIDUALS
from nextlong_jax.model.attention.blocks import Blocks
from nextlong_jax.model.attention.per_device import gather_sequence, gather_sequence_summed_in, on_each_device
from nextlong_jax.sharding import ambient_shards

LANES = 128  # the kernel tiles sequence blocks on 128 TPU lanes: every block is a multiple
# Independent kernel calls per example, each on its share of the kv heads (and their query heads). Mosaic
# marks the grid axis a vmap adds "parallel", and splits a parallel axis over the two TensorCores of a
# megacore chip (v4, v5p); the dq and dK/dV kernels' own grids are all "arbitrary" (dK/dV sums over
# heads and query blocks), so without this their backward runs on one core when a device holds one row.
CORE_GROUPS = 2
# dK/dV cross `sequence` (the reduce-scatter that returns each key's gradient to its owner) in this dtype and
# are cast to K/V's after: the kernel's partials arrive in K/V's dtype, but their sum then rounds only once.
DKV_DTYPE = jnp.float32


def _causal(q_index, k_index):
    # Module-level so the kernel's static mask function hashes the same across builds.
    return q_index >= k_index


def splash_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    blocks: Blocks = Blocks(),
    interpret: bool = False,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D], segment_ids [B, L] -> [B, L, H, D], sharded like q.

    With the ambient mesh's `sequence` axis of size S > 1 the length must be in
    `load_balance.zigzag` order for S. `interpret` runs the Pallas kernels in the interpreter
    (any platform; for tests).
    """
    axis, shards = ambient_shards("length")
    length, head_dim = q.shape[1], q.shape[3]
    kernel = _kernel(length, shards, _clamp(blocks, length, shards), interpret)

    def local(q, k, v, segment_ids, kernel):
        # q [b, L/S, h, D], k/v [b, L/S, kh, D] (this device's zig-zag rows), segment_ids [b, L/S]
        kv_segment_ids = segment_ids
        if shards > 1:
            k, v = gather_sequence_summed_in(DKV_DTYPE, axis, shards, k, v)
            (kv_segment_ids,) = gather_sequence(axis, shards, segment_ids)
        # Scaling q is cheaper than scaling [L, L] scores; the kernel applies no scale itself.
        qt = (q * head_dim**-0.5).transpose(0, 2, 1, 3)  # [b, h, L/S, D]: the kernel's head-major layout
        kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kh, L, D]
        b, h = qt.shape[:2]
        groups = CORE_GROUPS if kt.shape[1] % CORE_GROUPS == 0 else 1
        # [b, h, ...] -> [b * groups, h / groups, ...]: each group's query heads are those of its kv heads.
        qt, kt, vt = (x.reshape(b * groups, x.shape[1] // groups, *x.shape[2:]) for x in (qt, kt, vt))
        q_seg, kv_seg = (jnp.repeat(s.astype(jnp.int32), groups, axis=0) for s in (segment_ids, kv_segment_ids))

        def one(q1, k1, v1, q_seg, kv_seg):
            return kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=q_seg, kv=kv_seg))

        out = jax.vmap(one)(qt, kt, vt, q_seg, kv_seg)
        return out.reshape(b, h, *out.shape[2:]).transpose(0, 2, 1, 3)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids, kernel)
    # Table rows follow query blocks, so they shard like the length; heads share one table.
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, axis if shards > 1 else None)))
    return on_each_device(local, mesh, kernel_spec)(q, k, v, segment_ids, kernel)


def _clamp(blocks: Blocks, length: int, shards: int) -> Blocks:
    """Blocks fitted to this layout; raises where the kernel's tiling rules cannot be met.

    Query blocks stay within one zig-zag chunk (L / 2S): a block spanning a device's early and
    late chunk would compute the early rows against every key the late rows need.
    """
    if length % (2 * shards if shards > 1 else 1):
        raise ValueError(f"splash: length {length} not divisible by 2 x {shards} sequence shards")
    q_span = length // (2 * shards) if shards > 1 else length
    kv, kv_bwd = min(blocks.kv, length), min(blocks.kv_bwd, length)
    fitted = Blocks(min(blocks.q, q_span), kv, min(blocks.q_bwd, q_span), kv_bwd, blocks.fused_bwd,
                    min(blocks.kv_compute or kv, kv), min(blocks.kv_bwd_compute or kv_bwd, kv_bwd))
    for name, block, span in zip(("q", "kv", "q_bwd", "kv_bwd", "kv_compute", "kv_bwd_compute"),
                                 (*fitted[:4], *fitted[5:]), (q_span, length, q_span, length, kv, kv_bwd)):
        if block % LANES or span % block:
            raise ValueError(f"splash: block {name}={block} must be a multiple of {LANES} dividing {span} "
                             f"(length {length}, {shards} sequence shards"
                             f"{'' if 'compute' not in name else ', its fetched kv block'})")
    return fitted


@functools.lru_cache(maxsize=64)
def _kernel(length: int, shards: int, blocks: Blocks, interpret: bool) -> sk.SplashAttentionKernel:
    """The kernel for `length` tokens split over `shards` (zig-zag when > 1), with its mask tables.

    Tables cover all L query rows (S shards of L/S) against all L keys; they do not depend on
    batch or head counts (every head shares one table), so neither is part of the key.
    """
    q_sequence = load_balance.token_index(length, shards) if shards > 1 else np.arange(length, dtype=np.int32)
    fused = blocks.fused_bwd
    sizes = sk.BlockSizes(
        block_q=blocks.q, block_kv=blocks.kv, block_kv_compute=blocks.kv_compute or blocks.kv,
        block_q_dkv=blocks.q_bwd, block_kv_dkv=blocks.kv_bwd,
        block_kv_dkv_compute=blocks.kv_bwd_compute or blocks.kv_bwd,
        block_q_dq=None if fused else blocks.q_bwd, block_kv_dq=None if fused else blocks.kv_bwd,
        use_fused_bwd_kernel=fused)
    fwd = _mask_info(q_sequence, length, (blocks.q, blocks.kv), shards, dkv=False, shrink=True)
    dq = None if fused else _mask_info(q_sequence, length, (blocks.q_bwd, blocks.kv_bwd), shards, dkv=False,
                                       shrink=True)
    dkv = _mask_info(q_sequence, length, (blocks.q_bwd, blocks.kv_bwd), shards, dkv=True, shrink=not fused)
    return sk.SplashAttentionKernel(
        fwd, dq, dkv, block_sizes=sizes, is_mqa=False, save_residuals=False, mask_value=sk.DEFAULT_MASK_VALUE,
        attn_logits_soft_cap=None, residual_checkpoint_name=SPLASH_RESIDUALS, mask_function=_causal,
        interpret=interpret)


def _mask_info(q_sequence: np.ndarray, kv_length: int, block_shape: tuple[int, int], shards: int, *,
               dkv: bool, shrink: bool) -> mask_info_lib.MaskInfo:
    """splash's `process_mask(_dkv)` result for the mask `q_sequence[row] >= key`, vectorised.

    q_sequence [Lq] is the original token index of each query row; keys are in original order.
    Query rows split into `shards` equal shards, each with its own tables, as `q_seq_shards` does.

    block_mask [1, rows, cols] holds 0 (nothing visible), 1 (partial: the kernel evaluates
    `_causal`) or 2 (all visible); data_next names the block to fetch at each grid step. Shrunk
    tables list only the non-empty blocks of each query row (forward, dq) or key column (dkv),
    padded where rows differ: that is where the causal (and zig-zag) sparsity is skipped.
    """
    bq, bk = block_shape
    rows = q_sequence.reshape(-1, bq)
    first_key = np.arange(0, kv_length, bk)
    some = rows.max(1)[:, None] >= first_key[None, :]
    every = rows.min(1)[:, None] >= first_key[None, :] + bk - 1
    block_mask = np.where(every, 2, np.where(some, 1, 0)).astype(np.int32)  # [nq, nk]
    per_shard = block_mask.shape[0] // shards
    shard_masks = [block_mask[s * per_shard:(s + 1) * per_shard] for s in range(shards)]
    if not shrink:  # only the fused dkv tables: grid order (key block, query block)
        data_next = np.concatenate([_next_query_block(m) for m in shard_masks], axis=0)
    else:
        parts = [_shrink_dkv(m) if dkv else _shrink_rows(m) for m in shard_masks]
        # Shards are padded to one size (SPMD), repeating the last block so nothing new is fetched.
        axis = 0 if dkv else 1
        size = max(m.shape[axis] for m, _ in parts)

        def padded(x, **how):
            width = [(0, 0), (0, 0)]
            width[axis] = (0, size - x.shape[axis])
            return np.pad(x, width, **how)

        block_mask = np.concatenate([padded(m) for m, _ in parts], axis=0)
        data_next = np.concatenate([padded(d, mode="edge") for _, d in parts], axis=0)
    return mask_info_lib.MaskInfo(
        data_next=_smallest_int(data_next)[None], mask_next=None, block_mask=_smallest_int(block_mask)[None],
        partial_mask_blocks=None, q_sequence=q_sequence.astype(np.int32))


def _shrink_rows(block_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query row, its non-empty key blocks in order, right-padded with 0 (forward and dq)."""
    count = (block_mask > 0).sum(1)
    width = max(int(count.max()), 1)
    cols = np.argsort(block_mask == 0, axis=1, kind="stable")[:, :width]  # non-empty first, ascending
    valid = np.arange(width)[None, :] < count[:, None]
    return np.where(valid, np.take_along_axis(block_mask, cols, 1), 0), np.where(valid, cols, 0)


def _shrink_dkv(block_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per key column, its non-empty query blocks in order, left-padded with 0 (dK/dV)."""
    count = (block_mask > 0).sum(0)
    height = max(int(count.max()), 1)
    order = np.argsort(block_mask == 0, axis=0, kind="stable")
    position = np.arange(height)[:, None] - (height - count)[None, :]
    valid = position >= 0
    rows = np.take_along_axis(order, np.maximum(position, 0), 0)
    return np.where(valid, np.take_along_axis(block_mask, rows, 0), 0), np.where(valid, rows, 0)


def _next_query_block(block_mask: np.ndarray) -> np.ndarray:
    """Unshrunk dkv data_next: at each (q, k) step in key-major order, the query block of the next
    non-empty step at or after it (wrapping to the first)."""
    nq, nk = block_mask.shape
    flat = (block_mask.T > 0).reshape(-1)  # key-major
    nonzero = np.flatnonzero(flat)
    if nonzero.size == 0:
        return np.zeros_like(block_mask)
    at = np.searchsorted(nonzero, np.arange(flat.size))
    following = np.where(at < nonzero.size, nonzero[np.minimum(at, nonzero.size - 1)], nonzero[0])
    return (following % nq).reshape(nk, nq).T.astype(np.int32)


def _smallest_int(x: np.ndarray) -> np.ndarray:
    # Tables live in the TPU's small scalar memory: int8 or int16 where the values fit.
    for dtype in (np.int8, np.int16):
        if x.size == 0 or x.max() <= np.iinfo(dtype).max:
            return x.astype(dtype)
    return x.astype(np.int32)
