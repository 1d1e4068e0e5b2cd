"""A train step on (data=2, fsdp=2, tensor=2) of 8 virtual CPU devices == the same step on one device
(the loss's head gathered once or at every vocabulary block).

The device count is fixed before jax starts, so the check runs in a child interpreter.
"""

from __future__ import annotations

import pytest

from multidevice import run_on_8_devices

pytestmark = pytest.mark.multiprocess


def test_sharded_train_step_matches_single_device():
    assert "sharded step ok" in run_on_8_devices(__file__)


def _child() -> None:
    import dataclasses

    import jax
    import numpy as np

    from nextlong_jax.sharding import axis_rules, make_mesh
    from nextlong_jax.host_data import global_batch
    from nextlong_jax.train_setup import build, init_state, jit_step
    from nextlong_jax.train_config import Config, DataConfig, MeshConfig, OptimizerConfig
    from nextlong_jax.model.config import LlamaConfig
    from nextlong_jax.model.runtime import Runtime

    model = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    config = Config(model=model, runtime=Runtime(attention_block_size=16, logits_block_size=32),
                    data=DataConfig(seq_len=64, batch_size=4),
                    optimizer=OptimizerConfig(learning_rate=1e-2, grad_accum=2), mesh=MeshConfig(2, 2, 2, 1))
    rng = np.random.default_rng(0)
    seg = np.repeat(np.array([[1] * 40 + [2] * 20 + [0] * 4]), 4, 0).astype(np.int32)
    batch = dict(input_ids=rng.integers(0, 256, (4, 64)).astype(np.int32), segment_ids=seg,
                 positions=np.concatenate([np.arange(40), np.arange(20), np.zeros(4)])[None].repeat(4, 0).astype(np.int32),
                 token_roles=np.where(seg > 0, rng.integers(1, 3, (4, 64)), 0).astype(np.int32),
                 loss_weights=(seg > 0).astype(np.float32))

    def two_steps(mesh, cfg):
        with jax.set_mesh(mesh), axis_rules():
            setup = build(cfg, mesh)
            state, step = init_state(setup, 0), jit_step(setup, cfg.optimizer.grad_accum)
            losses = []
            for _ in range(2):
                state, m = step(state, global_batch(batch, setup.batch_sharding))
                losses.append([float(m[k]) for k in ("loss", "meta_loss", "negative_loss", "grad_norm")])
            return np.array(losses), state

    want, _ = two_steps(make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]), dataclasses.replace(config, mesh=MeshConfig(1, 1, 1, 1)))
    got, state = two_steps(make_mesh(2, 2, 2, 1), config)
    q = state.params["layers"]["attn"]["q_proj"]
    assert tuple(q.sharding.spec) == (None, ("fsdp", "sequence"), "tensor", None), q.sharding.spec
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state) if "q_proj" in jax.tree_util.keystr(path)]
    assert len(moments) == 2 and all(m.sharding == q.sharding for m in moments)  # Adam's mu and nu
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # The loss's head gathered and reduced at every vocabulary block instead (runtime.loss_gathers_head false)
    per_block = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, loss_gathers_head=False))
    np.testing.assert_allclose(two_steps(make_mesh(2, 2, 2, 1), per_block)[0], want, rtol=2e-5)
    print("sharded step ok", got[:, 0])


if __name__ == "__main__":
    _child()
