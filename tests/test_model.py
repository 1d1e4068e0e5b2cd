"""Logit parity with transformers' LlamaForCausalLM (fp32, random weights) and model invariants."""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.loss import target_loss
from nextlong_jax.model.runtime import Runtime
from nextlong_jax.testing import hf_logits, hf_model, params_from_hf, tiny_hf_dict

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
CONFIGS = {
    "gqa-untied": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope-head_dim32": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0, head_dim=32),
    "linear-rope-odd-vocab": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, vocab_size=257),
    # length 100 > max_position_embeddings 32, so the NTK base actually grows
    "dynamic-rope": dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=32),
}
TOL = 1e-4


def _ours(hf_dict, model, **runtime):
    config = LlamaConfig.from_hf_dict(dict(hf_dict))
    return Llama(config, Runtime(attention_backend="blockwise", attention_block_size=32, **runtime)), \
        params_from_hf(model, config)


def _forward(model, params, ids, positions, segments):
    return np.asarray(jax.jit(model.apply)({"params": params}, ids, positions, segments))


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_match_transformers(overrides):
    hf_dict = tiny_hf_dict(**copy.deepcopy(overrides))  # transformers edits rope dicts in place
    model = hf_model(hf_dict)
    ours, params = _ours(hf_dict, model)
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 100))
    positions = np.broadcast_to(np.arange(100), ids.shape)
    want = hf_logits(model, ids)
    assert np.abs(want).max() > 1.0  # weights wide enough that the comparison means something
    np.testing.assert_allclose(_forward(ours, params, ids, positions, np.ones_like(ids)), want, atol=TOL, rtol=0)


def test_packed_segments_match_each_document_alone():
    hf_dict = tiny_hf_dict(rope_scaling=dict(LLAMA3_SCALING))
    model = hf_model(hf_dict)
    ours, params = _ours(hf_dict, model)
    lengths = [37, 50, 29]
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, ours.config.vocab_size, n) for n in lengths]
    pad = 12
    ids = np.concatenate(docs + [np.zeros(pad, int)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)])[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad, int)])[None]
    got = _forward(ours, params, ids, positions, segments)
    start = 0
    for doc in docs:
        want = hf_logits(model, doc[None])
        np.testing.assert_allclose(got[:, start:start + len(doc)], want, atol=TOL, rtol=0)
        start += len(doc)


@pytest.fixture(scope="module")
def small():
    model = Llama(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2),
                  Runtime(attention_backend="blockwise", attention_block_size=16, logits_block_size=24))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (2, 40)).astype(np.int32)
    segments = np.array([[1] * 25 + [2] * 12 + [0] * 3, [1] * 40], np.int32)
    positions = np.array([list(range(25)) + list(range(12)) + [0] * 3, list(range(40))], np.int32)
    weights = rng.uniform(0.5, 1.0, ids.shape).astype(np.float32) * (segments > 0)
    params = model.init(jax.random.key(0), ids, positions, segments)["params"]
    return model, params, (ids, positions, segments, weights)


def _dense_loss(model, params, ids, positions, segments, weights):
    logits = model.apply({"params": params}, ids, positions, segments)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    keep = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    w = jnp.where(keep, weights[:, 1:], 0.0)
    return jnp.sum(nll * w), jnp.sum(w)


def test_blocked_loss_equals_dense_loss_and_gradient(small):
    model, params, batch = small

    def blocked(p):
        nll, w = model.apply({"params": p}, *batch, method=Llama.loss_pieces)
        return nll / w

    def dense(p):
        nll, w = _dense_loss(model, p, *batch)
        return nll / w

    (got, got_grad), (want, want_grad) = (jax.jit(jax.value_and_grad(f))(params) for f in (blocked, dense))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_target_loss_gradient_and_per_token_nll():
    """The loss's hand-written VJP: hidden, head AND weight gradients equal autodiff of the dense loss
    (block size 7 leaves a padded last block); the per-token nll equals the dense one and carries no
    gradient."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((2, 19, 8)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((8, 11)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 19)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 2, (2, 19)), jnp.float32)

    def dense_nll(h, w_head):
        logits = h @ w_head
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def blocked(h, w_head, w):
        return target_loss(h, w_head, targets, w, block_size=7)[0]

    got = jax.grad(blocked, argnums=(0, 1, 2))(hidden, head, weights)
    want = jax.grad(lambda h, w_head, w: jnp.sum(dense_nll(h, w_head) * w), argnums=(0, 1, 2))(hidden, head, weights)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    _, weight_sum, nll = target_loss(hidden, head, targets, weights, block_size=7)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(dense_nll(hidden, head)), rtol=1e-5)
    np.testing.assert_allclose(float(weight_sum), float(weights.sum()), rtol=1e-6)
    no_grad = jax.grad(lambda h: jnp.sum(target_loss(h, head, targets, weights, block_size=7)[2]))(hidden)
    assert not np.any(np.asarray(no_grad))


def _loss_and_grad(model, params, batch):
    def f(p):
        nll, w = model.apply({"params": p}, *batch, method=Llama.loss_pieces)
        return nll / w
    return jax.jit(jax.value_and_grad(f))(params)


@pytest.fixture(scope="module")
def baseline(small):
    return _loss_and_grad(*small)


@pytest.mark.parametrize("variant", [dict(scan_layers=False, remat_policy="none"), dict(remat_policy="dots"),
                                     dict(remat_policy="save_attention"), dict(remat_policy="offload"),
                                     dict(attention_backend="reference")])
def test_variants_leave_loss_and_gradient_unchanged(small, baseline, variant):
    model, params, batch = small
    variant_model = Llama(model.config, model.runtime.replace(**variant))
    (base, base_grad), (got, got_grad) = baseline, _loss_and_grad(variant_model, params, batch)
    np.testing.assert_allclose(float(got), float(base), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(base_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_params_carry_logical_axes_and_stack_layers(small):
    model, _, batch = small
    boxed = jax.eval_shape(model.init, jax.random.key(0), *batch[:3])["params"]
    q = boxed["layers"]["attn"]["q_proj"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
    assert q.value.shape == (3, 32, 4, 8)
    assert boxed["embed_tokens"].names == ("vocab", "embed")


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_compute_stays_close_to_transformers(param_dtype):
    """Every accelerator preset computes in bf16 (float32 master weights, bf16 activations).

    Measured against transformers' float32 logits (magnitude 3.6): 0.063 with either param dtype,
    while a model that skipped RoPE in bf16 is 3.3 off, so 0.2 catches it."""
    hf_dict = tiny_hf_dict()
    model = hf_model(hf_dict)
    ours, params = _ours(hf_dict, model, dtype="bfloat16", param_dtype=param_dtype)
    params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 100))
    positions = np.broadcast_to(np.arange(100), ids.shape)
    logits = _forward(ours, params, ids, positions, np.ones_like(ids))
    assert logits.dtype == np.float32  # logits are always float32
    np.testing.assert_allclose(logits, hf_logits(model, ids), atol=0.2, rtol=0)


def test_config_round_trips_through_hf_dict():
    config = LlamaConfig.from_hf_dict(tiny_hf_dict(rope_scaling=dict(LLAMA3_SCALING), eos_token_id=[1, 2]))
    assert config.rope_scaling.rope_type == "llama3" and config.eos_token_id == (1, 2)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict("float32")) == config
    # transformers >= 5 nests rope_theta inside rope_parameters
    new_style = {**tiny_hf_dict(), "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}
    new_style.pop("rope_theta")
    parsed = LlamaConfig.from_hf_dict(new_style)
    assert parsed.rope_theta == 1e6 and parsed.rope_scaling.factor == 2.0
    with pytest.raises(ValueError, match="rope_scaling type"):
        LlamaConfig.from_hf_dict(tiny_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))


def test_the_architecture_and_the_runtime_share_no_key():
    """Each key of the training config's `model` and `runtime` sections means one thing in one place."""
    assert not {f.name for f in dataclasses.fields(LlamaConfig)} & {f.name for f in dataclasses.fields(Runtime)}


def test_a_stored_model_with_runtime_keys_reads_as_its_architecture(tmp_path):
    """A checkpoint's model is read by the architecture's keys: runtime keys beside them (as an older
    training config's `model` section held them) change nothing."""
    import orbax.checkpoint as ocp

    from nextlong_jax.warm_start import checkpoint_model

    architecture = LlamaConfig.from_hf_dict(tiny_hf_dict(rope_scaling=dict(LLAMA3_SCALING)))
    old = {**architecture.to_hf_dict("float32"), **dataclasses.asdict(
        Runtime(dtype="bfloat16", attention_backend="splash", remat_policy="save_attention", scan_layers=False))}
    step = tmp_path / "step"
    (step / "params").mkdir(parents=True)
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save((step / "config").resolve(), args=ocp.args.JsonSave(old))
    assert checkpoint_model(step) == architecture
