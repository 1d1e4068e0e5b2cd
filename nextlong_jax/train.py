"""Train step and loop: weighted next-token loss, AdamW, sharded by the logical rules.

Loss = sum(w * nll) / sum(w) over the global batch (the weight convention is stated once, in
`nextlong_jax.model.loss`). Gradient accumulation sums unnormalised microbatch gradients and
divides once by the global weight sum, so accumulating is exactly a bigger batch.

With `mesh.sequence` > 1 the length is sharded and attention is the load-balanced ring: targets are
shifted in the original order, then every [B, L] feature is put in zig-zag order inside the step
(see `nextlong_jax.load_balance`), and the loss, being position-wise, needs no un-reordering.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextlong_jax import load_balance
from nextlong_jax.data import FEATURES, ROLE_META, ROLE_NEGATIVE, BatchIterator, find_shards, host_shards, resume_batches
from nextlong_jax.hardware import published_bf16_peak
from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.loss import next_token_targets, target_loss
from nextlong_jax.sharding import axis_rules, logical_sharding, logical_shardings, make_mesh
from nextlong_jax.train_config import Config, OptimizerConfig


class TrainError(RuntimeError):
    """A user-facing reason the run cannot start or continue."""


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 key data; each step splits off its dropout key, so a resumed run draws the same


# ---------------------------------------------------------------- optimizer

def lr_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    decay_steps = max(steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.final_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: Any, decay_norms_and_embeddings: bool) -> Any:
    """True where weight decay applies. Norm scales are stacked [layers, E], so rank cannot tell them apart."""
    def wants_decay(path, _):
        names = {getattr(k, "key", None) for k in path}
        return decay_norms_and_embeddings or not ({"scale", "embed_tokens"} & names)
    return jax.tree_util.tree_map_with_path(wants_decay, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def build_optimizer(cfg: OptimizerConfig, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(cfg, steps)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=partial(decay_mask, decay_norms_and_embeddings=cfg.decay_norms_and_embeddings))
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


# ---------------------------------------------------------------- loss and step

def _hidden_and_head(module: Llama, input_ids, positions, segment_ids):
    return module.hidden_states(input_ids, positions, segment_ids), module.head()


def _check_ring(model: Llama, sequence_shards: int) -> None:
    """Ring attention takes its mesh from the ambient context at trace time; without it the model would
    silently run blockwise attention on zig-zag-ordered tokens, i.e. with a wrong causal mask."""
    if model.config.attention_backend != "ring":
        raise TrainError(f"mesh.sequence={sequence_shards} needs model.attention_backend=ring, "
                         f"not {model.config.attention_backend!r}")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("sequence") != sequence_shards:
        raise TrainError(f"sequence-parallel step traced outside `jax.set_mesh` of a mesh with sequence="
                         f"{sequence_shards} (ambient mesh: {None if mesh.empty else dict(mesh.shape)})")


def loss_sums(model: Llama, params: Any, batch: dict[str, jnp.ndarray], sequence_shards: int = 1,
              dropout_key: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(nll sums, weight sums), each [3]: training weights, meta tokens, negative tokens.

    The role losses are unweighted NLL on that role's tokens (so they stay comparable whatever
    `loss.negative_weight` is). vmap over the weight rows shares one pass of blocked logits: the
    logits do not depend on the weights, so vmap leaves them unbatched. `sequence_shards` > 1 runs
    the model in zig-zag order for ring attention over that many shards of the ambient mesh.
    `dropout_key` turns on the model's dropout (when `dropout_rate` > 0).
    """
    roles = batch["token_roles"]
    weights = jnp.stack([batch["loss_weights"].astype(jnp.float32), (roles == ROLE_META).astype(jnp.float32),
                         (roles == ROLE_NEGATIVE).astype(jnp.float32)])
    # Shift first: "the next token" only means something in the original order.
    targets, weights = next_token_targets(batch["input_ids"], weights, batch["segment_ids"])
    features = dict(input_ids=batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                    targets=targets, weights=jnp.moveaxis(weights, 0, -1))  # weights [B, L, 3]: reorder wants L second
    if sequence_shards > 1:
        _check_ring(model, sequence_shards)
        features = load_balance.reorder(features, sequence_shards)
    hidden, head = model.apply({"params": params}, features["input_ids"], features["positions"],
                               features["segment_ids"], method=_hidden_and_head,
                               rngs=None if dropout_key is None else {"dropout": dropout_key})
    block = model.config.logits_block_size
    per_row = jax.vmap(lambda w: target_loss(hidden, head, features["targets"], w, block_size=block), in_axes=-1)
    return per_row(features["weights"])


def _safe_ratio(num, den):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def make_train_step(model: Llama, tx: optax.GradientTransformation, grad_accum: int,
                    sequence_shards: int = 1) -> Callable:
    """Trace the result inside `jax.set_mesh` of a mesh with that many `sequence` shards (see `loss_sums`)."""
    def grad_sums(params, microbatch, key):
        def objective(p):
            nll, w = loss_sums(model, p, microbatch, sequence_shards, key)
            return nll[0], (nll, w)
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def step(state: TrainState, batch: dict[str, jnp.ndarray]):
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


# ---------------------------------------------------------------- setup

def maybe_initialize_distributed() -> None:
    """Join the other hosts when the environment describes a multi-host job.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
    the same on every host but the id. Managed (TPU pod slice, SLURM, Open MPI): jax reads its own.
    """
    env = os.environ
    explicit = env.get("JAX_COORDINATOR_ADDRESS")
    managed = ("," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("SLURM_NTASKS", "1")) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if jax.distributed.is_initialized() or not (explicit or managed):
        return
    # jax itself reads only the address from the environment; the count and id come from a cluster
    # it recognises, so an explicit launch passes them here.
    count, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(explicit, int(count) if count else None, int(index) if index else None)
    except ValueError as e:
        raise TrainError(f"multi-host start failed ({e}); outside SLURM/TPU/MPI set JAX_COORDINATOR_ADDRESS, "
                         "JAX_NUM_PROCESSES and JAX_PROCESS_ID on every host") from None


def build_mesh(config: Config) -> Mesh:
    try:
        mesh = make_mesh(**dataclasses.asdict(config.mesh))
    except ValueError as e:
        raise TrainError(f"mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * config.optimizer.grad_accum
    if config.data.batch_size % shards:
        raise TrainError(f"data.batch_size={config.data.batch_size} must divide by data*fsdp*grad_accum={shards}")
    sequence = mesh.shape["sequence"]
    if sequence > 1 and config.model.attention_backend != "ring":
        raise TrainError(f"mesh.sequence={sequence} needs model.attention_backend=ring "
                         f"(got {config.model.attention_backend!r})")
    if config.data.seq_len % (2 * sequence):
        raise TrainError(f"data.seq_len={config.data.seq_len} must divide by 2*mesh.sequence={2 * sequence} "
                         "(zig-zag load balancing)")
    return mesh


class Setup(NamedTuple):
    model: Llama
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding


def _init_model(model: Llama) -> Llama:
    """The same parameters without ring attention, whose shard_map cannot take init's one-row dummy batch."""
    return Llama(model.config.replace(attention_backend="blockwise"))


def build(config: Config, mesh: Mesh) -> Setup:
    """Model, optimizer and shardings; call inside `jax.set_mesh(mesh)` and `axis_rules()`."""
    model = Llama(config.model)
    tx, schedule = build_optimizer(config.optimizer, config.train.steps)

    def boxed_state(rng):
        ids = jnp.zeros((1, config.data.seq_len), jnp.int32)
        params = _init_model(model).init(rng, ids, ids, ids)["params"]
        return params, tx.init(params)

    # Optimizer state built from boxed params keeps the logical names, so it shards like the params.
    params, opt_state = logical_shardings(jax.eval_shape(boxed_state, jax.random.key(0)), mesh)
    return Setup(model, tx, schedule, mesh, TrainState(params, opt_state, NamedSharding(mesh, PartitionSpec())),
                 logical_sharding(mesh, ("batch", "length")))


def _seed_keys(seed_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(parameter init key, training key data) of a run's `jax.random.key(train.seed)`."""
    init_key, train_key = jax.random.split(seed_key)
    return init_key, jax.random.key_data(train_key)


def _fresh_state(setup: Setup, seed_key: jax.Array, params: Any | None = None) -> TrainState:
    init_key, train_key = _seed_keys(seed_key)
    if params is None:
        ids = jnp.zeros((1, 8), jnp.int32)  # parameter shapes do not depend on the length
        params = nn.unbox(_init_model(setup.model).init(init_key, ids, ids, ids)["params"])
    return TrainState(params, setup.tx.init(params), train_key)


def init_state(setup: Setup, seed: int, params: Any | None = None) -> TrainState:
    """Fresh state from `seed`, or around given host params (an HF checkpoint's), laid out as the rules say."""
    if params is not None:
        params = jax.device_put(params, setup.state_shardings.params)
    return jax.jit(partial(_fresh_state, setup), out_shardings=setup.state_shardings)(jax.random.key(seed), params)


def abstract_state(setup: Setup) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (what a restore fills in)."""
    shapes = jax.eval_shape(partial(_fresh_state, setup), jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        setup.state_shardings)


def jit_step(setup: Setup, grad_accum: int) -> Callable:
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(make_train_step(setup.model, setup.tx, grad_accum, setup.mesh.shape["sequence"]),
                   in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0)


def host_rows(sharding: NamedSharding, global_shape: tuple[int, int]) -> tuple[int, int]:
    """(index, count): this host's devices hold row block `index` of the batch's `count` equal blocks.

    Hosts with the same block (when the sequence axis spans hosts, say) must read the same data.
    """
    spans = sorted({(rows.start or 0, global_shape[0] if rows.stop is None else rows.stop)
                    for rows, *_ in sharding.addressable_devices_indices_map(global_shape).values()})
    start, stop = spans[0][0], max(end for _, end in spans)
    size = stop - start
    if any(a > b for (_, b), (a, _) in zip(spans, spans[1:])) or global_shape[0] % size or start % size:
        raise TrainError(f"host {jax.process_index()} holds batch rows {spans}, not one block: keep the mesh's "
                         "data and fsdp axes over whole hosts")
    return start // size, global_shape[0] // size


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int | None = None
                 ) -> dict[str, jax.Array]:
    """This host's rows of the batch (whole rows: `batch_size` in all, default just these) -> global arrays.

    Passing the global shape lets every device take its own rows and columns from whole local rows,
    which is what hosts sharing rows (the sequence axis spanning hosts) need.
    """
    shape = (batch_size or len(local["input_ids"]), local["input_ids"].shape[1])
    return {k: jax.make_array_from_process_local_data(sharding, local[k], shape) for k in FEATURES}


def hf_params(hf_dir: Path, model_config: LlamaConfig) -> Any:
    """Weights of an HF Llama directory; its architecture must equal the configured one (rope may differ)."""
    from nextlong_jax.convert import read_hf_config, read_hf_params

    hf = read_hf_config(hf_dir)
    shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "tie_word_embeddings")
    diff = [f"{f}: config {getattr(model_config, f)} vs {hf_dir} {getattr(hf, f)}"
            for f in shape_fields if getattr(model_config, f) != getattr(hf, f)]
    if diff:
        raise TrainError("--init-from-hf architecture differs from the config (" + "; ".join(diff) + ")")
    params = read_hf_params(hf_dir, model_config)
    return jax.tree.map(lambda x: np.asarray(x, model_config.jnp_param_dtype), params)


def model_flops_per_token(c: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (6 x matmul params, plus causal attention scores), the usual MFU numerator."""
    e, h, kv, d, f = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    per_layer = e * (h + 2 * kv) * d + h * d * e + 3 * e * f
    dense = c.num_hidden_layers * per_layer + e * c.vocab_size
    attention = c.num_hidden_layers * 2 * h * d * seq_len  # QK^T and PV, halved by causality, x2 multiply-add
    return 6.0 * dense + 3.0 * attention


# ---------------------------------------------------------------- loop

class Reporter:
    """Where per-step metrics go (metrics.jsonl, TensorBoard, console); see train_cli."""

    def start(self, first_step: int, total_steps: int) -> None: ...
    def log(self, step: int, metrics: dict[str, float | None]) -> None: ...
    def message(self, text: str) -> None: ...


def train(config: Config, out_dir: Path, reporter: Reporter, *, init_from_hf: Path | None = None) -> int:
    """Runs (or resumes) to `train.steps`; returns the last completed step."""
    from nextlong_jax.checkpoint import Checkpointer, Preemption

    maybe_initialize_distributed()
    mesh = build_mesh(config)
    shards = find_shards(config.data.source, config.data.seq_len)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = model_flops_per_token(config.model, config.data.seq_len) * tokens_per_step
    peak = config.train.peak_flops_per_device or (
        config.model.dtype == "bfloat16" and published_bf16_peak(jax.devices()[0]))
    checkpoints = Checkpointer(out_dir / "checkpoints", config.checkpoint)
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        block, blocks = host_rows(setup.batch_sharding, (config.data.batch_size, config.data.seq_len))
        shards, per_host_batch = host_shards(shards, block, blocks), config.data.batch_size // blocks
        try:
            restored = checkpoints.restore_latest(abstract_state(setup))
        except (KeyError, ValueError) as e:
            raise TrainError(f"cannot resume from {out_dir / 'checkpoints'}: {e}. Use another --out to start "
                             "afresh, or move the checkpoints away") from None
        if restored is not None:
            state, progress = restored
            if state.rng is None:  # written before keys were saved; such runs drew no randomness
                train_key = _seed_keys(jax.random.key(config.train.seed))[1]
                state = state._replace(rng=jax.device_put(train_key, setup.state_shardings.rng))
            reporter.message(f"resumed from step {progress['step']} in {out_dir}")
        else:
            params = hf_params(init_from_hf, config.model) if init_from_hf else None
            state, progress = init_state(setup, config.train.seed, params), {"step": 0, "data": None, "skipped": 0}
        step, skipped, nonfinite_run = progress["step"], progress["skipped"], 0
        data = BatchIterator(shards, config.data, per_host_batch, negative_weight=config.loss.negative_weight,
                             start_batches=resume_batches(progress["data"], per_host_batch))
        train_step = jit_step(setup, config.optimizer.grad_accum)
        reporter.start(step, config.train.steps)
        preemption = Preemption(checkpoints)
        tick = time.perf_counter()
        while step < config.train.steps:
            lr = float(setup.schedule(step - skipped))  # optax counts applied updates only
            batch = global_batch(next(data), setup.batch_sharding, config.data.batch_size)
            state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)
            step += 1
            now = time.perf_counter()
            seconds, tick = now - tick, now
            finite = bool(metrics.pop("finite"))
            nonfinite_run = 0 if finite else nonfinite_run + 1
            skipped += not finite
            row = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items() if k != "weight"}
            row.update(lr=lr, tokens_per_s=tokens_per_step / seconds,
                       mfu=flops_per_step / seconds / (peak * mesh.size) if peak else None,
                       skipped=skipped)
            reporter.log(step, row)
            progress = {"step": step, "data": data.position, "skipped": skipped}
            stop = preemption.requested(step)
            checkpoints.save(step, state, progress, config, force=stop or step == config.train.steps)
            if nonfinite_run >= config.train.max_consecutive_nonfinite:
                checkpoints.close()
                raise TrainError(f"stopping at step {step}: loss or gradients non-finite for {nonfinite_run} steps "
                                 f"in a row ({skipped} skipped in all); lower optimizer.learning_rate or check the data")
            if stop:
                reporter.message(f"preempted: saved step {step}; rerun the same command to resume")
                break
        checkpoints.close()
    return step
