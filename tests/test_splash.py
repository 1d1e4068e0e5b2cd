"""Splash attention (Pallas TPU kernel) without a TPU: its vectorised mask tables equal splash's own,
the Pallas interpreter on 8 virtual CPU devices matches the reference attention in value and
gradients (data/fsdp/tensor sharding and zig-zag context parallelism), kernels are built once, and
the real TPU kernel compiles ahead of time for a v5p topology, with a grid axis for both TensorCores of
a v5p chip in every kernel (dK/dV included) and dK/dV reduce-scattered over `sequence` in float32.

Mesh and TPU checks run in child interpreters: the device count and platform are fixed before jax
initialises, and the pytest process keeps its single CPU device for every other test module.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import context_parallel_errors, packed_segments
from multidevice import ROOT, run_on_8_devices
from nextlong_jax import load_balance
from nextlong_jax.model.attention import Blocks, splash
from nextlong_jax.model.attention.backends import SPLASH_RESIDUALS


@pytest.mark.parametrize("length,shards,bq,bk", [(1024, 1, 128, 128), (1024, 1, 256, 512), (1024, 2, 256, 128),
                                                 (1024, 4, 128, 128), (2048, 4, 256, 512), (4096, 8, 256, 256)])
def test_mask_tables_equal_splash_process_mask(length, shards, bq, bk):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info_lib

    q_sequence = load_balance.token_index(length, shards)
    mask = mask_lib.CausalMask((length, length))
    mask.q_sequence = q_sequence  # original token index of each (zig-zag) query row
    heads = mask_lib.MultiHeadMask([mask] * 2)
    for dkv, shrink in [(False, True), (True, True), (True, False)]:  # forward/dq, dkv, fused dkv
        want, _ = info_lib._process_mask(heads, (bq, bk), dkv, head_shards=1, q_seq_shards=shards,
                                         shrink_grid=shrink)
        got = splash._mask_info(q_sequence, length, (bq, bk), shards, dkv=dkv, shrink=shrink)
        for field in want._fields:
            w, g = getattr(want, field), getattr(got, field)
            assert (w is None) == (g is None), field
            if w is not None:
                assert w.dtype == g.dtype, field
                np.testing.assert_array_equal(g, w, err_msg=f"{field} dkv={dkv} shrink={shrink}")


def test_kernel_is_built_once_from_the_vectorised_tables(monkeypatch):
    """A 64K kernel's tables come from `_mask_info` (numpy, milliseconds), never from splash's own
    per-block `process_mask` (~20 s at 64K on 2 cores), and a second lookup builds nothing."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as info_lib

    def refused(*args, **kwargs):
        raise AssertionError("splash's per-block process_mask was called")

    for name in ("_process_mask", "process_mask", "process_mask_dkv", "process_dynamic_mask",
                 "process_dynamic_mask_dkv"):
        monkeypatch.setattr(info_lib, name, refused)
    built = []
    vectorised = splash._mask_info
    monkeypatch.setattr(splash, "_mask_info", lambda *a, **kw: built.append(kw["dkv"]) or vectorised(*a, **kw))
    blocks = Blocks(512, 512, 512, 512)
    splash._kernel.cache_clear()
    first = splash._kernel(65536, 4, blocks, False)
    assert built == [False, False, True]  # forward, dq, dkv: one table each
    assert splash._kernel(65536, 4, blocks, False) is first
    assert splash._kernel.cache_info().misses == 1 and built == [False, False, True]
    # Every trace of the attention looks the kernel up: retracing builds nothing.
    import jax
    import jax.numpy as jnp

    q, kv, seg = jnp.zeros((1, 256, 2, 128)), jnp.zeros((1, 256, 1, 128)), jnp.ones((1, 256), jnp.int32)
    for _ in range(2):
        jax.make_jaxpr(lambda q, k, v: splash.splash_attention(q, k, v, seg, blocks=blocks, interpret=True))(q, kv, kv)
    assert splash._kernel.cache_info().misses == 2
    # Blocks are clamped to the layout before the lookup: oversized ones hit the same kernel.
    assert splash._clamp(Blocks(4096, 512, 4096, 512), 4096, 4) == (512, 512, 512, 512, False, 512, 512)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash._clamp(Blocks(192, 512, 512, 512), 4096, 1)
    # Compute blocks default to the fetched kv blocks and must divide them.
    assert splash._clamp(Blocks(2048, 2048, 2048, 2048, kv_compute=512), 8192, 1)[5:] == (512, 2048)
    with pytest.raises(ValueError, match="kv_bwd_compute=384 must be a multiple of 128 dividing 1024"):
        splash._clamp(Blocks(512, 1024, 512, 1024, kv_bwd_compute=384), 4096, 1)


def test_kv_head_groups_give_jax_splash_numbers(monkeypatch):
    """The kernel vmapped over kv-head groups (`CORE_GROUPS`, for the two TensorCores) equals one call of
    jax's splash over all heads, in value and gradients (bf16, D=128, the interpreter)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 256, 4, 128)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 128)), jnp.bfloat16) for _ in range(2))
    seg = jnp.asarray(packed_segments(1, 256))

    def grads(groups):
        monkeypatch.setattr(splash, "CORE_GROUPS", groups)
        attend = functools.partial(splash.splash_attention, blocks=Blocks(128, 128, 128, 128), interpret=True)
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, seg), q, k, v)
        return out, *vjp(jnp.ones_like(out))

    for grouped, whole in zip(grads(2), grads(1), strict=True):
        np.testing.assert_array_equal(np.asarray(grouped, np.float32), np.asarray(whole, np.float32))


@pytest.mark.multiprocess
def test_splash_matches_reference_on_8_devices():
    assert "splash ok" in run_on_8_devices(__file__, "attention")


@pytest.mark.compile
def test_splash_compiles_for_tpu_v5p():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_WORKER_HOSTNAMES": "localhost",
           "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, __file__, "tpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tpu compile ok" in proc.stdout


def _child_attention() -> None:
    from nextlong_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    b, heads, kv_heads, head_dim = 4, 4, 2, 128
    blocks = Blocks(128, 128, 128, 128)
    cases = {  # name: (mesh axes, length, blocks)
        "data-fsdp-tensor": (dict(data=2, fsdp=2, tensor=2, sequence=1), 512, blocks),
        "fused-bwd": (dict(data=2, fsdp=2, tensor=2, sequence=1), 512, blocks._replace(kv=256, fused_bwd=True)),
        "fsdp-tensor-sequence": (dict(data=1, fsdp=2, tensor=2, sequence=2), 512, blocks),
        "sequence4-fsdp": (dict(data=1, fsdp=2, tensor=1, sequence=4), 1024, blocks._replace(kv=256, kv_bwd=256)),
        "kv-compute": (dict(data=2, fsdp=2, tensor=2, sequence=1), 512,
                       blocks._replace(kv=256, kv_bwd=256, kv_compute=128, kv_bwd_compute=128)),
    }
    for name, (axes, length, case_blocks) in cases.items():
        attend = functools.partial(splash.splash_attention, blocks=case_blocks, interpret=True)
        # float32 throughout; the kernel sums in another order (online softmax over 128-blocks,
        # q pre-scaled): ~2e-6 on out and dq, ~8e-6 on dk/dv measured. A wrong mask errs by ~0.5.
        errors = context_parallel_errors(attend, make_mesh(**axes), rng, b, length, heads, kv_heads, head_dim,
                                         packed_segments(b, length), atol=2e-5, grad_atol=5e-5, grad_rtol=1e-4,
                                         name=name)
        print(name, "ok; max |error| of out, dq, dk, dv:", " ".join(f"{e:.1e}" for e in errors), flush=True)
    print("splash ok")


def _child_tpu() -> None:
    import re

    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh

    from nextlong_jax.sharding import MESH_AXES, logical_sharding

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
    assert len(devices) == 4 and "TPU v5" in devices[0].device_kind, devices
    b, length, heads, kv_heads, head_dim = 4, 1024, 8, 2, 128

    def loss(q, k, v, seg):
        return jnp.sum(splash.splash_attention(q, k, v, seg).astype(jnp.float32))

    def program(fn, mesh, args) -> str:
        with jax.set_mesh(mesh):  # only abstract arrays in here: concrete ones would go to the TPU
            compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2))).lower(*args).compile()
        assert compiled.memory_analysis().temp_size_in_bytes > 0
        return compiled.as_text()

    def kernels(text: str) -> int:
        return sum("tpu_custom_call" in line for line in text.splitlines())

    for shape in [(1, 2, 2, 1), (1, 2, 1, 2)]:  # tensor-parallel heads; zig-zag context parallelism
        mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 4)
        q_sh = logical_sharding(mesh, ("batch", "length", "heads", "head_dim"))
        kv_sh = logical_sharding(mesh, ("batch", "length", "kv_heads", "head_dim"))
        args = (jax.ShapeDtypeStruct((b, length, heads, head_dim), jnp.bfloat16, sharding=q_sh),
                *(jax.ShapeDtypeStruct((b, length, kv_heads, head_dim), jnp.bfloat16, sharding=kv_sh),) * 2,
                jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=logical_sharding(mesh, ("batch", "length"))))
        text = program(loss, mesh, args)
        assert kernels(text) == 3, shape  # forward, dq, dK/dV
        print(shape, "ok", flush=True)
    # Over sequence=2 (the last mesh) dK/dV return to their owners in float32. Checked in the TPU program:
    # XLA:CPU runs a bf16 reduce-scatter in float32 (it has none in bf16), so CPU devices show no difference.
    scattered = re.findall(r"= (\w+\[[\d,]+\])\{[^}]*\} reduce-scatter\(", text)
    assert scattered == [f"f32[{b // 2},{length // 2},{kv_heads},{head_dim}]"] * 2, scattered
    # One row per device (b=2 over fsdp=2): the kv-head groups are each kernel's leading, parallel grid axis.
    one_row = (jax.ShapeDtypeStruct((2, *args[0].shape[1:]), jnp.bfloat16, sharding=q_sh),
               *(jax.ShapeDtypeStruct((2, *args[1].shape[1:]), jnp.bfloat16, sharding=kv_sh),) * 2,
               jax.ShapeDtypeStruct((2, length), jnp.int32, sharding=args[3].sharding))
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*one_row).as_text()
    grids = _mosaic_grids(lowered)
    assert {name.split("_segmented")[0] for name in grids} == {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}
    for name, (semantics, bounds) in grids.items():
        assert semantics[0] == "parallel" and bounds[0] == splash.CORE_GROUPS, (name, semantics, bounds)
    # Under remat the backward re-runs the forward kernel, unless the kernel's residuals are saved.
    saved = jax.checkpoint_policies.save_only_these_names(SPLASH_RESIDUALS)
    assert kernels(program(jax.checkpoint(loss, policy=saved), mesh, args)) == 3
    assert kernels(program(jax.checkpoint(loss), mesh, args)) == 4
    print("tpu compile ok")


def _mosaic_grids(lowered_text: str) -> dict[str, tuple[list[str], list[int]]]:
    """Each Mosaic kernel of a lowered program by name: its grid's dimension semantics and bounds, read
    from the kernel module each TPU custom call carries (MLIR bytecode in its backend config)."""
    import base64
    import re

    from jax._src.interpreters import mlir
    from jax._src.lib import tpu
    from jax._src.lib.mlir import ir

    context = mlir.make_ir_context()
    tpu.register_dialect(context)
    context.allow_unregistered_dialects = True  # the serialised module's own dialect name
    grids = {}
    for body in re.findall(r"\\22body\\22: \\22([A-Za-z0-9+/=]+)", lowered_text):
        with context:
            for op in ir.Module.parse(base64.b64decode(body)).body.operations:
                if "dimension_semantics" in op.attributes:
                    semantics = [re.search(r"<(\w+)>", str(a))[1] for a in ir.ArrayAttr(op.attributes["dimension_semantics"])]
                    grids[ir.StringAttr(op.attributes["sym_name"]).value] = (
                        semantics, list(ir.DenseI64ArrayAttr(op.attributes["iteration_bounds"])))
    return grids


if __name__ == "__main__":
    {"attention": _child_attention, "tpu": _child_tpu}[sys.argv[1]]()
