"""Zig-zag load balancing is an exact permutation; ring attention and the ring-attention Llama equal
their single-device counterparts in value and gradient on meshes of 8 virtual CPU devices.

Mesh checks run in child interpreters (the device count is fixed before jax initialises), so the
pytest process keeps its single CPU device for every other test module.
"""

from __future__ import annotations

import sys

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
    assert "attention ok" in run_on_8_devices(__file__, "attention")


@pytest.mark.multiprocess
def test_ring_llama_loss_and_grads_match_single_device():
    assert "model ok" in run_on_8_devices(__file__, "model")


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


def _child_model() -> None:
    import jax

    from nextlong_jax.model.config import LlamaConfig
    from nextlong_jax.model.llama import Llama
    from nextlong_jax.model.runtime import Runtime
    from nextlong_jax.sharding import axis_rules, logical_sharding, logical_shardings, make_mesh

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    runtime = Runtime(attention_backend="blockwise", attention_block_size=8)
    model, ring_model = Llama(config, runtime), Llama(config, runtime.replace(attention_backend="ring"))
    b, length, shards = 4, 64, 4
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (b, length)).astype(np.int32)
    segments = packed_segments(b, length)
    starts = np.concatenate([np.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    index = np.arange(length)[None].repeat(b, 0)
    positions = (index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)).astype(np.int32)
    weights = np.where(segments > 0, rng.choice([1.0, 0.3], (b, length)), 0.0).astype(np.float32)
    params = model.init(jax.random.key(0), ids, positions, segments)

    def single_device_loss(p):
        nll, w = model.apply(p, ids, positions, segments, weights, method=Llama.loss_pieces)
        return nll / w

    want, want_grads = jax.jit(jax.value_and_grad(single_device_loss))(params)

    # Targets are shifted in the original order (the convention of nextlong_jax.model.loss), then
    # every feature is reordered together.
    same_doc = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    targets = np.pad(ids[:, 1:], ((0, 0), (0, 1)))
    target_weights = np.pad(np.where(same_doc, weights[:, 1:], 0.0), ((0, 0), (0, 1))).astype(np.float32)
    batch = load_balance.reorder(dict(input_ids=ids, positions=positions, segment_ids=segments, targets=targets,
                                      target_weights=target_weights), shards)

    def ring_loss(p, batch):
        hidden = ring_model.apply(p, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                  method=Llama.hidden_states)
        logits = jnp.einsum("ble,ev->blv", hidden, ring_model.apply(p, method=Llama.head))
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
        return jnp.sum(nll * batch["target_weights"]) / jnp.sum(batch["target_weights"])

    mesh = make_mesh(data=2, fsdp=1, tensor=1, sequence=shards)
    tokens = logical_sharding(mesh, ("batch", "length"))
    batch = {name: jax.device_put(x, tokens) for name, x in batch.items()}
    with jax.set_mesh(mesh), axis_rules():
        got, grads = jax.jit(jax.value_and_grad(ring_loss))(jax.device_put(params, logical_shardings(params, mesh)),
                                                            batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # Error relative to each leaf's scale: ~5e-7 measured; a wrong token order gives ~0.5.
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        error = float(jnp.abs(g - w).max() / jnp.abs(w).max())
        assert error < 1e-5, (jax.tree_util.keystr(path), error)
    print("model ok", float(got), float(want))


if __name__ == "__main__":
    {"attention": _child_attention, "model": _child_model}[sys.argv[1]]()
