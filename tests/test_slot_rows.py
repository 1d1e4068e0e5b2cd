"""Rows of documents in slots (a manifest's `document_len`) train as rows of the slot length: the
same loss and gradients as the masked full-length row, on 8 devices with the length sharded, at a
fraction of the attention work, counted from the compiled program and from the kernels' tables.
"""

from __future__ import annotations

import numpy as np
import pytest

from multidevice import run_on_8_devices

LENGTH, SLOTS = 128, 4


def _slotted_batch(b: int = 4) -> dict[str, np.ndarray]:
    """Four slots of 32 tokens per row, each one document (some short, padded) or empty; every role."""
    rng = np.random.default_rng(0)
    width = LENGTH // SLOTS
    seg = np.zeros((b, LENGTH), np.int32)
    positions = np.zeros((b, LENGTH), np.int32)
    doc = 0
    for row in range(b):
        for slot in range(SLOTS):
            used = [width, width - 5, 9, 0][(row + slot) % 4]
            if used:
                doc += 1
                seg[row, slot * width:slot * width + used] = doc
                positions[row, slot * width:slot * width + used] = np.arange(used)
    roles = np.where(seg > 0, rng.integers(1, 3, (b, LENGTH)), 0)
    weights = np.where(seg > 0, rng.choice([1.0, 0.3], (b, LENGTH)), 0.0).astype(np.float32)
    return dict(input_ids=rng.integers(0, 256, (b, LENGTH)).astype(np.int32), segment_ids=seg,
                positions=positions, token_roles=roles.astype(np.int32), loss_weights=weights)


@pytest.mark.multiprocess
def test_slot_rows_train_like_the_masked_rows_on_8_devices():
    assert "slot rows ok" in run_on_8_devices(__file__)


def test_a_slot_row_costs_an_eighth_of_the_attention():
    """Attention of 8 x 512 vs 1 x 4096 tokens: FLOPs from XLA's cost analysis of the compiled forward and
    backward (the dense reference, whose cost is all in the program), and equal outputs."""
    import jax
    import jax.numpy as jnp

    from nextlong_jax.model.attention import attention

    length, slots, heads, d = 4096, 8, 2, 16
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, length, heads, d)), jnp.float32) for _ in range(3))
    segments = jnp.asarray(1 + np.arange(length)[None] // (length // slots), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, seg, backend="reference") ** 2)

    def flops(*args):
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().cost_analysis()["flops"]

    rows = [x.reshape(slots, length // slots, *x.shape[2:]) for x in (q, k, v, segments)]
    ratio = flops(*rows) / flops(q, k, v, segments)
    assert ratio <= 1 / 6, ratio
    full = attention(q, k, v, segments, backend="reference")
    np.testing.assert_allclose(np.asarray(attention(*rows, backend="reference")).reshape(full.shape), full, atol=1e-5)


def test_splash_tables_of_slot_rows_at_512k():
    """The 512K stage's packed third: 8 x 64K rows against one 512K row, in splash's own block tables
    (non-empty forward blocks: what its grid computes), over 8 sequence shards, blocks 512."""
    from nextlong_jax import load_balance
    from nextlong_jax.model.attention import splash

    def blocks_computed(length: int, shards: int = 8, block: int = 512) -> int:
        info = splash._mask_info(load_balance.token_index(length, shards), length, (block, block), shards,
                                 dkv=False, shrink=False)
        return int(np.count_nonzero(info.block_mask))

    ratio = 8 * blocks_computed(65536) / blocks_computed(524288)
    assert ratio <= 1 / 6, ratio


def _child() -> None:
    import jax

    from nextlong_jax.host_data import global_batch
    from nextlong_jax.model.config import LlamaConfig
    from nextlong_jax.model.runtime import Runtime
    from nextlong_jax.sharding import axis_rules
    from nextlong_jax.train_config import Config, DataConfig, MeshConfig, OptimizerConfig
    from nextlong_jax.train_setup import build, build_mesh, init_state, jit_step

    model = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    runtime = Runtime(attention_block_size=8, logits_block_size=32)
    batch = _slotted_batch()

    def one_step(config, slots):
        mesh = build_mesh(config)
        with jax.set_mesh(mesh), axis_rules():
            setup = build(config, mesh)
            state, step = init_state(setup, 0), jit_step(setup, config.optimizer.grad_accum, slots)
            before = jax.tree.map(np.asarray, state.params)  # the step donates the state
            inputs = global_batch(batch, setup.batch_sharding)
            # The slot step really runs on [B * slots, L / slots] rows.
            assert slots == 1 or f"{4 * slots}x{LENGTH // slots}xi32" in step.lower(state, inputs).as_text()
            state, m = step(state, inputs)
            updates = jax.tree.map(lambda new, old: np.asarray(new) - old, state.params, before)
            return [float(m[k]) for k in ("loss", "meta_loss", "negative_loss", "grad_norm")], updates

    # One mesh with every axis a slot row meets (rows over fsdp, heads over tensor, the length over sequence)
    # and gradient accumulation: every further mesh would cost two more step compiles.
    mesh = MeshConfig(data=1, fsdp=2, tensor=2, sequence=2)
    # eps >> |g| and no decay: the first update is lr * gradient, so updates compare gradients.
    config = Config(model=model, runtime=runtime, data=DataConfig(seq_len=LENGTH, batch_size=4), mesh=mesh,
                    optimizer=OptimizerConfig(learning_rate=100.0, eps=1.0, weight_decay=0.0, grad_accum=2))
    want, want_updates = one_step(config, 1)
    got, updates = one_step(config, SLOTS)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    for (path, u), w in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(want_updates)):
        error = float(np.abs(u - w).max() / np.abs(w).max())
        assert error < 1e-5, (mesh, jax.tree_util.keystr(path), error)
    print("slot rows ok", got)


if __name__ == "__main__":
    _child()
