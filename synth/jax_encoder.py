"""A sentence encoder in JAX: the BERT-family models sentence-transformers loads (MiniLM, bge, e5, gte),
run on whatever devices jax has (TPU, GPU or CPU), data-parallel over all of them.

What it computes is read from the model directory as sentence-transformers reads it:
`config.json` (a post-LayerNorm BERT encoder: token, position and token-type embeddings),
`modules.json` and the pooling module's `config.json` (mean or CLS pooling, whether a Normalize
module follows), and `sentence_bert_config.json` (the window). Weights come from `model.safetensors`
(or `pytorch_model.bin`). Texts are tokenized with the directory's `tokenizer.json`, cut at the
window, and padded to a few bucketed lengths so each shape compiles once. The output for a text
does not depend on the batch it came in or on the number of devices.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np

from synth.errors import SynthError

BATCH_PER_DEVICE = 32
MIN_BUCKET = 16


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SynthError(f"{path}: {e}") from None


def _weights(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        import torch

        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise SynthError(f"{path}: no model.safetensors or pytorch_model.bin")


def _pooling(path: Path) -> tuple[str, bool]:
    """(mean | cls, normalize) from modules.json, as sentence-transformers assembles the model."""
    modules = _read_json(path / "modules.json") if (path / "modules.json").is_file() else []
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    mode = "mean"
    if "Pooling" in kinds:
        pooling = _read_json(path / kinds["Pooling"]["path"] / "config.json")
        mode = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        if not (pooling.get("pooling_mode_cls_token") or pooling.get("pooling_mode_mean_tokens")):
            raise SynthError(f"{path}: only mean or CLS pooling is implemented in the jax encoder")
    return mode, "Normalize" in kinds


def _layer_params(weights: dict[str, np.ndarray], prefix: str, layers: int) -> dict[str, np.ndarray]:
    """Per-layer weights stacked on a leading axis (one traced layer, scanned), kernels as [in, out]."""
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "i": "intermediate.dense", "f": "output.dense"}
    norms = {"ln1": "attention.output.LayerNorm", "ln2": "output.LayerNorm"}
    stacked = {}
    for short, name in names.items():
        stacked[short + "_w"] = np.stack([weights[f"{prefix}encoder.layer.{i}.{name}.weight"].T for i in range(layers)])
        stacked[short + "_b"] = np.stack([weights[f"{prefix}encoder.layer.{i}.{name}.bias"] for i in range(layers)])
    for short, name in norms.items():
        stacked[short + "_g"] = np.stack([weights[f"{prefix}encoder.layer.{i}.{name}.weight"] for i in range(layers)])
        stacked[short + "_b"] = np.stack([weights[f"{prefix}encoder.layer.{i}.{name}.bias"] for i in range(layers)])
    return stacked


def _layer_norm(x, gamma, beta, eps):
    import jax.numpy as jnp

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * gamma + beta


def _encode(params, ids, mask, *, heads: int, eps: float, pooling: str, normalize: bool):
    """ids, mask [B, L] -> sentence embeddings [B, E] float32."""
    import jax
    import jax.numpy as jnp

    b, length = ids.shape
    x = params["word"][ids] + params["position"][:length][None] + params["token_type"][0]
    x = _layer_norm(x, params["emb_ln_g"], params["emb_ln_b"], eps)
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # padding is never attended

    def layer(x, p):
        def split(y):  # [B, L, E] -> [B, H, L, D]
            return y.reshape(b, length, heads, -1).transpose(0, 2, 1, 3)

        q, k, v = (split(x @ p[n + "_w"] + p[n + "_b"]) for n in "qkv")
        scores = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(q.shape[-1]) + bias
        context = (jax.nn.softmax(scores, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, length, -1)
        x = _layer_norm(x + context @ p["o_w"] + p["o_b"], p["ln1_g"], p["ln1_b"], eps)
        hidden = jax.nn.gelu(x @ p["i_w"] + p["i_b"], approximate=False)  # BERT's "gelu" is the erf one
        return _layer_norm(x + hidden @ p["f_w"] + p["f_b"], p["ln2_g"], p["ln2_b"], eps), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    if pooling == "cls":
        pooled = x[:, 0]
    else:
        weights = mask[..., None].astype(x.dtype)
        pooled = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class JaxSentenceEncoder:
    """The `Embedder` protocol of `synth.embed`, computed with jax."""

    def __init__(self, path: Path, max_tokens: int | None = None, batch_per_device: int = BATCH_PER_DEVICE):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from tokenizers import Tokenizer

        config = _read_json(path / "config.json")
        if config.get("model_type") not in ("bert", None) or config.get("position_embedding_type", "absolute") \
                != "absolute":
            raise SynthError(f"{path}: the jax encoder runs BERT-family models (model_type bert), not "
                             f"{config.get('model_type')!r}; use --embed-backend torch")
        st_config = _read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").is_file() \
            else {}
        positions = int(config["max_position_embeddings"])
        self.window = int(max_tokens or st_config.get("max_seq_length") or positions)
        if self.window > positions:
            raise SynthError(f"--embed-max-tokens {self.window}: {path.name} has positions for {positions} tokens "
                             "at most")
        self.path, self.name, self.dim = path, path.name, int(config["hidden_size"])
        weights = _weights(path)
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        self._params = jax.device_put({
            "word": weights[f"{prefix}embeddings.word_embeddings.weight"],
            "position": weights[f"{prefix}embeddings.position_embeddings.weight"],
            "token_type": weights[f"{prefix}embeddings.token_type_embeddings.weight"],
            "emb_ln_g": weights[f"{prefix}embeddings.LayerNorm.weight"],
            "emb_ln_b": weights[f"{prefix}embeddings.LayerNorm.bias"],
            "layers": _layer_params(weights, prefix, int(config["num_hidden_layers"])),
        })
        pooling, normalize = _pooling(path)
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        devices = jax.local_devices()
        self._batch = batch_per_device * len(devices)
        # Each batch is split over the local devices by rows.
        self._put = partial(jax.device_put, device=NamedSharding(Mesh(np.asarray(devices), ("data",)),
                                                                 PartitionSpec("data")))
        self._encode = jax.jit(partial(_encode, heads=int(config["num_attention_heads"]),
                                       eps=float(config.get("layer_norm_eps", 1e-12)), pooling=pooling,
                                       normalize=normalize))

    @property
    def fingerprint(self) -> str:
        files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"})
        sizes = "".join(f"{p.relative_to(self.path)}:{p.stat().st_size}" for p in files)
        return f"jax-{self.name}-{hashlib.sha256(sizes.encode()).hexdigest()[:12]}-w{self.window}"

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(texts)]

    def over_window(self, texts: list[str]) -> int:
        return sum(len(ids) > self.window for ids in self._ids(texts))

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encoded = self._ids(texts)
        # Truncated as sentence-transformers does: keep the final [SEP] after the first window-1 tokens.
        encoded = [ids if len(ids) <= self.window else ids[:self.window - 1] + ids[-1:] for ids in encoded]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")  # similar lengths share a bucket
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(order), self._batch):
            rows = order[start:start + self._batch]
            longest = max(len(encoded[r]) for r in rows)
            length = min(self.window, max(MIN_BUCKET, 1 << (longest - 1).bit_length()))
            ids = np.zeros((self._batch, length), np.int32)
            mask = np.zeros((self._batch, length), np.int32)
            for i, r in enumerate(rows):
                ids[i, :len(encoded[r])] = encoded[r]
                mask[i, :len(encoded[r])] = 1
            vectors = self._encode(self._params, self._put(ids), self._put(mask))
            out[rows] = np.asarray(vectors)[:len(rows)]
        return out
