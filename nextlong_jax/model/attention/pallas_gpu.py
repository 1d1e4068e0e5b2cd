"""Pallas Triton flash attention (NVIDIA GPUs): causal mask, packed documents, GQA and context
parallelism inside one kernel of our own.

Why not cuDNN or jax's `pallas.ops.gpu.attention.mha`: cuDNN through `jax.nn.dot_product_attention`
only takes document boundaries as a dense [L, L] mask, and `mha`'s causal test compares block
offsets (query position = row index), which is wrong for a device's zig-zag query rows against
all-gathered keys. Here every query row carries its ORIGINAL token index and the segment ids go
into the kernel, which compares them tile by tile: no [L, L] array exists in either pass.

The mask is `mask.visible`: key index <= query index and equal segment (0, padding, is a segment of
its own). Scale 1/sqrt(D); float32 accumulation; the output in q's dtype. Three kernels: forward
(output and the base-2 log-sum-exp of each row), dq, and dK/dV; delta = rowsum(out * dout) is an
XLA reduction between them.

What is skipped, and why (the wrapper computes the bounds, O(L log L) on [B, L] ids, no [L, L]):
  * A query block sees key blocks [lo, hi): hi from its largest original index (causality), lo
    from the first key of the earliest segment its queries belong to (the first occurrence of that
    id among the keys; packed documents are contiguous, so that is the document's start). The
    forward and dq kernels loop over exactly that range with dynamic loop bounds, so a row packed
    with n equal documents costs about 1/n of a causal row (8 documents of 512 tokens, blocks
    128: 80 of the 528 causal block pairs; `visited_steps` counts them). For contiguous documents
    and query blocks of consecutive indices every visited block pair has a visible entry: the
    range is exact, not just safe.
  * The dK/dV kernel inverts that per key block: within each monotone run ("chunk") of query rows
    (1 unsharded, 2 per device under zig-zag), the query blocks whose range holds the key block are
    contiguous, found by binary search on the prefix maximum of hi and the suffix minimum of lo
    (which keeps the range a superset even for ids that are not contiguous, so skipping never
    drops a visible entry). GQA: each program owns one kv head's block and loops over the H // K
    query heads of its group, so dK/dV need no per-head copy and no reduction afterwards.
  * Rows that see no key at all (only rows added to reach a whole block) output 0, not NaN.

Context parallelism (`sequence` mesh axis of size S > 1, tokens in `load_balance.zigzag` order):
each device keeps its L/S query rows (chunks i and 2S-1-i), all-gathers K, V and their segment
ids over `sequence`, puts them back in original order, and runs the kernel with its rows'
original indices; the transpose of the all-gather reduce-scatters dK/dV to their owners, in
float32: the dK/dV kernel writes DKV_DTYPE, the sum over the S devices' partials runs in it, and
only each owner's share is cast to K/V's dtype (one custom VJP spans the gather and the kernels, so
the gradient need not take K/V's dtype at the kernel's edge). Cost:
the gathered K and V are 2 x L x K x D x itemsize per example per device, 2 x 512K x 8 x 128 x 2 B
= 2 GiB at 512K tokens with 8 kv heads in bf16 (the backward holds dK/dV of twice that size, in
float32, before the reduce-scatter), and the gather moves (S-1)/S of it over the interconnect once per layer per
pass; with 8 kv heads against 32 query heads it is a quarter of what gathering queries would move.
The gathered K/V are the kernel's residuals for the backward (re-gathered where remat drops them);
its own residuals (output, lse) are named `backends.PALLAS_GPU_RESIDUALS`, for a remat policy that keeps them.
Zig-zag order gives every device the same causal work; packed documents' skipping applies too.

Limits, and what the wrapper does about them:
  * Tiles are powers of two (Triton): blocks must be, and a head dim that is not is padded with
    zeros to the next one (no effect on scores; the padded output columns are dropped).
  * Lengths need not be multiples of the blocks: each chunk of query rows, and the keys, are padded
    up with segment id -1 (no real token has it); padded keys sit past every query's index, padded
    query rows see nothing and are dropped.
  * Shared memory bounds block x D x itemsize when compiled. Measured on the H100 target: bf16/fp16
    with D=128 and forward blocks 128 fit, D=256 needs blocks of 64; float32 compiles (dots may
    run in TF32) but D=128 needs blocks of 64 (all four). Forward blocks above MAX_BLOCK and
    backward blocks above MAX_BWD_BLOCK_Q/KV are clamped rather than failing (the backward kernels
    hold float32 accumulators beside their tiles); a tile still too large fails at compile with
    RESOURCE_EXHAUSTED (on a B200, D=256 needs backward blocks of 32).
    Query blocks are also clamped to one zig-zag chunk (a block spanning a device's early and late
    chunk would scan every key either needs). `Blocks.fused_bwd` does not apply: dq has its own
    kernel (a fused one would write a partial dq per key block).
  * Runs per device: XLA cannot partition a Triton custom call, so under a mesh it runs inside
    `shard_map` over the ambient mesh (`per_device.on_each_device`); called inside a caller's
    shard_map (every mesh axis manual) it runs on the local shard directly.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

from nextlong_jax import load_balance
from nextlong_jax.model.attention.backends import PALLAS_GPU_RESIDUALS
from nextlong_jax.model.attention.blocks import Blocks
from nextlong_jax.model.attention.per_device import gather_sequence, on_each_device, spec
from nextlong_jax.sharding import ambient_shards

# Segment id of the rows and keys added to reach a whole number of blocks: no real token has it.
_PAD_SEGMENT = -1
# Largest forward tile whose blocks of q, k and v fit a GPU's shared memory at head_dim 128 in bf16:
# configs written for TPU (512) or CPU blocks are clamped to it rather than failing to compile.
MAX_BLOCK = 128
# Backward tiles (query rows, keys). At D=128 in bf16 for sm_90a (ptxas -v of the compile-only H100
# program; tests/test_pallas_gpu.py reads it): (64, 128) leaves dK/dV at 255 registers with 856 bytes
# of spill stores; (64, 64) at 243 registers (dq 135) with none, (32, 128) spills 60 bytes. The
# forward's (128, 128) holds 244 registers, no spills. (128, 128) would also ask a B200 for 290 KiB
# of shared memory, of its 227 KiB.
MAX_BWD_BLOCK_Q = 64
MAX_BWD_BLOCK_KV = 64
# dK/dV summed over `sequence` shards (each device's keys see every device's queries) leave the kernel
# in this dtype and are cast to K/V's after the reduce-scatter: in bf16, each of the S partials and each
# step of the sum would round (bf16[1,524288,8,128] per layer in the 512K H200 program).
DKV_DTYPE = jnp.float32
# Finite, so a block whose entries are all masked keeps the online softmax NaN-free.
_MASK_VALUE = -1e30
_LOG2E = math.log2(math.e)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------------
# Block ranges: which (query block, key block) pairs can hold a visible entry.
# ---------------------------------------------------------------------------------------------------


class _Ranges(NamedTuple):
    lo: jnp.ndarray  # [B, nq] first key block each query block scans
    hi: jnp.ndarray  # [B, nq] one past its last


class _DkvRanges(NamedTuple):
    lo: jnp.ndarray  # [B, chunks, nk] first query block of each chunk that sees each key block
    hi: jnp.ndarray  # [B, chunks, nk] one past its last


def _first_key_of_segment(q_segment: jnp.ndarray, kv_segment: jnp.ndarray) -> jnp.ndarray:
    """[B, Lq] position of the first key whose segment is the query's (Lk where none is).

    A sort and a binary search rather than run starts: exact for contiguous documents, and still a
    lower bound (so skipping stays safe) when an id recurs, as padding may."""

    def one(q_seg, kv_seg):
        order = jnp.argsort(kv_seg, stable=True)  # equal ids keep position order: first is smallest
        ids = kv_seg[order]
        at = jnp.searchsorted(ids, q_seg, side="left")
        at_c = jnp.minimum(at, ids.shape[0] - 1)
        return jnp.where(ids[at_c] == q_seg, order[at_c], ids.shape[0]).astype(jnp.int32)

    return jax.vmap(one)(q_segment, kv_segment)


def _query_ranges(first_key, q_index, block_q: int, block_kv: int, kv_length: int) -> _Ranges:
    """Per query block, the key blocks [lo, hi) that can hold a visible entry; first_key [B, Lq] is
    `_first_key_of_segment` (computed once for the forward's and the backward's blocks)."""
    b, lq = first_key.shape
    last = jnp.broadcast_to((q_index.astype(jnp.int32) // block_kv + 1)[None], (b, lq))
    lo = (first_key // block_kv).reshape(b, lq // block_q, block_q).min(-1)
    hi = jnp.minimum(last.reshape(b, lq // block_q, block_q).max(-1), kv_length // block_kv)
    return _Ranges(lo, jnp.maximum(hi, lo))


def _key_ranges(ranges: _Ranges, chunks: int, nk: int) -> _DkvRanges:
    """Per key block and chunk of query blocks, the query blocks [lo, hi) whose range may hold it.

    The running max of hi and the running min of lo from the right are nondecreasing, so each
    bound is one binary search; they equal hi and lo where those already are (a monotone chunk)."""
    b, nq = ranges.lo.shape
    per = nq // chunks
    keys = jnp.arange(nk, dtype=jnp.int32)

    def one(lo, hi):  # [per] of one chunk
        rising_hi = lax.cummax(hi)
        rising_lo = lax.cummin(lo, reverse=True)
        first = jnp.searchsorted(rising_hi, keys, side="right")  # first block with hi > key
        end = jnp.searchsorted(rising_lo, keys, side="right")  # blocks with lo <= key
        return first.astype(jnp.int32), jnp.maximum(end, first).astype(jnp.int32)

    lo, hi = (x.reshape(b * chunks, per) for x in ranges)
    first, end = jax.vmap(one)(lo, hi)
    offset = (jnp.arange(chunks, dtype=jnp.int32) * per)[None, :, None]
    return _DkvRanges(first.reshape(b, chunks, nk) + offset, end.reshape(b, chunks, nk) + offset)


class Steps(NamedTuple):
    forward: int  # (query block, key block) steps of the forward kernel, summed over the batch
    dkv: int  # steps of the dK/dV kernel at the same blocks (the dq kernel's equal `forward`)


def visited_steps(segment_ids, q_index=None, *, block_q: int, block_kv: int, kv_segment_ids=None,
                  chunks: int = 1) -> Steps:
    """How many (query block, key block) pairs the kernels visit for these rows, for one query head
    (each kernel repeats them for every head).

    segment_ids [B, Lq] of the query rows, q_index [Lq] their original indices (default
    0..Lq-1), kv_segment_ids [B, Lk] of the keys in original order (default: the query ids);
    lengths must be block multiples and `chunks` equal monotone runs of query rows (2 for one
    device's zig-zag rows). A pure function of its arguments, for tests and benchmarks."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    kv = segment_ids if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    index = jnp.arange(segment_ids.shape[1]) if q_index is None else jnp.asarray(q_index)
    ranges = _query_ranges(_first_key_of_segment(segment_ids, kv), index, block_q, block_kv, kv.shape[1])
    dkv = _key_ranges(ranges, chunks, kv.shape[1] // block_kv)
    return Steps(int(jnp.sum(ranges.hi - ranges.lo)), int(jnp.sum(dkv.hi - dkv.lo)))


# ---------------------------------------------------------------------------------------------------
# Kernels. Refs come per (block, example, head) from the grid; scores are in base 2 (exp2 is the
# fast path), so q.k is scaled by log2(e) / sqrt(D) and the saved lse is log2 of the row's sum.
# ---------------------------------------------------------------------------------------------------


def _mask(q_idx, q_seg, k_start, block_kv, k_seg):
    k_idx = k_start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    return (k_idx <= q_idx[:, None]) & (q_seg[:, None] == k_seg[None, :])


def _forward_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qidx_ref, o_ref, lse_ref, *,
                    scale: float, block_q: int, block_kv: int):
    j = pl.program_id(0)
    rows = pl.ds(j * block_q, block_q)
    q = q_ref[...]
    q_seg, q_idx = qseg_ref[rows], qidx_ref[rows]
    d = q.shape[-1]

    def body(kb, carry):
        acc, m, l = carry
        cols = pl.ds(kb * block_kv, block_kv)
        k, v = k_ref[cols, :], v_ref[cols, :]
        visible = _mask(q_idx, q_seg, kb * block_kv, block_kv, kseg_ref[cols])
        s = pl.dot(q, k, trans_b=True) * scale
        s = jnp.where(visible, s, _MASK_VALUE)
        m_next = jnp.maximum(m, s.max(-1))
        # Masked entries are zeroed outright: a row with nothing visible yet must not count them.
        p = jnp.where(visible, jnp.exp2(s - m_next[:, None]), 0.0)
        correction = jnp.exp2(m - m_next)
        acc = acc * correction[:, None] + pl.dot(p.astype(v.dtype), v)
        return acc, m_next, l * correction + p.sum(-1)

    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), _MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(lo_ref[j], hi_ref[j], body, init)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    # +inf for rows that see nothing: exp2(s - lse) is then 0 in the backward, whatever s is.
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)


def _dq_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qidx_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale: float, block_q: int, block_kv: int):
    j = pl.program_id(0)
    rows = pl.ds(j * block_q, block_q)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg, q_idx = qseg_ref[rows], qidx_ref[rows]

    def body(kb, dq):
        cols = pl.ds(kb * block_kv, block_kv)
        k, v = k_ref[cols, :], v_ref[cols, :]
        visible = _mask(q_idx, q_seg, kb * block_kv, block_kv, kseg_ref[cols])
        p = jnp.where(visible, jnp.exp2(pl.dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
        ds = p * (pl.dot(do, v, trans_b=True) - delta[:, None])
        return dq + pl.dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[j], hi_ref[j], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * (scale / _LOG2E)).astype(dq_ref.dtype)


def _dkv_kernel(lo_ref, hi_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qidx_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale: float, block_q: int, block_kv: int, groups: int, chunks: int):
    i = pl.program_id(0)
    cols = pl.ds(i * block_kv, block_kv)
    k, v = k_ref[...], v_ref[...]
    k_seg = kseg_ref[cols]
    d = k.shape[-1]

    def one_block(qb, g, carry):
        dk, dv = carry
        rows = pl.ds(qb * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows], delta_ref[g, rows]
        visible = _mask(qidx_ref[rows], qseg_ref[rows], i * block_kv, block_kv, k_seg)
        p = jnp.where(visible, jnp.exp2(pl.dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
        dv = dv + pl.dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (pl.dot(do, v, trans_b=True) - delta[:, None])
        return dk + pl.dot(ds.astype(q.dtype), q, trans_a=True), dv

    carry = (jnp.zeros((block_kv, d), jnp.float32), jnp.zeros((block_kv, d), jnp.float32))
    for c in range(chunks):  # static: 1, or 2 zig-zag chunks; each a dynamic range of query blocks
        lo, hi = lo_ref[c, i], hi_ref[c, i]
        carry = lax.fori_loop(0, groups, lambda g, carry: lax.fori_loop(
            lo, hi, lambda qb, carry: one_block(qb, g, carry), carry), carry)
    dk, dv = carry
    dk_ref[...] = (dk * (scale / _LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _compiler_params(d: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


class _Config(NamedTuple):
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    chunks: int
    scale: float  # log2(e) / sqrt(D) of the true head dim: scores are in base 2
    interpret: bool
    # How this device's K/V become the kernels' keys: all-gathered over (axis, shards) when set, in
    # original order, then padded by kv_pad keys and d_pad head-dim columns (`_keys`).
    gather: tuple[str, int] | None = None
    kv_pad: int = 0
    d_pad: int = 0


def _specs(lq: int, lk: int, groups: int, d: int, block: int, by_query: bool):
    """BlockSpecs of (q, k, v, q_seg, kv_seg, q_index) for a grid (block, example, head)."""
    if by_query:  # one query block of one query head; all keys of its kv head
        q = pl.BlockSpec((None, block, None, d), lambda j, b, h: (b, j, h, 0))
        kv = pl.BlockSpec((None, lk, None, d), lambda j, b, h: (b, 0, h // groups, 0))
    else:  # one key block of one kv head; all query rows of its group's heads
        q = pl.BlockSpec((None, lq, groups, d), lambda i, b, h: (b, 0, h, 0))
        kv = pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))
    return [q, kv, kv, pl.BlockSpec((None, lq), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, lk), lambda i, b, h: (b, 0)), pl.BlockSpec((lq,), lambda i, b, h: (0,))]


def _forward(q, k, v, q_seg, kv_seg, q_index, ranges: _Ranges, cfg: _Config):
    b, lq, h, d = q.shape
    lk, groups = k.shape[1], h // k.shape[2]
    nq = lq // cfg.block_q
    range_spec = pl.BlockSpec((None, nq), lambda j, b, h: (b, 0))
    kernel = functools.partial(_forward_kernel, scale=cfg.scale, block_q=cfg.block_q,
                               block_kv=cfg.block_kv)
    return pl.pallas_call(
        kernel, grid=(nq, b, h),
        in_specs=[range_spec, range_spec, *_specs(lq, lk, groups, d, cfg.block_q, True)],
        out_specs=[pl.BlockSpec((None, cfg.block_q, None, d), lambda j, b, h: (b, j, h, 0)),
                   pl.BlockSpec((None, None, cfg.block_q), lambda j, b, h: (b, h, j))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        compiler_params=None if cfg.interpret else _compiler_params(d), interpret=cfg.interpret,
        name="nextlong_mha_forward",
    )(*ranges, q, k, v, q_seg, kv_seg, q_index)


def _backward(q, k, v, q_seg, kv_seg, q_index, out, lse, do, dq_ranges: _Ranges, dkv_ranges: _DkvRanges,
              cfg: _Config, dkv_dtype):
    b, lq, h, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    nq, nk = lq // bq, lk // bk
    scale = cfg.scale
    delta = jnp.einsum("blhd,blhd->bhl", out.astype(jnp.float32), do.astype(jnp.float32))
    params = None if cfg.interpret else _compiler_params(d)
    row_spec = pl.BlockSpec((None, None, bq), lambda j, b, h: (b, h, j))
    q_block = pl.BlockSpec((None, bq, None, d), lambda j, b, h: (b, j, h, 0))
    range_spec = pl.BlockSpec((None, nq), lambda j, b, h: (b, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_q=bq, block_kv=bk), grid=(nq, b, h),
        in_specs=[range_spec, range_spec, *_specs(lq, lk, groups, d, bq, True), q_block, row_spec, row_spec],
        out_specs=q_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=cfg.interpret, name="nextlong_mha_backward_dq",
    )(*dq_ranges, q, k, v, q_seg, kv_seg, q_index, do, lse, delta)

    group_rows = pl.BlockSpec((None, groups, lq), lambda i, b, h: (b, h, 0))
    range_spec = pl.BlockSpec((None, cfg.chunks, nk), lambda i, b, h: (b, 0, 0))
    kv_block = pl.BlockSpec((None, bk, None, d), lambda i, b, h: (b, i, h, 0))
    kernel = functools.partial(_dkv_kernel, scale=scale, block_q=bq, block_kv=bk, groups=groups,
                               chunks=cfg.chunks)
    dk, dv = pl.pallas_call(
        kernel, grid=(nk, b, kv_heads),
        in_specs=[range_spec, range_spec, *_specs(lq, lk, groups, d, bk, False),
                  pl.BlockSpec((None, lq, groups, d), lambda i, b, h: (b, 0, h, 0)), group_rows, group_rows],
        out_specs=[kv_block, kv_block], out_shape=[jax.ShapeDtypeStruct(k.shape, dkv_dtype)] * 2,
        compiler_params=params, interpret=cfg.interpret, name="nextlong_mha_backward_dkv",
    )(*dkv_ranges, q, k, v, q_seg, kv_seg, q_index, do, lse, delta)
    return dq, dk, dv


def _keys(x, cfg: _Config):
    """This device's k or v [B, Lk', K, D] -> the kernels' keys: gathered over `sequence` (original
    order) where the config says, padded to whole blocks and a power-of-two head dim. Linear in x."""
    if cfg.gather:
        (x,) = gather_sequence(*cfg.gather, x)
    return jnp.pad(x, ((0, 0), (0, cfg.kv_pad), (0, 0), (0, cfg.d_pad)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _flash(q, k, v, q_seg, kv_seg, q_index, ranges, dq_ranges, dkv_ranges, cfg):
    return _forward(q, _keys(k, cfg), _keys(v, cfg), q_seg, kv_seg, q_index, ranges, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_index, ranges, dq_ranges, dkv_ranges, cfg):
    keys, values = _keys(k, cfg), _keys(v, cfg)
    out, lse = _forward(q, keys, values, q_seg, kv_seg, q_index, ranges, cfg)
    # Named, so a remat policy can keep them: the backward needs lse too, not only the output.
    out, lse = (checkpoint_name(x, PALLAS_GPU_RESIDUALS) for x in (out, lse))
    return out, (q, keys, values, q_seg, kv_seg, q_index, dq_ranges, dkv_ranges, out, lse)


def _flash_bwd(cfg, residuals, do):
    q, keys, values, q_seg, kv_seg, q_index, dq_ranges, dkv_ranges, out, lse = residuals
    b, padded, kv_heads, d = keys.shape
    kv = jax.ShapeDtypeStruct((b, (padded - cfg.kv_pad) // (cfg.gather[1] if cfg.gather else 1), kv_heads,
                               d - cfg.d_pad), keys.dtype)  # this device's k and v
    dkv_dtype = DKV_DTYPE if cfg.gather else kv.dtype
    dq, dk, dv = _backward(q, keys, values, q_seg, kv_seg, q_index, out, lse, do, dq_ranges, dkv_ranges, cfg,
                           dkv_dtype)
    # The transpose of `_keys`: un-pad, and reduce-scatter over `sequence` in dkv_dtype.
    (dk,), (dv,) = (jax.linear_transpose(lambda x: _keys(x, cfg), jax.ShapeDtypeStruct(kv.shape, dkv_dtype))(g)
                    for g in (dk, dv))
    return dq, dk.astype(kv.dtype), dv.astype(kv.dtype), None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------------
# Wrappers.
# ---------------------------------------------------------------------------------------------------


def kernel_blocks(blocks: Blocks) -> Blocks:
    """The tiles the kernels run for configured `blocks` at any length that holds them: forward blocks
    clamped to MAX_BLOCK, backward ones to MAX_BWD_BLOCK_Q/KV (what a plan reports)."""
    return blocks._replace(q=min(blocks.q, MAX_BLOCK), kv=min(blocks.kv, MAX_BLOCK),
                           q_bwd=min(blocks.q_bwd, MAX_BWD_BLOCK_Q), kv_bwd=min(blocks.kv_bwd, MAX_BWD_BLOCK_KV))


def flash_attention(q, k, v, q_segment_ids, kv_segment_ids, q_index, *, blocks: Blocks = Blocks(),
                    chunks: int = 1, gather: tuple[str, int] | None = None, interpret: bool = False) -> jnp.ndarray:
    """One device's attention: q [B, Lq, H, D] against k/v [B, Lk, K, D] (K divides H) in original
    order, q_segment_ids [B, Lq], kv_segment_ids [B, Lk], q_index [Lq] (int) the original index of
    each query row -> [B, Lq, H, D] in q's dtype. With `gather` = (axis, S), inside a shard_map, k and v
    are this device's Lk / S rows in zig-zag order, all-gathered here (their gradient reduce-scattered
    in DKV_DTYPE); kv_segment_ids are already gathered.

    The query rows form `chunks` equal runs, each of increasing indices (1, or 2 for a device's
    zig-zag rows): blocks never span two runs, and the dK/dV kernel searches each for the query
    blocks that see a key block. Any index order is correct; monotone runs are what make the
    skipping tight."""
    b, lq, h, d = q.shape
    lk, kv_heads = k.shape[1] * (gather[1] if gather else 1), k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or h % kv_heads:
        raise ValueError(f"need q [B, Lq, H, D], k = v [B, Lk, K, D] with K | H; got {q.shape}, {k.shape}, {v.shape}")
    if q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
        raise ValueError(f"segment_ids must be [B, Lq] = {(b, lq)} and [B, Lk] = {(b, lk)}; got "
                         f"{q_segment_ids.shape}, {kv_segment_ids.shape}")
    if q_index.shape != (lq,):
        raise ValueError(f"q_index must be [Lq] = {(lq,)}, got {q_index.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not all(_power_of_two(x) for x in blocks[:4]):
        raise ValueError(f"blocks must be powers of two; got {blocks}")
    if chunks < 1 or lq % chunks:
        raise ValueError(f"{lq} query rows do not split into {chunks} equal chunks")

    chunk = lq // chunks
    # Query blocks within one chunk (rounded up: the chunk is padded to it), keys within the keys;
    # never below 16 for that, Triton's smallest dot.
    q_cap, kv_cap = max(_next_power_of_two(chunk), 16), max(_next_power_of_two(lk), 16)
    tiles = kernel_blocks(blocks)
    block_kv, block_kv_bwd = min(tiles.kv, kv_cap), min(tiles.kv_bwd, kv_cap)
    kv_pad = -lk % max(block_kv, block_kv_bwd)
    d_pad = _next_power_of_two(d) - d
    cfg = _Config(min(tiles.q, q_cap), block_kv, min(tiles.q_bwd, q_cap), block_kv_bwd, chunks,
                  _LOG2E / math.sqrt(d), interpret, gather, kv_pad, d_pad)

    # Pad each chunk of query rows, and the keys, to whole blocks (powers of two: the larger block
    # is a multiple of the smaller). Padded query rows repeat their chunk's last index (runs stay
    # monotone) and padded keys follow every real key, so causality alone hides them from real rows.
    q_pad = -chunk % max(cfg.block_q, cfg.block_q_bwd)
    q_seg = q_segment_ids.astype(jnp.int32)
    kv_seg = kv_segment_ids.astype(jnp.int32)
    q_index = jnp.asarray(q_index, jnp.int32)

    def pad_chunks(x, value=0, mode="constant"):
        x = x.reshape(x.shape[0], chunks, chunk, *x.shape[2:])
        width = [(0, 0)] * x.ndim
        width[2] = (0, q_pad)
        x = jnp.pad(x, width, mode=mode, **({"constant_values": value} if mode == "constant" else {}))
        return x.reshape(x.shape[0], chunks * (chunk + q_pad), *x.shape[3:])

    if q_pad:
        q, q_seg = pad_chunks(q), pad_chunks(q_seg, _PAD_SEGMENT)
        q_index = pad_chunks(q_index[None], mode="edge")[0]
    if kv_pad:  # K/V are padded by `_keys`, inside the kernels' VJP
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, kv_pad)), constant_values=_PAD_SEGMENT)
    if d_pad:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, d_pad)))

    first_key = _first_key_of_segment(q_seg, kv_seg)
    ranges = _query_ranges(first_key, q_index, cfg.block_q, cfg.block_kv, lk + kv_pad)
    dq_ranges = _query_ranges(first_key, q_index, cfg.block_q_bwd, cfg.block_kv_bwd, lk + kv_pad)
    dkv_ranges = _key_ranges(dq_ranges, chunks, (lk + kv_pad) // cfg.block_kv_bwd)
    out = _flash(q, k, v, q_seg, kv_seg, q_index, ranges, dq_ranges, dkv_ranges, cfg)[..., :d]
    if q_pad:
        out = out.reshape(b, chunks, chunk + q_pad, h, d)[:, :, :chunk].reshape(b, lq, h, d)
    return out


def pallas_gpu_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    blocks: Blocks = Blocks(),
    interpret: bool = False,
) -> jnp.ndarray:
    """q [B, L, H, D], k/v [B, L, K, D] (K divides H), segment_ids [B, L] int -> [B, L, H, D], sharded like q.

    Under the ambient mesh it runs per device (shard_map): batch over the batch axes, heads over
    `tensor`. With its `sequence` axis of size S > 1 the length must be in `load_balance.zigzag`
    order for S: K/V and their ids are all-gathered and each device's rows use their original
    indices. Without a mesh, or S == 1, the length is in original order. `interpret` runs the
    Pallas kernels in the interpreter (any platform; for tests).
    """
    axis, shards = ambient_shards("length")
    mesh = jax.sharding.get_abstract_mesh()
    # Already inside the caller's shard_map (every axis manual): q holds this device's rows.
    inside = not mesh.empty and mesh.are_all_axes_manual
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, L] = {q.shape[:2]}, got {segment_ids.shape}")
    length = q.shape[1] * (shards if inside else 1)
    if shards > 1 and length % (2 * shards):
        raise ValueError(f"pallas_gpu: length {length} not divisible by 2 x {shards} sequence shards")
    index = jnp.asarray(load_balance.token_index(length, shards) if shards > 1 else np.arange(length, dtype=np.int32))

    def local(q, k, v, segment_ids, q_index):
        sharded = shards > 1
        (kv_segment_ids,) = gather_sequence(axis, shards, segment_ids) if sharded else (segment_ids,)
        return flash_attention(q, k, v, segment_ids, kv_segment_ids, q_index, blocks=blocks,
                               chunks=2 if sharded else 1, gather=(axis, shards) if sharded else None,
                               interpret=interpret)

    if mesh.empty:
        return local(q, k, v, segment_ids, index)
    if inside:
        rows = q.shape[1]
        mine = lax.dynamic_slice_in_dim(index, lax.axis_index(axis) * rows, rows) if shards > 1 else index
        return local(q, k, v, segment_ids, mine)
    # Each device receives its own rows' original indices: the table shards like the length.
    return on_each_device(local, mesh, spec("length"))(q, k, v, segment_ids, index)
