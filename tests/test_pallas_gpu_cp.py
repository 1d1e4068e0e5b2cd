"""The Pallas Triton kernel's block skipping and context parallelism, without a GPU: visited block
pairs are exactly those with a visible entry (a packed row costs a fraction of a causal one), the
interpreter matches the reference attention with zig-zag rows on a `sequence` mesh axis of 8
virtual CPU devices, and the sequence-sharded forward and backward compile to Triton for 8 H100s.

Mesh and GPU checks run in child interpreters (device count and platform are fixed when jax starts).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import context_parallel_errors, packed_segments
from multidevice import ROOT, run_on_8_devices
from nextlong_jax import load_balance
from nextlong_jax.model.attention import pallas_gpu
from nextlong_jax.model.attention.backends import PALLAS_GPU_RESIDUALS
from nextlong_jax.model.attention.blocks import Blocks


def _segments(b: int, length: int) -> np.ndarray:
    """packed_segments, with padding (0) also in the middle of row 1: an id that recurs, so skipping
    must stay safe when the first key of a query's segment lies before its run."""
    seg = packed_segments(b, length)
    seg[1 % b, length // 3:length // 3 + length // 16] = 0
    return seg


def _brute_force_pairs(seg: np.ndarray, q_index: np.ndarray, rows: slice, bq: int, bk: int) -> int:
    """(query block, key block) pairs of `rows` with at least one visible entry, from the mask itself."""
    index = np.arange(seg.shape[1])
    q_seg = seg[:, q_index][:, rows]
    visible = (index[None, None, :] <= q_index[rows][None, :, None]) & (q_seg[:, :, None] == seg[:, None, :])
    b, lq, lk = visible.shape
    return int(visible.reshape(b, lq // bq, bq, lk // bk, bk).any(axis=(2, 4)).sum())


def test_packed_row_visits_at_most_a_sixth_of_a_causal_row():
    length, block = 4096, 128
    one = np.ones((1, length), np.int32)
    eight = np.repeat(np.arange(1, 9, dtype=np.int32), length // 8)[None]
    full = pallas_gpu.visited_steps(one, block_q=block, block_kv=block)
    packed = pallas_gpu.visited_steps(eight, block_q=block, block_kv=block)
    n = length // block
    assert full == (n * (n + 1) // 2,) * 2  # 528: the causal triangle, forward and dK/dV alike
    assert packed == (8 * 4 * 5 // 2,) * 2  # 80: eight triangles of 4 blocks
    assert packed.forward <= full.forward / 6


@pytest.mark.parametrize("shards,bq,bk", [(1, 16, 16), (1, 16, 32), (1, 32, 8), (4, 16, 16), (4, 8, 32)])
def test_visited_steps_are_exactly_the_blocks_with_a_visible_entry(shards, bq, bk):
    length = 256
    seg = packed_segments(2, length)  # contiguous documents, one padding run: the ranges are exact
    index = load_balance.token_index(length, shards)
    rows = length // shards
    for device in range(shards):
        mine = slice(device * rows, (device + 1) * rows)
        steps = pallas_gpu.visited_steps(seg[:, index][:, mine], index[mine], block_q=bq, block_kv=bk,
                                         kv_segment_ids=seg, chunks=2 if shards > 1 else 1)
        want = _brute_force_pairs(seg, index, mine, bq, bk)
        assert steps.forward == want, (device, steps, want)
        if bq == bk:  # the dK/dV pass visits the same pairs, found per key block
            assert steps.dkv == want, (device, steps, want)
    # Padding that recurs: a superset, never fewer than the visible pairs.
    recurring = _segments(2, length)
    assert pallas_gpu.visited_steps(recurring, block_q=bq, block_kv=bk).forward >= _brute_force_pairs(
        recurring, np.arange(length), slice(None), bq, bk)


def test_unsharded_odd_head_dim_distinct_backward_blocks_and_recurring_padding():
    import jax
    import jax.numpy as jnp

    from nextlong_jax.model.attention.reference import reference_attention

    rng = np.random.default_rng(0)
    b, length, heads, kv_heads, d = 2, 72, 4, 2, 24  # 72 pads to 96 keys and 80 rows; D pads to 32
    q = jnp.asarray(rng.standard_normal((b, length, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, length, kv_heads, d)), jnp.float32) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray(_segments(b, length))

    @jax.jit
    def run(q, k, v, ct):
        out, pullback = jax.vjp(lambda q, k, v: pallas_gpu.pallas_gpu_attention(
            q, k, v, seg, blocks=Blocks(16, 32, 32, 8), interpret=True), q, k, v)
        return out, pullback(ct)

    out, grads = run(q, k, v, ct)
    want, pullback = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg), q, k, v)
    assert out.dtype == q.dtype and bool(jnp.isfinite(out).all())
    # Measured ~1e-6 (float32; another summation order). A wrong mask errs by ~0.5.
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    for g, w, which in zip(grads, pullback(ct), "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{which}")


@pytest.mark.multiprocess
def test_context_parallel_matches_reference_on_8_devices():
    assert "context parallel ok" in run_on_8_devices(__file__, "sharded")


@pytest.mark.compile
def test_sequence_sharded_fwd_bwd_compiles_to_triton_for_8_h100s():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "compile"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compile ok" in proc.stdout, proc.stdout


def _child_sharded() -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from nextlong_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    cases = {  # name: (mesh axes, B, L, H, K, D, blocks, called inside the caller's own shard_map)
        # 128 tokens over 4 shards: chunks of 16 rows, one query block each
        "fsdp2-sequence4": (dict(fsdp=2, sequence=4), 2, 128, 4, 2, 16, Blocks(16, 16, 16, 16), False),
        # chunks of 20 rows pad to 32; keys 80 pad to 96; heads split over tensor, GQA kept
        "fsdp2-tensor2-sequence2-ragged": (dict(fsdp=2, tensor=2, sequence=2), 2, 80, 4, 2, 16,
                                           Blocks(16, 32, 16, 16), False),
        # every axis already manual: the rows' original indices come from the device's sequence index
        "inside-shard_map-sequence4": (dict(fsdp=2, sequence=4), 2, 128, 4, 2, 16, Blocks(16, 16, 16, 16), True),
    }
    for name, (axes, b, length, heads, kv_heads, d, blocks, inside) in cases.items():
        mesh = make_mesh(**axes)
        attend = functools.partial(pallas_gpu.pallas_gpu_attention, blocks=blocks, interpret=True)
        if inside:
            attend = jax.shard_map(attend, mesh=mesh, in_specs=(P("fsdp", "sequence"),) * 4,
                                   out_specs=P("fsdp", "sequence"), check_vma=False)
        # float32; measured ~1e-6. dK/dV sum over devices (reduce-scatter) and query heads.
        errors = context_parallel_errors(attend, mesh, rng, b, length, heads, kv_heads, d, _segments(b, length),
                                         atol=2e-5, grad_atol=2e-5, grad_rtol=2e-5, name=name)
        print(name, "ok; max |error| of out, dq, dk, dv:", " ".join(f"{e:.1e}" for e in errors), flush=True)
    before, after = (_bf16_dkv_error(make_mesh(sequence=8), dtype) for dtype in (jnp.bfloat16, jnp.float32))
    print(f"bf16 dK, dV mean |error| against float32, the kernel's partials in bf16: {before}, in float32: {after}")
    # Measured: (2.25e-4, 2.37e-4) before, (1.84e-4, 1.93e-4) after; what is left is the kernels' own bf16 tiles
    # and the one cast at the end. The gain is the kernel's float32 partials: XLA:CPU runs even a bf16
    # reduce-scatter in float32 (it has none in bf16), so the dtype it crosses `sequence` in shows only in a
    # GPU program (test_sequence_sharded_fwd_bwd_compiles_to_triton_for_8_h100s).
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    print("context parallel ok")


def _bf16_dkv_error(mesh, dkv_dtype) -> tuple[float, float]:
    """The presets' case, in bf16 at D=128 with the kernel's real tiles (64-row chunks, backward 64):
    mean |error| of dK and dV summed over 8 `sequence` shards, with the kernel's dK/dV in `dkv_dtype`,
    against float32 attention of the same bf16 inputs."""
    import jax
    import jax.numpy as jnp

    from nextlong_jax.model.attention.reference import reference_attention

    rng = np.random.default_rng(1)
    length, shards = 1024, mesh.shape["sequence"]
    q = jnp.asarray(rng.standard_normal((1, length, 2, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, length, 1, 128)), jnp.bfloat16) for _ in range(2))
    ct = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    seg = jnp.ones((1, length), jnp.int32)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    _, pullback = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg), *f32[:3])
    want = pullback(f32[3])[1:]
    pallas_gpu.DKV_DTYPE = dkv_dtype  # read when the backward is traced
    attend = functools.partial(pallas_gpu.pallas_gpu_attention, blocks=Blocks(128, 128, 64, 64), interpret=True)
    zq, zk, zv, zseg, zct = (load_balance.zigzag(x, shards) for x in (q, k, v, seg, ct))
    with jax.set_mesh(mesh):
        _, pull = jax.jit(lambda q, k, v: jax.vjp(lambda q, k, v: attend(q, k, v, zseg), q, k, v))(zq, zk, zv)
        got = jax.jit(pull)(zct)[1:]
    return tuple(round(float(jnp.abs(load_balance.unzigzag(g, shards).astype(jnp.float32) - w).mean()), 6)
                 for g, w in zip(got, want))


def _child_compile() -> None:
    import time

    import jax
    import jax.numpy as jnp

    from nextlong_jax.compile_only import kernel_names
    from nextlong_jax.sharding import logical_sharding, make_mesh
    from nextlong_jax.topology import compile_only_devices, parse_topology, prepare_environment

    prepare_environment()
    mesh = make_mesh(fsdp=1, sequence=8, devices=compile_only_devices(parse_topology("h100-8")))
    b, length, heads, kv_heads, head_dim = 1, 4096, 8, 2, 128
    blocks = Blocks(64, 128, 64, 64)

    def loss(q, k, v, seg):
        return jnp.sum(pallas_gpu.pallas_gpu_attention(q, k, v, seg, blocks=blocks).astype(jnp.float32))

    q_sh = logical_sharding(mesh, ("batch", "length", "heads", "head_dim"))
    kv_sh = logical_sharding(mesh, ("batch", "length", "kv_heads", "head_dim"))
    args = (jax.ShapeDtypeStruct((b, length, heads, head_dim), jnp.bfloat16, sharding=q_sh),
            *(jax.ShapeDtypeStruct((b, length, kv_heads, head_dim), jnp.bfloat16, sharding=kv_sh),) * 2,
            jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=logical_sharding(mesh, ("batch", "length"))))
    def compile_(fn):
        with jax.set_mesh(mesh):  # abstract arrays only: concrete ones would go to the compile-only GPUs
            return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(*args).compile()

    def forward_kernels(compiled) -> int:
        return sum("custom_call_target" in line and "nextlong_mha_forward" in line
                   for line in compiled.as_text().splitlines())

    start = time.perf_counter()
    compiled = compile_(loss)
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    kernels = kernel_names(text)
    want = {f"__gpu$xla.gpu.triton:nextlong_mha_{k}" for k in ("forward", "backward_dq", "backward_dkv")}
    assert want <= set(kernels), kernels
    assert "all-gather" in text and "reduce-scatter" in text  # K/V gathered; dK/dV back to their owners
    # ... in float32: every array the reduce-scatters take and give (bf16 if DKV_DTYPE were bfloat16).
    scattered = re.findall(r"= \((.*?)\) reduce-scatter-start\(", text)
    assert scattered and all(set(re.findall(r"(\w+)\[", shapes)) == {"f32"} for shapes in scattered), scattered
    assert f"{length},{length}" not in text  # no [L, L] mask or score array anywhere
    print(kernels, f"compile {seconds:.1f}s temp MiB", round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1))
    # Under remat the backward re-runs the forward kernel, unless its named residuals are saved.
    saved = jax.checkpoint_policies.save_only_these_names(PALLAS_GPU_RESIDUALS)
    assert forward_kernels(compiled) == 1
    assert forward_kernels(compile_(jax.checkpoint(loss))) == 2
    assert forward_kernels(compile_(jax.checkpoint(loss, policy=saved))) == 1
    print("compile ok")


if __name__ == "__main__":
    {"sharded": _child_sharded, "compile": _child_compile}[sys.argv[1]]()
