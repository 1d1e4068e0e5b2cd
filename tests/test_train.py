"""Config loading, the weighted loss against a hand computation, the optimizer's decay mask and NaN skipping."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.runtime import Runtime
from nextlong_jax.optimizer import build_optimizer, decay_mask
from nextlong_jax.step import TrainState, loss_sums, make_train_step
from nextlong_jax.train_config import ConfigError, OptimizerConfig, config_from_dict, load_config

TINY = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
RUNTIME = Runtime(attention_backend="blockwise", attention_block_size=8, logits_block_size=4)
ROOT = Path(__file__).resolve().parents[1]


def test_yaml_preset_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: llama3-8b, rope_theta: 2.0e8}\ndata: {seq_len: 1024}\n")
    c = load_config(path, ["mesh.data=2", "train.steps=50", "optimizer.learning_rate=1e-4", "loss.negative_weight=0.5"])
    assert (c.model.hidden_size, c.model.num_key_value_heads, c.model.rope_theta) == (4096, 8, 2e8)
    assert (c.mesh.data, c.train.steps, c.optimizer.learning_rate, c.loss.negative_weight) == (2, 50, 1e-4, 0.5)
    assert config_from_dict(c.to_dict()) == c
    # YAML reads a bare `off` as false; the cache setting means the word
    path.write_text("model: {preset: llama3-8b}\ntrain: {compilation_cache: off}\n")
    assert load_config(path).train.compilation_cache == "off"
    assert load_config(path, ["train.compilation_cache=on"]).train.compilation_cache == "auto"


def test_preset_extends_another(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {preset: llama3-8b}\nruntime: {dtype: bfloat16}\n"
                                        "data: {seq_len: 1024}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nruntime: {dtype: float32}\nmesh: {sequence: 2}\n")
    c = load_config(tmp_path / "variant.yaml", ["data.batch_size=4"])
    assert (c.model.hidden_size, c.runtime.dtype, c.data.seq_len, c.mesh.sequence, c.data.batch_size) == (
        4096, "float32", 1024, 2, 4)
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml not found"):
        load_config(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown key train.stepz"),
    ("mesh.data=two", "mesh.data='two': Input should be a valid integer"),
    ("runtime.attention_backend=splosh", "runtime.attention_backend='splosh': Input should be 'auto', 'reference'"),
    ("runtime.remat_policy=most", "runtime: remat_policy='most' not in"),
    ("model.rope_scaling={rope_type: llama3, factr: 8}", "model.rope_scaling: .*unexpected keyword argument 'factr'"),
    ("xla.tpu={a: [1]}", "xla.tpu.a=\\[1\\]: Input should be a valid string"),
    ("data.weights=[1, x]", "data.weights\\[1\\]='x': Input should be a valid number"),
    ("model.preset=llama9", "unknown model.preset"),
    ("optimizer.decay=step", "optimizer.decay='step'"),
    ("nokey", "not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_runtime_key_under_model_says_to_move_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.attention_backend: how the model runs, not what it is; move it "
                                          r"under runtime: \(runtime.attention_backend\)$"):
        load_config(None, ["model.attention_backend=splash"])
    path = tmp_path / "old.yaml"
    path.write_text("model: {preset: llama3-8b, dtype: bfloat16, remat_policy: full}\n")
    with pytest.raises(ConfigError, match=r"^model.dtype, model.remat_policy: .* move them under runtime: "
                                          r"\(runtime.dtype, runtime.remat_policy\)$"):
        load_config(path)


def test_a_training_config_saved_before_the_runtime_section_reads_its_runtime():
    """A checkpoint's `train_config` from before the split holds the runtime keys under `model`."""
    config = load_config(ROOT / "configs/train/llama3-8b-64k.yaml")
    saved = config.to_dict()
    runtime = saved.pop("runtime")
    assert runtime["remat_policy"] == "save_attention"  # not the default: the test reads something
    assert config_from_dict({**saved, "model": {**saved["model"], **runtime}}) == config


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY.vocab_size, (2, 12)).astype(np.int32)
    segments = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], np.int32)
    positions = np.array([list(range(5)) * 2 + [0, 0], list(range(12))], np.int32)
    roles = np.array([[1, 1, 2, 2, 1, 1, 2, 1, 1, 2, 0, 0], [1] * 6 + [2] * 6], np.int32)
    weights = rng.uniform(0.1, 2.0, (2, 12)).astype(np.float32) * (segments > 0)
    return dict(input_ids=ids, positions=positions, segment_ids=segments, token_roles=roles, loss_weights=weights)


def test_weighted_loss_matches_hand_computation():
    model, batch = Llama(TINY, RUNTIME), _batch()
    params = model.init(jax.random.key(0), batch["input_ids"], batch["positions"], batch["segment_ids"])["params"]
    nll, w = jax.jit(lambda p, b: loss_sums(model, p, b))(params, batch)

    logits = np.asarray(model.apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"]),
                        np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = np.zeros((3, 2))  # rows: training weights, meta, negative; cols: nll sum, weight sum
    seg, roles = batch["segment_ids"], batch["token_roles"]
    for b in range(2):
        for t in range(1, 12):  # weight at t: predict input_ids[t] from the hidden state at t-1
            if seg[b, t] == 0 or seg[b, t] != seg[b, t - 1]:
                continue
            token_nll = -logp[b, t - 1, batch["input_ids"][b, t]]
            for row, weight in enumerate((batch["loss_weights"][b, t], roles[b, t] == 1, roles[b, t] == 2)):
                want[row] += (weight * token_nll, weight)
    np.testing.assert_allclose(np.asarray(w), want[:, 1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nll), want[:, 0], rtol=1e-5)


KEY = jax.random.key_data(jax.random.key(1))


def test_grad_accumulation_equals_one_big_batch():
    model, batch = Llama(TINY, RUNTIME), _batch()
    batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}
    tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), 10)
    params = model.init(jax.random.key(0), batch["input_ids"], batch["positions"], batch["segment_ids"])["params"]
    state = TrainState(params, tx.init(params), KEY)
    (s1, m1), (s2, m2) = (jax.jit(make_train_step(model, tx, a))(state, batch) for a in (1, 2))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)  # Adam divides by tiny sqrt(v)


def test_nonfinite_step_is_skipped():
    model, batch = Llama(TINY, RUNTIME), _batch()
    tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2), 10)
    params = model.init(jax.random.key(0), batch["input_ids"], batch["positions"], batch["segment_ids"])["params"]
    params = nn.unbox(params)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.nan)
    state = TrainState(params, tx.init(params), KEY)
    new, metrics = jax.jit(make_train_step(model, tx, 1))(state, batch)
    assert not bool(metrics["finite"])
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropout_draws_from_the_state_key_and_only_in_training():
    model, batch = Llama(TINY.replace(dropout_rate=0.5), RUNTIME), _batch()
    tx, _ = build_optimizer(OptimizerConfig(learning_rate=1e-2), 10)
    params = nn.unbox(model.init(jax.random.key(0), batch["input_ids"], batch["positions"],
                                 batch["segment_ids"])["params"])
    step = jax.jit(make_train_step(model, tx, 1))
    state = TrainState(params, tx.init(params), KEY)
    first, m1 = step(state, batch)
    _, again = step(state, batch)
    _, m2 = step(TrainState(params, tx.init(params), first.rng), batch)
    assert float(m1["loss"]) == float(again["loss"])  # the key decides the masks
    assert float(m1["loss"]) != float(m2["loss"])  # and the step hands on a new one
    assert not np.array_equal(np.asarray(first.rng), np.asarray(KEY))
    # Without a dropout rng (evaluation, export, parity) the model is deterministic and dropout-free.
    plain = Llama(TINY, RUNTIME).apply({"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"])
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, batch["input_ids"], batch["positions"],
                                                         batch["segment_ids"])), np.asarray(plain))


def test_decay_mask_spares_norms_and_embeddings():
    ids = np.zeros((1, 4), np.int32)
    params = Llama(TINY, RUNTIME).init(jax.random.key(0), ids, ids, ids)["params"]
    mask = decay_mask(params, decay_norms_and_embeddings=False)
    assert not mask["embed_tokens"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["input_norm"]["scale"] and mask["layers"]["attn"]["q_proj"] and mask["lm_head"]
    assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_embeddings=True)))


def test_mfu_denominator_is_known_for_accelerators():
    from types import SimpleNamespace

    from nextlong_jax.hardware import published_bf16_peak

    assert published_bf16_peak(SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert published_bf16_peak(SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert published_bf16_peak(SimpleNamespace(device_kind="TPU v5")) == 459e12  # what a v5p reports
    assert published_bf16_peak(SimpleNamespace(device_kind="NVIDIA A100-SXM4-40GB")) == 312e12
    assert published_bf16_peak(jax.devices()[0]) is None  # this CPU: no MFU unless train.peak_flops_per_device
