"""Zig-zag load balancing is an exact permutation; ring attention equals the single-device attention in
value and gradient on meshes of 8 virtual CPU devices (the ring-attention Llama's train step:
test_train_ring.py).

Mesh checks run in child interpreters (the device count is fixed before jax initialises), so the
pytest process keeps its single CPU device for every other test module.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import packed_segments
from multidevice import run_on_8_devices
from nextlong_jax import load_balance


@pytest.mark.parametrize("length,shards", [(8, 1), (8, 4), (24, 3), (64, 4), (96, 8), (32, 16)])
def test_zigzag_is_an_exact_invertible_permutation(length, shards):
    x = np.random.default_rng(length + shards).standard_normal((3, length, 2)).astype(np.float32)
    moved = load_balance.zigzag(x, shards)
    assert sorted(moved.reshape(-1).tolist()) == sorted(x.reshape(-1).tolist())
    np.testing.assert_array_equal(load_balance.unzigzag(moved, shards), x)
    on_device = load_balance.unzigzag(load_balance.zigzag(jnp.asarray(x), shards), shards)
    np.testing.assert_array_equal(np.asarray(on_device), x)
    # token_index names where each zig-zag position came from
    np.testing.assert_array_equal(moved, x[:, load_balance.token_index(length, shards)])


def test_device_i_holds_chunks_i_and_mirror():
    shards, chunk = 4, 3
    index = load_balance.token_index(2 * shards * chunk, shards).reshape(shards, 2, chunk) // chunk
    for i in range(shards):
        assert set(index[i, 0]) == {i} and set(index[i, 1]) == {2 * shards - 1 - i}


def test_reorder_moves_every_feature_the_same_way():
    ids = np.arange(2 * 16).reshape(2, 16)
    batch = {"input_ids": ids, "loss_weights": ids * 0.5, "segment_ids": ids + 1}
    out = load_balance.reorder(batch, 2)
    np.testing.assert_array_equal(out["loss_weights"], out["input_ids"] * 0.5)
    np.testing.assert_array_equal(out["segment_ids"], out["input_ids"] + 1)
    with pytest.raises(ValueError, match="one B and L"):
        load_balance.reorder({**batch, "positions": np.zeros((2, 8))}, 2)
    with pytest.raises(ValueError, match="divisible by 2 \\* num_shards"):
        load_balance.reorder(batch, 3)


def test_ring_without_sequence_axis_is_blockwise():
    from nextlong_jax.model.attention import Blocks, attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 2, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(np.asarray(attention(q, k, v, backend="ring", blocks=Blocks(8))),
                               np.asarray(attention(q, k, v, backend="reference")), atol=1e-5)


@pytest.mark.multiprocess
def test_ring_attention_matches_reference_on_8_devices():
    assert "attention ok" in run_on_8_devices(__file__)


def _child_attention() -> None:
    import jax

    from nextlong_jax.model.attention import Blocks, attention
    from nextlong_jax.model.attention.ring import ring_attention
    from nextlong_jax.sharding import make_mesh

    rng = np.random.default_rng(0)
    b, length = 4, 64
    cases = {  # name: (mesh axes, heads, kv heads, zig-zag?, packed segments?)
        "zigzag-gqa-packed": (dict(data=2, fsdp=1, sequence=4), 4, 2, True, True),
        "contiguous-mha": (dict(data=2, fsdp=1, sequence=4), 4, 4, False, False),
        "contiguous-gqa-packed": (dict(data=2, fsdp=1, sequence=4), 6, 2, False, True),
        "zigzag-tensor-fsdp": (dict(data=1, fsdp=2, tensor=2, sequence=2), 4, 2, True, True),
    }
    for name, (axes, heads, kv_heads, zigzag, packed) in cases.items():
        mesh = make_mesh(**axes)
        shards = mesh.shape["sequence"]
        q = jnp.asarray(rng.standard_normal((b, length, heads, 8)), jnp.float32)
        k, v = (jnp.asarray(rng.standard_normal((b, length, kv_heads, 8)), jnp.float32) for _ in range(2))
        ct = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
        seg = jnp.asarray(packed_segments(b, length) if packed else np.ones((b, length), np.int32))

        def ring(q, k, v):
            if not zigzag:
                return ring_attention(q, k, v, seg, blocks=Blocks(8), token_index=jnp.arange(length))
            out = attention(*(load_balance.zigzag(x, shards) for x in (q, k, v, seg)), backend="ring", blocks=Blocks(8))
            return load_balance.unzigzag(out, shards)

        def value_and_grads(fn):
            return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))

        want, want_grads = value_and_grads(lambda q, k, v: attention(q, k, v, seg, backend="reference"))(q, k, v)
        with jax.set_mesh(mesh):
            got, grads = value_and_grads(ring)(q, k, v)
            out = jax.jit(ring)(q, k, v)
        assert len(out.sharding.device_set) == 8, name
        np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q, k, v, seg, backend="reference")),
                                   atol=2e-5, err_msg=name)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=name)
        for g, w, which in zip(grads, want_grads, "qkv"):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4, err_msg=f"{name} d{which}")
        print(name, "ok")
    print("attention ok")


if __name__ == "__main__":
    _child_attention()
