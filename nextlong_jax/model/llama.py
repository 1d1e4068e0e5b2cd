"""Flax Llama (2, 3, 3.1, 3.2): pre-norm decoder with GQA, RoPE and SwiGLU.

Shapes: B batch, L length, E hidden, H query heads, K kv heads, D head_dim, F mlp, V vocab.
Every parameter and key activation carries logical axis names; `nextlong_jax.sharding` maps them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from nextlong_jax.model.attention import Backend, attention
from nextlong_jax.model.attention.cached import LayerCache, cache_layout, cached_attention
from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.loss import next_token_loss
from nextlong_jax.model.rope import apply_rope, rope_tables
from nextlong_jax.model.runtime import LAYER_INPUT, NO_REMAT, REMAT_SAVES, Runtime
from nextlong_jax.sharding import ambient_shards

_init = nn.initializers.normal(stddev=0.02)
constrain = nn.with_logical_constraint


def _weight(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init=_init) -> jnp.ndarray:
    r = module.runtime
    w = module.param(name, nn.with_logical_partitioning(init, axes), shape, r.jnp_param_dtype)
    return w.astype(r.jnp_dtype)


def _project(x: jnp.ndarray, w: jnp.ndarray, contract: int = 1) -> jnp.ndarray:
    """x [B, L, *in] with the last `contract` axes contracted against w [*in, *out] -> [B, L, *out].

    As one [B*L, in] x [in, out] matmul: with [B, L] as two contracted axes of the weight gradient,
    XLA:CPU writes the incoming gradient a second time, transposed, to feed that matmul; with one it
    does not (a sixth of the CPU train step at bench/model.py's shapes). Not when the length is
    sharded: merging it into the batch makes GSPMD reshard (+5 GiB per chip for the 512K preset).
    """
    if ambient_shards("length")[1] > 1:
        return jnp.tensordot(x, w, contract)
    b, length = x.shape[:2]
    n_in = math.prod(w.shape[:contract])
    y = x.reshape(b * length, n_in) @ w.reshape(n_in, -1)
    return y.reshape(b, length, *w.shape[contract:])


class RMSNorm(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = _weight(self, "scale", (self.config.hidden_size,), ("embed",), nn.initializers.ones)
        if ambient_shards("length")[1] > 1:
            return self._normed(x, scale)
        # As [B*L, E]: XLA:CPU's reductions over an axis of a [1, L, E] array, or over two axes,
        # ran 10-20x slower than over one axis of a 2-D one (a tenth of bench/model.py's train
        # step went into the norms' gradients). See `_project` for why not when the length is sharded.
        return self._normed(x.reshape(-1, x.shape[-1]), scale).reshape(x.shape)

    def _normed(self, x: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale * normed.astype(self.runtime.jnp_dtype)


class Attention(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache: LayerCache | None = None):
        """With a `cache` (decoding), x is one token per row and segment_ids what it sees of the cache."""
        c = self.config
        e, h, kv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = _project(x, _weight(self, "q_proj", (e, h, d), ("embed", "heads", "head_dim")))
        k = _project(x, _weight(self, "k_proj", (e, kv, d), ("embed", "kv_heads", "head_dim")))
        v = _project(x, _weight(self, "v_proj", (e, kv, d), ("embed", "kv_heads", "head_dim")))
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        # Prefill and decoding collect every layer's keys and values (they make "cache" mutable);
        # training does not, and this is then a no-op. Init would make it a variable of the model.
        if not self.is_initializing():
            self.sow("cache", "kv", (cache_layout(k), cache_layout(v)))
        if cache is not None:
            out = cached_attention(q, cache.parts(k, v, segment_ids))
        else:
            # Init needs only parameter shapes: reference attention runs anywhere on its dummy row.
            backend = Backend.REFERENCE if self.is_initializing() else self.runtime.attention_backend
            out = attention(q, k, v, segment_ids, backend=backend, blocks=self.runtime.attention_blocks)
        return _project(out, _weight(self, "o_proj", (h, d, e), ("heads", "head_dim", "embed")), contract=2)


class MLP(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x):
        e, f = self.config.hidden_size, self.config.intermediate_size
        gate = _project(x, _weight(self, "gate_proj", (e, f), ("embed", "mlp")))
        up = _project(x, _weight(self, "up_proj", (e, f), ("embed", "mlp")))
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return _project(hidden, _weight(self, "down_proj", (f, e), ("mlp", "embed")))


class DecoderLayer(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, cache=None):
        c, r = self.config, self.runtime
        drop = nn.Dropout(c.dropout_rate, deterministic=not self.has_rng("dropout"))
        # Named for remat policies (`offload` moves it to host memory); only the named value is used
        # below, so the backward needs nothing of the raw input.
        x = checkpoint_name(x, LAYER_INPUT)
        x = x + drop(Attention(c, r, name="attn")(RMSNorm(c, r, name="input_norm")(x), cos, sin, segment_ids, cache))
        x = x + drop(MLP(c, r, name="mlp")(RMSNorm(c, r, name="post_attention_norm")(x)))
        return constrain(x, ("batch", "length", "embed")), None  # (carry, output) for nn.scan


class Llama(nn.Module):
    config: LlamaConfig
    runtime: Runtime

    def setup(self):
        c, r = self.config, self.runtime
        self.embed_tokens = self.param("embed_tokens", nn.with_logical_partitioning(_init, ("vocab", "embed")),
                                       (c.vocab_size, c.hidden_size), r.jnp_param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(_init, ("embed", "vocab")),
                                      (c.hidden_size, c.vocab_size), r.jnp_param_dtype)
        layer = DecoderLayer
        if r.remat_policy != NO_REMAT:
            layer = nn.remat(layer, policy=REMAT_SAVES[r.remat_policy], prevent_cse=False)
        # One traced layer whatever the depth; scan_layers=False unrolls it, keeping the param layout.
        # A decoding cache is scanned with the layers (each layer its own slice); "cache" stacks what
        # each layer sows.
        stack = nn.scan(layer, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=c.num_hidden_layers,
                        unroll=1 if r.scan_layers else c.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        self.layers = stack(c, r, name="layers")
        self.final_norm = RMSNorm(c, r)

    def hidden_states(self, input_ids, positions, segment_ids, cache: LayerCache | None = None):
        """[B, L] ids, positions (restarting per segment), segment ids (0 = pad) -> [B, L, E].

        Decoding passes the layers' stacked `cache` and, as segment_ids, what each row sees of it."""
        x = jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.runtime.jnp_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        cos, sin = rope_tables(self.config, positions)
        x, _ = self.layers(x, cos, sin, segment_ids, cache)
        return self.final_norm(x)

    def head(self) -> jnp.ndarray:
        """[E, V] output projection (the transposed embedding when tied), in the parameters' dtype: the
        loss casts its shard to the hidden states' dtype before gathering it, and its gradient stays in
        the parameters' dtype on its way to the optimizer."""
        return self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """[..., E] hidden states -> float32 logits [..., V]."""
        head = self.head().astype(self.runtime.jnp_dtype)
        return jnp.einsum("...e,ev->...v", hidden, head, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions, segment_ids):
        """Full float32 logits [B, L, V]; for long sequences use `loss_pieces`."""
        return constrain(self.logits(self.hidden_states(input_ids, positions, segment_ids)), ("batch", "length", "vocab"))

    def loss_pieces(self, input_ids, positions, segment_ids, loss_weights):
        """(sum of weighted next-token nll, sum of weights); see `nextlong_jax.model.loss`."""
        hidden = self.hidden_states(input_ids, positions, segment_ids)
        return next_token_loss(hidden, self.head(), input_ids, loss_weights, segment_ids,
                               block_size=self.runtime.logits_block_size,
                               gathers_head=self.runtime.loss_gathers_head)
