"""Name and layout correspondence between a HF Llama state dict and this model's parameters.

HF linear weights are [out, in]; ours are [in, ...out] split by head, so a tensor maps by
transpose + reshape (bit-exact both ways). Per-layer tensors are stacked on a leading `layers` axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from nextlong_jax.model.config import LlamaConfig

# HF name inside `model.layers.{i}.` -> our path inside params["layers"]
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": ("attn", "q_proj"),
    "self_attn.k_proj.weight": ("attn", "k_proj"),
    "self_attn.v_proj.weight": ("attn", "v_proj"),
    "self_attn.o_proj.weight": ("attn", "o_proj"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj"),
    "mlp.up_proj.weight": ("mlp", "up_proj"),
    "mlp.down_proj.weight": ("mlp", "down_proj"),
    "input_layernorm.weight": ("input_norm", "scale"),
    "post_attention_layernorm.weight": ("post_attention_norm", "scale"),
}


class WeightMismatch(ValueError):
    pass


def _our_shapes(c: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Per-layer (unstacked) and top-level parameter shapes."""
    e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    return {
        ("attn", "q_proj"): (e, h, d), ("attn", "k_proj"): (e, kv, d), ("attn", "v_proj"): (e, kv, d),
        ("attn", "o_proj"): (h, d, e), ("mlp", "gate_proj"): (e, f), ("mlp", "up_proj"): (e, f),
        ("mlp", "down_proj"): (f, e), ("input_norm", "scale"): (e,), ("post_attention_norm", "scale"): (e,),
    }


def hf_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config must hold, with its shape, in the order `params_to_hf` yields."""
    e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    per_layer = {
        "self_attn.q_proj.weight": (h * d, e), "self_attn.k_proj.weight": (kv * d, e),
        "self_attn.v_proj.weight": (kv * d, e), "self_attn.o_proj.weight": (e, h * d),
        "mlp.gate_proj.weight": (f, e), "mlp.up_proj.weight": (f, e), "mlp.down_proj.weight": (e, f),
        "input_layernorm.weight": (e,), "post_attention_layernorm.weight": (e,),
    }
    shapes = {"model.embed_tokens.weight": (c.vocab_size, e)}
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm.weight"] = (e,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, e)
    return shapes


def _hf_to_ours(w: np.ndarray, our_shape: tuple[int, ...]) -> np.ndarray:
    return w if w.ndim == 1 else w.T.reshape(our_shape)


def _ours_to_hf(w: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    return w if w.ndim == 1 else np.ascontiguousarray(w.reshape(hf_shape[::-1]).T)


def hf_to_params(get_tensor: Callable[[str], np.ndarray], c: LlamaConfig) -> dict[str, Any]:
    """Builds the params tree (numpy, checkpoint dtype) pulling one HF tensor at a time."""
    expected = hf_shapes(c)

    def fetch(name: str) -> np.ndarray:
        w = np.asarray(get_tensor(name))
        if tuple(w.shape) != expected[name]:
            raise WeightMismatch(f"tensor {name} has shape {tuple(w.shape)}, config expects {expected[name]}")
        return w

    params: dict[str, Any] = {"embed_tokens": fetch("model.embed_tokens.weight"), "final_norm": {"scale": fetch("model.norm.weight")}}
    if not c.tie_word_embeddings:
        params["lm_head"] = fetch("lm_head.weight").T.copy()
    layers: dict[str, dict[str, np.ndarray]] = {}
    shapes = _our_shapes(c)
    for i in range(c.num_hidden_layers):
        for hf_name, (module, leaf) in _LAYER_TENSORS.items():
            w = _hf_to_ours(fetch(f"model.layers.{i}.{hf_name}"), shapes[module, leaf])
            stacked = layers.setdefault(module, {}).get(leaf)
            if stacked is None:
                stacked = layers[module][leaf] = np.empty((c.num_hidden_layers, *w.shape), w.dtype)
            stacked[i] = w
    params["layers"] = layers
    return params


def params_to_hf(params: dict[str, Any], c: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, tensor) one at a time, in HF order, from a params tree of host arrays."""
    expected = hf_shapes(c)
    yield "model.embed_tokens.weight", np.asarray(params["embed_tokens"])
    for i in range(c.num_hidden_layers):
        for hf_name, (module, leaf) in _LAYER_TENSORS.items():
            name = f"model.layers.{i}.{hf_name}"
            yield name, _ours_to_hf(np.asarray(params["layers"][module][leaf][i]), expected[name])
    yield "model.norm.weight", np.asarray(params["final_norm"]["scale"])
    if not c.tie_word_embeddings:
        yield "lm_head.weight", np.ascontiguousarray(np.asarray(params["lm_head"]).T)


def check_params(params: dict[str, Any], c: LlamaConfig) -> None:
    """Raises WeightMismatch naming the first parameter whose shape disagrees with the config."""
    want = {("embed_tokens",): (c.vocab_size, c.hidden_size), ("final_norm", "scale"): (c.hidden_size,)}
    if not c.tie_word_embeddings:
        want["lm_head",] = (c.hidden_size, c.vocab_size)
    want.update({("layers", *k): (c.num_hidden_layers, *v) for k, v in _our_shapes(c).items()})
    for path, shape in want.items():
        node = params
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise WeightMismatch(f"checkpoint lacks parameter {'/'.join(path)}")
            node = node[key]
        if tuple(node.shape) != shape:
            raise WeightMismatch(f"parameter {'/'.join(path)} has shape {tuple(node.shape)}, config expects {shape}")
