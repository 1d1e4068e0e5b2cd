"""Blockwise attention equals the reference in value and gradient; backends fall back off-platform."""

from __future__ import annotations

import logging

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


@pytest.mark.parametrize("backend,platform", [("cudnn", "cpu"), ("pallas_gpu", "tpu"), ("splash", "cuda")])
def test_kernel_for_another_platform_falls_back_with_warning(backend, platform, caplog):
    from nextlong_jax.model.attention import Backend, _warned, resolve_backend

    _warned.clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_backend(backend, platform) == Backend.BLOCKWISE
        assert resolve_backend(backend, platform, sequence_parallel=True) == Backend.RING
    assert f"attention backend '{backend}' needs a" in caplog.text and "falling back to 'blockwise'" in caplog.text


@pytest.mark.parametrize("backend,platform", [("splash", "tpu"), ("pallas_gpu", "cuda"), ("cudnn", "gpu"),
                                              ("ring", "cpu"), ("blockwise", "tpu")])
def test_backend_for_its_platform_is_kept(backend, platform):
    from nextlong_jax.model.attention import resolve_backend

    assert resolve_backend(backend, platform).value == backend


def test_unknown_backend_is_an_error():
    q, k, v = _inputs(length=8)
    with pytest.raises(ValueError, match="nope"):
        attention(q, k, v, backend="nope")
    from nextlong_jax.model.attention import resolve_backend

    with pytest.raises(ValueError, match="unknown attention backend 'nope' \\(known: reference, blockwise"):
        resolve_backend("nope", "cpu")
