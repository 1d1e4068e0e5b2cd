"""Probes scored by a trained model where it trains: the training config's mesh and attention kernels,
the parameters read straight into their shardings (an 8B model at 128K does not fit one chip).

One forward pass per batch of probes of one length: hidden states over prompt + answer (in zig-zag
order when the length is sharded over `sequence`, as the train step runs), then logits only at the
positions that predict answer tokens, so no [L, vocab] tensor exists.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from nextlong_jax import load_balance
from nextlong_jax.decode import Decoder, bucket
from nextlong_eval.probes import Probe
from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.loss import next_token_targets, target_loss
from nextlong_jax.sharding import axis_rules
from nextlong_jax.step import check_sequence_parallel
from nextlong_jax.train_config import Config
from nextlong_jax.train_setup import (TrainError, abstract_state, build, build_mesh,
                                      start_runtime)

logger = logging.getLogger(__name__)

def stored_model(ckpt: Path | None, hf: Path | None) -> LlamaConfig:
    """The architecture of an orbax checkpoint step or an HF Llama directory."""
    if hf is not None:
        from nextlong_jax.convert import read_hf_config

        return read_hf_config(hf)
    from nextlong_jax.warm_start import checkpoint_model

    return checkpoint_model(ckpt, "--ckpt")


def _hidden_and_head(model: Llama, params, features: dict[str, jnp.ndarray], sequence_shards: int):
    """Final hidden states [B, L, E] of `features` (in zig-zag order when sharded) and the head [E, V]."""
    if sequence_shards > 1:
        check_sequence_parallel(model, sequence_shards)

    def run(module: Llama):
        return module.hidden_states(features["input_ids"], features["positions"], features["segment_ids"]), module.head()

    return model.apply({"params": params}, method=run)


def _answer_scores(model: Llama, params, features: dict[str, jnp.ndarray], where: jnp.ndarray,
                   targets: jnp.ndarray, sequence_shards: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """where/targets [B, A] (positions into `features`, the tokens they predict) -> logprob, rank [B, A]."""
    hidden, head = _hidden_and_head(model, params, features, sequence_shards)
    picked = jnp.take_along_axis(hidden, where[..., None], axis=1)  # [B, A, E]
    logits = jnp.einsum("bae,ev->bav", picked, head, preferred_element_type=jnp.float32)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    return (gold[..., 0] - jax.nn.logsumexp(logits, axis=-1)), jnp.sum(logits > gold, axis=-1)


def _token_nll(model: Llama, params, features: dict[str, jnp.ndarray], targets: jnp.ndarray,
               sequence_shards: int) -> jnp.ndarray:
    """nll [B, L] of each position's target, over vocabulary blocks (no [L, vocab] logits)."""
    hidden, head = _hidden_and_head(model, params, features, sequence_shards)
    return target_loss(hidden, head, targets, jnp.ones(targets.shape, jnp.float32),
                       block_size=model.runtime.logits_block_size,
                       gathers_head=model.runtime.loss_gathers_head)[2]


@dataclasses.dataclass
class Evaluator:
    config: Config
    mesh: Any
    model: Llama
    params: Any
    batch_sharding: NamedSharding

    @classmethod
    def load(cls, config: Config, *, ckpt: Path | None = None, hf: Path | None = None) -> "Evaluator":
        """Exactly one of `ckpt` (RUN/checkpoints/STEP) or `hf` (a local HF Llama directory)."""
        from nextlong_jax.warm_start import checkpoint_params, hf_params

        start_runtime()
        # The architecture (rope included) is the stored model's; how it runs is the training config's.
        # One row per batch shard; no optimizer steps, so no accumulation.
        config = dataclasses.replace(config, model=stored_model(ckpt, hf), runtime=config.runtime.for_inference(),
                                     data=dataclasses.replace(config.data, batch_size=jax.device_count()),
                                     optimizer=dataclasses.replace(config.optimizer, grad_accum=1))
        mesh = build_mesh(config)
        with jax.set_mesh(mesh), axis_rules():
            setup = build(config, mesh)
            abstract = abstract_state(setup).params
            if hf is not None:
                params = jax.device_put(hf_params(hf, config.model, config.runtime.jnp_param_dtype),
                                        setup.state_shardings.params)
            else:
                params = checkpoint_params(ckpt, abstract)
        return cls(config, mesh, setup.model, params, setup.batch_sharding)

    @property
    def rows(self) -> int:
        """Probes per forward pass: one per batch shard."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def score(self, probes: list[Probe], progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-probability, rank) of every answer token of each probe, in order; probes of one
        length go through together, `rows` at a time. `progress`: a tqdm bar to advance."""
        return self._scores([(p.prompt_ids, p.answer_ids) for p in probes], [p.length for p in probes], progress)

    def continuation_scores(self, pairs: list[tuple[list[int], list[int]]],
                            progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(log-probability, rank) of each continuation's tokens after its context, for (context ids,
        continuation ids) pairs; pairs of similar length share a forward pass (lengths bucketed as
        the decoder's prompts are)."""
        shards = self.mesh.shape["sequence"]
        block = self.model.runtime.attention_block_size
        return self._scores(pairs, [bucket(len(c) + len(t), 2 * shards, block) for c, t in pairs], progress)

    def _scores(self, pairs: list[tuple[list[int], list[int]]], lengths: list[int],
                progress) -> list[tuple[np.ndarray, np.ndarray]]:
        longest, trained = max(len(c) + len(t) for c, t in pairs), self.model.config.max_position_embeddings
        if longest > trained:
            logger.warning("scoring %d tokens, past the %d the model was trained to (max_position_embeddings): "
                           "an extrapolation", longest, trained)
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        by_length: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            by_length.setdefault(length, []).append(i)
        for length, members in by_length.items():
            for start in range(0, len(members), self.rows):
                chunk = members[start:start + self.rows]
                for i, scores in zip(chunk, self._score_batch([pairs[i] for i in chunk], length)):
                    out[i] = scores
                if progress is not None:
                    progress.update(len(chunk))
        return [out[i] for i in range(len(pairs))]

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
        shards = self.mesh.shape["sequence"]
        if length % (2 * shards):
            raise TrainError(f"probe length {length} must divide by 2*mesh.sequence={2 * shards}")
        answer = max(len(cont) for _, cont in pairs)
        ids = np.zeros((self.rows, length), np.int32)
        segments = np.zeros((self.rows, length), np.int32)
        where = np.zeros((self.rows, answer), np.int32)
        targets = np.zeros((self.rows, answer), np.int32)
        # Rows past the probes, and each row past its answer, stay padding (segment 0): a prompt takes
        # `length` less the task's generation budget, so prompt + answer may fall short of it.
        for row, (context, continuation) in enumerate(pairs):
            tokens = list(context) + list(continuation)
            ids[row, :len(tokens)], segments[row, :len(tokens)] = tokens, 1
            n = len(continuation)
            # Position t predicts token t + 1: the answer's tokens are predicted from the ones before them.
            where[row, :n] = np.arange(len(context) - 1, len(tokens) - 1)
            targets[row, :n] = continuation
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (self.rows, length))
        features = {"input_ids": ids, "positions": positions, "segment_ids": segments}
        if shards > 1:
            features = load_balance.reorder(features, shards)
            where = np.argsort(load_balance.token_index(length, shards))[where].astype(np.int32)
        with jax.set_mesh(self.mesh), axis_rules():
            features = {k: jax.device_put(np.ascontiguousarray(v), self.batch_sharding) for k, v in features.items()}
            replicated = NamedSharding(self.mesh, PartitionSpec())
            logprob, rank = self._score_fn(self.params, features, jax.device_put(where, replicated),
                                           jax.device_put(targets, replicated))
        logprob, rank = np.asarray(logprob), np.asarray(rank)
        return [(logprob[row, :len(cont)], rank[row, :len(cont)]) for row, (_, cont) in enumerate(pairs)]

    def token_nll(self, input_ids: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
        """nll [N, L] of predicting token t + 1 at each position t of N packed rows (0 where the next
        token is in another segment, or at the end), `rows` at a time."""
        n, length = input_ids.shape
        shards = self.mesh.shape["sequence"]
        if length % (2 * shards):
            raise TrainError(f"sequences of {length} tokens must divide by 2*mesh.sequence={2 * shards}")
        out = np.zeros((n, length), np.float32)
        for start in range(0, n, self.rows):
            rows = slice(start, min(n, start + self.rows))
            batch = {k: np.zeros((self.rows, length), np.int32) for k in ("input_ids", "positions", "segment_ids")}
            for k, v in zip(batch, (input_ids, positions, segment_ids)):
                batch[k][:rows.stop - rows.start] = v[rows]
            targets, weights = next_token_targets(batch["input_ids"], np.ones((self.rows, length), np.float32),
                                                  batch["segment_ids"])
            features = {**batch, "targets": np.asarray(targets, np.int32)}
            if shards > 1:
                features = load_balance.reorder(features, shards)
            with jax.set_mesh(self.mesh), axis_rules():
                placed = {k: jax.device_put(np.ascontiguousarray(v), self.batch_sharding) for k, v in features.items()}
                targets = placed.pop("targets")
                nll = np.asarray(self._nll_fn(self.params, placed, targets))
            if shards > 1:
                nll = load_balance.unzigzag(nll, shards)
            out[rows] = (nll * np.asarray(weights))[:rows.stop - rows.start]
        return out

    def decoder(self, detokenize=None, batch_size: int | None = None) -> Decoder:
        """A KV-cache decoder for this model on this mesh, `batch_size` prompts at a time (default:
        one per batch shard)."""
        return Decoder(self.model, self.params, self.mesh, batch_size or self.rows, detokenize)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids=(),
                 batch_size: int | None = None) -> list[list[int]]:
        """Greedy continuations of `prompts`, `batch_size` at a time (default: one per batch shard): the new
        token ids, without the stop id a row ended on."""
        if batch_size not in self._decoders:
            self._decoders[batch_size] = self.decoder(batch_size=batch_size)
        done = self._decoders[batch_size].generate(prompts, max_new_tokens, stop_ids=stop_ids)
        return [c.tokens[:-1] if c.finish == "eos" else c.tokens for c in done]

    @cached_property
    def _decoders(self) -> dict[int | None, Decoder]:
        return {}

    @cached_property
    def _nll_fn(self):
        return jax.jit(partial(_token_nll, self.model, sequence_shards=self.mesh.shape["sequence"]))

    @cached_property
    def _score_fn(self):
        return jax.jit(partial(_answer_scores, self.model, sequence_shards=self.mesh.shape["sequence"]))
