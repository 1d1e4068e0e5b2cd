"""The train step: weighted next-token loss, gradients (optionally accumulated), one AdamW update.

Loss = sum(w * nll) / sum(w) over the global batch (the weight convention is stated once, in
`nextlong_jax.model.loss`). Gradient accumulation sums unnormalised microbatch gradients and
divides once by the global weight sum, so accumulating is exactly a bigger batch.

With the length sharded over `sequence`, targets are shifted in the original order, then every
[B, L] feature is put in zig-zag order inside the step (see `nextlong_jax.load_balance`), and the
loss, being position-wise, needs no un-reordering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nextlong_jax import load_balance
from nextlong_contract.schema import ROLE_META, ROLE_NEGATIVE
from nextlong_jax.model.attention.backends import require_sequence_parallel
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.loss import next_token_targets, target_loss


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data; each step splits off its dropout key, so a resumed run draws the same


def _hidden_and_head(module: Llama, input_ids, positions, segment_ids):
    return module.hidden_states(input_ids, positions, segment_ids), module.head()


def check_sequence_parallel(model: Llama, sequence_shards: int) -> None:
    """Sequence-parallel attention takes its mesh from the ambient context at trace time; without it the
    model would silently run single-device attention on zig-zag-ordered tokens, i.e. a wrong causal mask."""
    require_sequence_parallel(model.runtime.attention_backend, sequence_shards)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("sequence") != sequence_shards:
        raise ValueError(f"sequence-parallel step traced outside `jax.set_mesh` of a mesh with sequence="
                         f"{sequence_shards} (ambient mesh: {None if mesh.empty else dict(mesh.shape)})")


def loss_sums(model: Llama, params: Any, batch: dict[str, jnp.ndarray], sequence_shards: int = 1,
              dropout_key: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(nll sums, weight sums), each [3]: training weights, meta tokens, negative tokens.

    The role losses are unweighted NLL on that role's tokens (so they stay comparable whatever
    `loss.negative_weight` is), read off the per-token nll of the one pass that scores the training
    weights. `sequence_shards` > 1 runs the model in zig-zag order, sharded over that many shards of
    the ambient mesh. `dropout_key` turns on the model's dropout (when `dropout_rate` > 0).
    """
    roles = batch["token_roles"]
    weights = jnp.stack([batch["loss_weights"].astype(jnp.float32), (roles == ROLE_META).astype(jnp.float32),
                         (roles == ROLE_NEGATIVE).astype(jnp.float32)])
    # Shift first: "the next token" only means something in the original order.
    targets, weights = next_token_targets(batch["input_ids"], weights, batch["segment_ids"])
    features = dict(input_ids=batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                    targets=targets, weights=jnp.moveaxis(weights, 0, -1))  # weights [B, L, 3]: reorder wants L second
    if sequence_shards > 1:
        check_sequence_parallel(model, sequence_shards)
        features = load_balance.reorder(features, sequence_shards)
    hidden, head = model.apply({"params": params}, features["input_ids"], features["positions"],
                               features["segment_ids"], method=_hidden_and_head,
                               rngs=None if dropout_key is None else {"dropout": dropout_key})
    weights = features["weights"]
    nll_sum, _, nll = target_loss(hidden, head, features["targets"], weights[..., 0],
                                  block_size=model.runtime.logits_block_size,
                                  gathers_head=model.runtime.loss_gathers_head)
    role_nll = jnp.einsum("bl,blr->r", nll, weights[..., 1:])
    return jnp.concatenate([nll_sum[None], role_nll]), jnp.sum(weights, axis=(0, 1))


def _safe_ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def slot_rows(batch: dict[str, jnp.ndarray], slots: int) -> dict[str, jnp.ndarray]:
    """[B, L] rows of `slots` documents each in their own L / slots tokens -> [B * slots, L / slots].

    The same loss and gradients at a fraction of the attention work: no document attends across its
    slot, and a slot's last token has no target (the next token starts another document), which
    `next_token_targets` finds either way. Trace inside `axis_rules()`.
    """
    rows = {k: x.reshape(x.shape[0] * slots, x.shape[1] // slots) for k, x in batch.items()}
    return {k: nn.with_logical_constraint(x, ("batch", "length")) for k, x in rows.items()}


def make_train_step(model: Llama, tx: optax.GradientTransformation, grad_accum: int,
                    sequence_shards: int = 1, slots: int = 1) -> Callable:
    """Trace the result inside `jax.set_mesh` of a mesh with that many `sequence` shards (see `loss_sums`).

    `slots` > 1: each row holds that many documents in slots of L / slots tokens (a manifest's
    `document_len`), trained as rows of that length (`slot_rows`)."""
    def grad_sums(params, microbatch, key):
        def objective(p):
            nll, w = loss_sums(model, p, microbatch, sequence_shards, key)
            return nll[0], (nll, w)
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def step(state: TrainState, batch: dict[str, jnp.ndarray]):
        if slots > 1:
            batch = slot_rows(batch, slots)
        rng, dropout = jax.random.split(jax.random.wrap_key_data(state.rng))
        if grad_accum == 1:
            grads, (nll, w) = grad_sums(state.params, batch, dropout)
        else:
            # [B, L] -> [A, B/A, L] taking rows A apart, so each device's rows stay on that device.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, grad_accum, *x.shape[1:]), 0, 1), batch)
            zeros = (jax.tree.map(jnp.zeros_like, state.params), (jnp.zeros(3), jnp.zeros(3)))

            def body(acc, xs):
                mb, key = xs
                return jax.tree.map(jnp.add, acc, grad_sums(state.params, mb, key)), None

            (grads, (nll, w)), _ = jax.lax.scan(body, zeros, (micro, jax.random.split(dropout, grad_accum)))
        total = jnp.where(w[0] > 0, w[0], 1.0)
        grads = jax.tree.map(lambda g: g / total, grads)
        grad_norm = optax.global_norm(grads)
        loss = _safe_ratio(nll[0], w[0])
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # A non-finite step leaves params and optimizer state (its step count too) untouched.
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (optax.apply_updates(state.params, updates), opt_state),
                                         (state.params, state.opt_state))
        new_state = TrainState(params, opt_state, jax.random.key_data(rng))
        metrics = dict(loss=loss, meta_loss=_safe_ratio(nll[1], w[1]), negative_loss=_safe_ratio(nll[2], w[2]),
                       grad_norm=grad_norm, finite=finite, weight=w[0])
        return new_state, metrics

    return step
