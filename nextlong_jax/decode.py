"""Text generation on the training mesh: prefill with the training kernels, then a KV-cache decode loop.

Prefill is the training forward over the prompts (left-padded to one bucketed length, in zig-zag
order and sharded over `sequence` when the mesh has it), collecting every layer's keys and values:
that prompt cache stays where the forward left it, sharded like a training activation. Each decode
step runs one token per row through the layers, attending to the prompt cache (GSPMD splits the
softmax over its shards and combines them), to a tail of the tokens generated so far (whole on each
device, written in place) and to itself (`model.attention.cached`). Greedy decoding, or seeded
temperature / top-k / top-p sampling; a row stops at an end-of-sequence id, a stop string or the
token budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding

from nextlong_jax import load_balance
from nextlong_jax.model.attention.cached import LayerCache
from nextlong_jax.model.llama import Llama
from nextlong_jax.sharding import axis_rules, logical_sharding, logical_shardings

logger = logging.getLogger(__name__)

CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")  # cached.cache_layout
TAIL_AXES = ("layers", "batch", "kv_heads", None, "head_dim")  # the tail is short: whole on each device


class DecodeError(ValueError):
    """A prompt or option the decoder cannot take; one line that says what to change."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (top_k and top_p unused). Otherwise softmax(logits / temperature) over the
    top_k most likely tokens (0: all) and, of those, the smallest set holding top_p of the mass."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise DecodeError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: list[int]  # generated ids, the stop id included when a row ended on one
    text: str | None  # decoded (cut before a stop string), when the decoder was given a detokenizer
    finish: str  # "eos", "stop" (a stop string) or "length" (the token budget)
    seconds: tuple[float, float] = (0.0, 0.0)  # its batch's prefill (to the first new tokens) and decoding


def sample(logits: jnp.ndarray, keys: jax.Array, sampling: Sampling) -> jnp.ndarray:
    """float32 logits [B, V] and one key per row [B] -> int32 token ids [B]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # A token stays while the mass before it is under top_p: the most likely one always stays.
        kept = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
        floor = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < floor, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _step_keys(row_keys: jax.Array, step) -> jax.Array:
    """A row's key for the token it draws at `step`: a prompt's samples depend on its seed, index and
    step only, not on the batch or mesh it runs in."""
    return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)


def bucket(length: int, unit: int, block: int) -> int:
    """Prompt length padded for compilation reuse and the kernels' tiling: `unit` (2 x sequence shards)
    times a power of two up to `block` per unit, then multiples of unit x block."""
    per_unit = -(-length // unit)
    if per_unit <= block:
        return unit * (1 << (per_unit - 1).bit_length())
    return unit * block * -(-per_unit // block)


def _kv(variables: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Every layer's keys and values the model sowed, stacked [layers, B, K, L, D] (cache_layout)."""
    ((k, v),) = variables["cache"]["layers"]["attn"]["kv"]
    return k, v


def _prefill(model: Llama, params, features: dict[str, jnp.ndarray], row_keys: jax.Array, *, last: int, tail: int,
             sampling: Sampling):
    def run(module: Llama):
        hidden = module.hidden_states(features["input_ids"], features["positions"], features["segment_ids"])
        return module.logits(hidden[:, last])

    logits, variables = model.apply({"params": params}, method=run, mutable=["cache"])
    k, v = _kv(variables)
    empty = jnp.zeros((*k.shape[:3], tail, k.shape[4]), k.dtype)
    return sample(logits, _step_keys(row_keys, 0), sampling), LayerCache(k, v, empty, empty)


def _step(model: Llama, params, cache: LayerCache, prompt_seen: jnp.ndarray, tokens: jnp.ndarray,
          positions: jnp.ndarray, step: jnp.ndarray, row_keys: jax.Array, *, sampling: Sampling):
    """Feeds `tokens` [B] (at `positions` [B]) as the step-th generated ones: writes their keys and
    values into tail slot `step` and returns the next tokens and the cache."""
    batch, slots = cache.tail_k.shape[1], cache.tail_k.shape[3]
    tail_seen = jnp.broadcast_to(jnp.arange(slots) < step, (batch, slots))

    def run(module: Llama):
        hidden = module.hidden_states(tokens[:, None], positions[:, None], (prompt_seen, tail_seen), cache)
        return module.logits(hidden[:, 0])

    logits, variables = model.apply({"params": params}, method=run, mutable=["cache"])
    k, v = _kv(variables)
    at = (0, 0, 0, step, 0)
    cache = cache._replace(tail_k=lax.dynamic_update_slice(cache.tail_k, k.astype(cache.tail_k.dtype), at),
                           tail_v=lax.dynamic_update_slice(cache.tail_v, v.astype(cache.tail_v.dtype), at))
    return sample(logits, _step_keys(row_keys, step + 1), sampling), cache


@dataclasses.dataclass
class Decoder:
    """Generation with `model` (its training runtime: kernels, dtypes) on `mesh`, `batch_size` prompts at
    a time (a multiple of the mesh's batch shards, data x fsdp)."""

    model: Llama
    params: Any
    mesh: Mesh
    batch_size: int
    detokenize: Callable[[list[int]], str] | None = None

    def __post_init__(self):
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if self.batch_size < 1 or self.batch_size % shards:
            raise DecodeError(f"batch size {self.batch_size} must be a positive multiple of the mesh's batch shards "
                              f"(data x fsdp = {shards})")
        self.model = Llama(self.model.config, self.model.runtime.for_inference())
        # Host arrays (a converted model) would cross to the devices at every step. Abstract parameters
        # (jax.ShapeDtypeStruct) make a decoder whose programs are only lowered and compiled (plans).
        if not all(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(self.params)):
            self.params = jax.device_put(self.params, self._param_shardings)

    @property
    def _shards(self) -> int:
        return self.mesh.shape["sequence"]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = (), sampling: Sampling = Sampling(), progress=None) -> list[Completion]:
        """Completions of `prompts` (token ids), in order. Prompts of similar length share a batch.
        `progress`: a tqdm bar advanced per prompt."""
        if max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_strings and self.detokenize is None:
            raise DecodeError("stop strings need the decoder's detokenizer (a tokenizer)")
        self._check(prompts, max_new_tokens)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: dict[int, Completion] = {}
        for start in range(0, len(order), self.batch_size):
            members = order[start:start + self.batch_size]
            done = self._batch([prompts[i] for i in members], members, max_new_tokens, set(stop_ids),
                               tuple(stop_strings), sampling)
            out.update(zip(members, done))
            if progress is not None:
                progress.update(len(members))
        return [out[i] for i in range(len(prompts))]

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        config = self.model.config
        for i, prompt in enumerate(prompts):
            if not len(prompt):
                raise DecodeError(f"prompt {i} is empty: give at least one token (a BOS, or the chat template)")
            top = max(prompt)
            if top >= config.vocab_size or min(prompt) < 0:
                raise DecodeError(f"prompt {i} holds token id {top if top >= config.vocab_size else min(prompt)}, "
                                  f"outside the model's vocabulary of {config.vocab_size}: tokenize with the "
                                  "model's own tokenizer")
        longest = max(map(len, prompts)) + max_new_tokens
        if longest > config.max_position_embeddings:
            logger.warning("prompt + new tokens reach position %d, past the %d the model was trained to "
                           "(max_position_embeddings): an extrapolation", longest, config.max_position_embeddings)

    def _batch(self, prompts: list[Sequence[int]], indices: list[int], max_new_tokens: int, stop_ids: set[int],
               stop_strings: tuple[str, ...], sampling: Sampling) -> list[Completion]:
        shards = self._shards
        length = bucket(max(map(len, prompts)), 2 * shards, self.model.runtime.attention_block_size)
        tail = 1 << max(4, (max_new_tokens - 1).bit_length())  # a power of two: few distinct programs
        ids, positions, segments = (np.zeros((self.batch_size, length), np.int32) for _ in range(3))
        for row, prompt in enumerate(prompts):  # left-padded: every row's last prompt token at length - 1
            ids[row, length - len(prompt):] = prompt
            positions[row, length - len(prompt):] = np.arange(len(prompt))
            segments[row, length - len(prompt):] = 1
        features = {"input_ids": ids, "positions": positions, "segment_ids": segments}
        last = length - 1
        if shards > 1:
            features = load_balance.reorder(features, shards)
            last = int(np.argsort(load_balance.token_index(length, shards))[last])
        next_position = np.array([len(p) for p in prompts] + [0] * (self.batch_size - len(prompts)), np.int32)
        indices = np.array(indices + [-1] * (self.batch_size - len(prompts)), np.int32)
        row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(sampling.seed), indices)
        with jax.set_mesh(self.mesh), axis_rules():
            placed = {k: jax.device_put(np.ascontiguousarray(v), self._sharding(("batch", "length")))
                      for k, v in features.items()}
            row_keys = jax.device_put(row_keys, self._sharding(("batch",)))
            started = time.perf_counter()
            tokens, cache = self._prefill_fn(self.params, placed, row_keys, last=last, tail=tail, sampling=sampling)
            prompt_seen = placed["segment_ids"] == 1
            rows = [_Row(self.detokenize, stop_ids, stop_strings) for _ in prompts]
            prefilled = None
            for step in range(max_new_tokens):
                host = np.asarray(tokens)
                prefilled = prefilled or time.perf_counter()
                for row, token in zip(rows, host):
                    row.add(int(token))
                if step == max_new_tokens - 1 or all(r.finish for r in rows):
                    break
                tokens, cache = self._step_fn(self.params, cache, prompt_seen, tokens,
                                              jnp.asarray(next_position + step), jnp.int32(step), row_keys,
                                              sampling=sampling)
        seconds = (prefilled - started, time.perf_counter() - prefilled)
        return [dataclasses.replace(row.completion(), seconds=seconds) for row in rows]

    def _sharding(self, axes: tuple[str | None, ...]) -> NamedSharding:
        return logical_sharding(self.mesh, axes)

    @cached_property
    def _param_shardings(self):
        ids = np.ones((1, 8), np.int32)
        with jax.set_mesh(self.mesh), axis_rules():
            boxed = jax.eval_shape(lambda: self.model.init(jax.random.key(0), ids, ids, ids))["params"]
        return logical_shardings(boxed, self.mesh)

    @cached_property
    def _cache_shardings(self) -> LayerCache:
        full, tail = self._sharding(CACHE_AXES), self._sharding(TAIL_AXES)
        return LayerCache(full, full, tail, tail)

    @cached_property
    def _prefill_fn(self):
        return jax.jit(partial(_prefill, self.model), static_argnames=("last", "tail", "sampling"),
                       out_shardings=(self._sharding(("batch",)), self._cache_shardings))

    @cached_property
    def _step_fn(self):
        # One token per row: its length axis is not sharded (the step's activations are [B, 1, ...]).
        step = partial(_step, self.model)

        def unsharded_length(*args, **kwargs):
            with axis_rules(sharded_length=False):
                return step(*args, **kwargs)

        return jax.jit(unsharded_length, static_argnames=("sampling",), donate_argnums=(1,),
                       out_shardings=(self._sharding(("batch",)), self._cache_shardings))


class _Row:
    """One prompt's generated tokens and whether (and why) it has stopped."""

    def __init__(self, detokenize, stop_ids: set[int], stop_strings: tuple[str, ...]):
        self.detokenize, self.stop_ids, self.stop_strings = detokenize, stop_ids, stop_strings
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text: str | None = None

    def add(self, token: int) -> None:
        if self.finish:
            return
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish = "eos"
        elif self.stop_strings:
            text = self.detokenize(self.tokens)
            cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                self.finish, self.text = "stop", text[:cut]

    def completion(self) -> Completion:
        text = self.text
        if text is None and self.detokenize is not None:
            ended = self.finish == "eos"
            text = self.detokenize(self.tokens[:-1] if ended else self.tokens)
        return Completion(self.tokens, text, self.finish or "length")
