"""Sharded forward/loss on a (data=2, fsdp=2, tensor=2) mesh of 8 virtual CPU devices == unsharded.

The device count must be fixed before jax initialises, so the check runs in a child interpreter;
the pytest process keeps its single CPU device for every other test module.
"""

from __future__ import annotations

import pytest

from multidevice import run_on_8_devices

pytestmark = pytest.mark.multiprocess


def test_mesh_shape_resolves_minus_one():
    from nextlong_jax.sharding import mesh_shape

    assert mesh_shape(8, data=2, fsdp=-1, tensor=2) == (2, 2, 2, 1)
    for bad in (dict(data=-1, fsdp=-1), dict(data=3, fsdp=-1), dict(data=2, fsdp=2, tensor=1)):
        try:
            mesh_shape(8, **bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")


def test_logical_rules_shard_params_and_activations_differently():
    import flax.linen as nn

    from nextlong_jax.sharding import LOGICAL_AXIS_RULES

    params = nn.logical_to_mesh_axes(("embed", "heads", "head_dim"), LOGICAL_AXIS_RULES)
    assert tuple(params) == (("fsdp", "sequence"), "tensor", None)
    # batch takes fsdp first, so activations keep embed whole
    spec = nn.logical_to_mesh_axes(("batch", "length", "embed"), LOGICAL_AXIS_RULES)
    assert tuple(spec) == (("data", "fsdp"), "sequence", None)


def test_sharded_forward_and_loss_match_unsharded():
    assert "sharded ok" in run_on_8_devices(__file__)


def _child() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nextlong_jax.model.config import LlamaConfig
    from nextlong_jax.model.llama import Llama
    from nextlong_jax.model.runtime import Runtime
    from nextlong_jax.sharding import axis_rules, logical_sharding, logical_shardings, make_mesh

    assert jax.device_count() == 8
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = Llama(config, Runtime(attention_backend="blockwise", attention_block_size=16))
    b, length = 4, 64
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (b, length)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 40 + [2] * 20 + [0] * 4]), b, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(40), np.arange(20), np.zeros(4)])[None].repeat(b, 0).astype(np.int32)
    weights = (segments > 0).astype(np.float32)
    params = model.init(jax.random.key(0), ids, positions, segments)

    def loss_and_grad(p, *batch):
        def loss(p):
            nll, w = model.apply(p, *batch, method=Llama.loss_pieces)
            return nll / w
        return jax.value_and_grad(loss)(p)

    want_logits = jax.jit(model.apply)(params, ids, positions, segments)
    want_loss, want_grad = jax.jit(loss_and_grad)(params, ids, positions, segments, weights)

    mesh = make_mesh(data=2, fsdp=2, tensor=2, sequence=1)
    shardings = logical_shardings(params, mesh)
    q_spec = shardings["params"]["layers"]["attn"]["q_proj"].spec
    assert tuple(q_spec) == (None, ("fsdp", "sequence"), "tensor", None), q_spec
    sharded = jax.device_put(params, shardings)
    tokens = logical_sharding(mesh, ("batch", "length"))
    batch = [jax.device_put(x, tokens) for x in (ids, positions, segments, weights)]
    with jax.set_mesh(mesh), axis_rules():
        logits = jax.jit(model.apply)(sharded, *batch[:3])
        loss, grad = jax.jit(loss_and_grad)(sharded, *batch)
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4)
    print("sharded ok", float(jnp.abs(logits - want_logits).max()))


if __name__ == "__main__":
    _child()
