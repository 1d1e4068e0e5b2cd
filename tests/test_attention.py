"""Blockwise attention equals the reference in value and gradient; backends fall back off-platform."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import packed_segments
from nextlong_jax.model.attention import Blocks, attention


def _inputs(b=2, length=96, heads=4, kv_heads=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, length, heads, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, length, kv_heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, length, kv_heads, d)), jnp.float32)
    return q, k, v


CASES = {
    "mha": dict(heads=4, kv_heads=4, length=96, segments=False),
    "gqa": dict(heads=4, kv_heads=2, length=96, segments=False),
    "mha-segments": dict(heads=4, kv_heads=4, length=96, segments=True),
    "gqa-segments-ragged": dict(heads=6, kv_heads=2, length=83, segments=True),  # 83 % 32 != 0: padded blocks
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_blockwise_matches_reference_value_and_gradient(case):
    q, k, v = _inputs(length=case["length"], heads=case["heads"], kv_heads=case["kv_heads"])
    seg = jnp.asarray(packed_segments(2, case["length"])) if case["segments"] else None
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def run(backend):
        def f(q, k, v):
            return attention(q, k, v, seg, backend=backend, blocks=Blocks(32, 32, 32, 32))
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(cotangent))

    for got, want in zip(jax.jit(lambda: run("blockwise"))(), jax.jit(lambda: run("reference"))()):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


def test_segments_isolate_documents():
    q, k, v = _inputs(b=1, length=64)
    seg = jnp.asarray(np.repeat([[1, 2]], 32, axis=1))
    alone = attention(q[:, 32:], k[:, 32:], v[:, 32:], None, backend="blockwise", blocks=Blocks(16))
    packed = attention(q, k, v, seg, backend="blockwise", blocks=Blocks(16))
    np.testing.assert_allclose(np.asarray(packed[:, 32:]), np.asarray(alone), atol=1e-5)


def test_bfloat16_inputs_stay_close_to_float32_reference():
    q, k, v = _inputs()
    want = attention(q, k, v, None, backend="reference")
    got = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None, backend="blockwise", blocks=Blocks(32))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2)


@pytest.mark.parametrize("platform,unsharded,sharded", [("tpu", "splash", "splash"), ("cuda", "pallas_gpu", "pallas_gpu"),
                                                      ("gpu", "pallas_gpu", "pallas_gpu"), ("cpu", "blockwise", "ring")])
def test_auto_resolves_per_target_platform(platform, unsharded, sharded):
    from nextlong_jax.model.attention import resolve

    assert resolve("auto", platform).value == unsharded
    assert f"{resolve('auto', platform, sequence_shards=4)}" == sharded  # messages show the name users write


@pytest.mark.parametrize("backend,platform", [("cudnn", "cpu"), ("pallas_gpu", "tpu"), ("splash", "cuda")])
def test_kernel_for_another_platform_is_refused_in_one_line(backend, platform):
    from nextlong_jax.model.attention import BackendError, resolve

    with pytest.raises(BackendError) as e:
        resolve(backend, platform)
    assert "\n" not in str(e.value) and f"runtime.attention_backend={backend} runs on" in str(e.value)
    assert "use auto" in str(e.value) and "attention_allow_fallback" in str(e.value)


@pytest.mark.parametrize("backend,platform,want", [("cudnn", "cpu", "blockwise"), ("pallas_gpu", "tpu", "splash"),
                                                   ("splash", "cuda", "pallas_gpu")])
def test_allow_fallback_runs_autos_choice_with_a_warning(backend, platform, want, caplog):
    from nextlong_jax.model.attention import resolve

    with caplog.at_level(logging.WARNING):
        assert resolve(backend, platform, allow_fallback=True).value == want
    assert f"runtime.attention_backend={backend} runs on" in caplog.text and f"running {want}" in caplog.text


@pytest.mark.parametrize("backend,platform", [("splash", "tpu"), ("pallas_gpu", "cuda"), ("cudnn", "gpu"),
                                              ("ring", "cpu"), ("blockwise", "tpu")])
def test_backend_for_its_platform_is_kept(backend, platform):
    from nextlong_jax.model.attention import resolve

    assert resolve(backend, platform).value == backend


def test_sharded_length_and_dense_masks_are_refused():
    from nextlong_jax.model.attention import BackendError, resolve

    with pytest.raises(BackendError, match="mesh.sequence=2 needs a backend that takes a sharded length"):
        resolve("blockwise", "cpu", sequence_shards=2)
    assert resolve("ring", "cpu", sequence_shards=2).value == "ring"
    with pytest.raises(BackendError, match="cudnn builds an \\[L, L\\] mask"):
        resolve("cudnn", "gpu", length=32768)
    assert resolve("cudnn", "gpu", length=16384).value == "cudnn"


def test_config_and_data_modules_load_no_kernel():
    code = ("import sys, nextlong_jax.train_config, nextlong_jax.data, nextlong_jax.train_setup, nextlong_jax.step; "
            "print(sorted(m for m in sys.modules if m.endswith(('attention.splash', 'attention.pallas_gpu', "
            "'attention.cudnn')) or 'pallas.ops' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "[]", out.stdout


def test_every_kernel_takes_the_one_signature():
    import inspect

    from nextlong_jax.model.attention.backends import BACKENDS

    for backend, spec in BACKENDS.items():
        parameters = inspect.signature(spec.load()).parameters
        assert list(parameters)[:4] == ["q", "k", "v", "segment_ids"], backend
        assert parameters["blocks"].kind is inspect.Parameter.KEYWORD_ONLY, backend
        assert all(p.default is not inspect.Parameter.empty for p in list(parameters.values())[4:]), backend


def test_auto_must_be_resolved_before_attention_runs():
    from nextlong_jax.model.attention import BackendError

    q, k, v = _inputs(length=8)
    with pytest.raises(BackendError, match="resolved"):
        attention(q, k, v, backend="auto")


def test_unknown_backend_is_an_error():
    q, k, v = _inputs(length=8)
    with pytest.raises(ValueError, match="nope"):
        attention(q, k, v, backend="nope")
    from nextlong_jax.model.attention import resolve

    with pytest.raises(ValueError, match="unknown attention backend 'nope' \\(known: auto, reference, blockwise"):
        resolve("nope", "cpu")
