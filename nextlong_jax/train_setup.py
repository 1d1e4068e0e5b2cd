"""From a `Config` to what the train loop (or a compile-only plan) needs: mesh, model, optimizer,
shardings, and the initial, abstract or restored state laid out on the mesh."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextlong_jax.hardware import claim_gpu_memory
from nextlong_contract.schema import FLOAT_FEATURES, TRAINING_FEATURES
from nextlong_jax.model.attention import BackendError, resolve
from nextlong_jax.model.attention.backends import platform_family
from nextlong_jax.model.llama import Llama
from nextlong_jax.model.runtime import Runtime
from nextlong_jax.optimizer import build_optimizer
from nextlong_jax.sharding import logical_sharding, logical_shardings, make_mesh
from nextlong_jax.step import TrainState, make_train_step
from nextlong_jax.train_config import Config


class TrainError(RuntimeError):
    """A user-facing reason the run cannot start or continue."""


def start_runtime() -> None:
    """Before jax's backend starts: claim the GPU memory plans count on (`hardware.claim_gpu_memory`),
    and join the other hosts when the environment describes a multi-host job.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID,
    the same on every host but the id. Managed (TPU pod slice, SLURM, Open MPI): jax reads its own.
    """
    claim_gpu_memory()
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


def build_mesh(config: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The configured mesh over `devices` (default: every device of the job), checked against the config."""
    m = config.mesh
    try:
        mesh = make_mesh(m.data, m.fsdp, m.tensor, m.sequence, devices=devices)
    except ValueError as e:
        raise TrainError(f"mesh: {e}") from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"] * config.optimizer.grad_accum
    if config.data.batch_size % shards:
        raise TrainError(f"data.batch_size={config.data.batch_size} must divide by data*fsdp*grad_accum={shards}")
    sequence = mesh.shape["sequence"]
    if config.data.seq_len % (2 * sequence):
        raise TrainError(f"data.seq_len={config.data.seq_len} must divide by 2*mesh.sequence={2 * sequence} "
                         "(zig-zag load balancing)")
    return mesh


def resolved_runtime(config: Config, mesh: Mesh) -> Runtime:
    """The runtime with its attention backend resolved, once, for the platform the mesh's devices
    are (what the program is compiled for, not necessarily this host)."""
    try:
        backend = resolve(config.runtime.attention_backend, mesh.devices.flat[0].platform,
                          sequence_shards=mesh.shape["sequence"], length=config.data.seq_len,
                          allow_fallback=config.runtime.attention_allow_fallback)
    except BackendError as e:
        raise TrainError(str(e)) from None
    return config.runtime.replace(attention_backend=backend)


class Setup(NamedTuple):
    model: Llama
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    # `config.xla`'s flags for the mesh's platform, passed to every compile of the step (`jit_step`)
    compiler_options: dict[str, str | int | bool] = {}


def _abstract_key() -> jax.ShapeDtypeStruct:
    # Not a concrete key: inside `jax.set_mesh` of compile-only devices a concrete array would be
    # placed on devices that cannot hold it.
    return jax.eval_shape(lambda: jax.random.key(0))


def build(config: Config, mesh: Mesh) -> Setup:
    """Model, optimizer and shardings; call inside `jax.set_mesh(mesh)` and `axis_rules()`."""
    model = Llama(config.model, resolved_runtime(config, mesh))
    tx, schedule = build_optimizer(config.optimizer, config.train.steps)

    def boxed_state(rng):
        ids = jnp.zeros((1, 8), jnp.int32)  # parameter shapes do not depend on the length
        params = model.init(rng, ids, ids, ids)["params"]
        return params, tx.init(params)

    # Optimizer state built from boxed params keeps the logical names, so it shards like the params.
    params, opt_state = logical_shardings(jax.eval_shape(boxed_state, _abstract_key()), mesh)
    return Setup(model, tx, schedule, mesh, TrainState(params, opt_state, NamedSharding(mesh, PartitionSpec())),
                 logical_sharding(mesh, ("batch", "length")),
                 config.xla.options(platform_family(mesh.devices.flat[0].platform)))


def seed_keys(seed_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(parameter init key, training key data) of a run's `jax.random.key(train.seed)`."""
    init_key, train_key = jax.random.split(seed_key)
    return init_key, jax.random.key_data(train_key)


def _fresh_state(setup: Setup, seed_key: jax.Array, params: Any | None = None) -> TrainState:
    init_key, train_key = seed_keys(seed_key)
    if params is None:
        ids = jnp.zeros((1, 8), jnp.int32)
        params = nn.unbox(setup.model.init(init_key, ids, ids, ids)["params"])
    return TrainState(params, setup.tx.init(params), train_key)


def init_state(setup: Setup, seed: int, params: Any | None = None) -> TrainState:
    """Fresh state from `seed`, or around given host params (an HF checkpoint's), laid out as the rules say."""
    if params is not None:
        params = jax.device_put(params, setup.state_shardings.params)
    return jax.jit(partial(_fresh_state, setup), out_shardings=setup.state_shardings)(jax.random.key(seed), params)


def abstract_state(setup: Setup) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (what a restore fills in, what a plan compiles)."""
    shapes = jax.eval_shape(partial(_fresh_state, setup), _abstract_key())
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        setup.state_shardings)


def abstract_batch(setup: Setup, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes, as shapes with the batch sharding."""
    return {name: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if name in FLOAT_FEATURES else jnp.int32,
                                       sharding=setup.batch_sharding) for name in TRAINING_FEATURES}


def slot_counts(seq_len: int, document_lens: Iterable[int | None]) -> list[int]:
    """The train-step programs rows of these document lengths take, as `jit_step`'s `slots` (1: whole rows;
    a length of None or seq_len is a whole row)."""
    return sorted({seq_len // (length or seq_len) for length in document_lens})


def rows_named(slots: int) -> str:
    """How messages and plans name the rows a `slots` program takes."""
    return "whole rows" if slots == 1 else f"rows of {slots} documents in slots"


def jit_step(setup: Setup, grad_accum: int, slots: int = 1) -> Callable:
    """The jitted train step; `slots` > 1 for batches of rows with documents in slots (`step.slot_rows`)."""
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(make_train_step(setup.model, setup.tx, grad_accum, setup.mesh.shape["sequence"], slots),
                   in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, replicated), donate_argnums=0,
                   compiler_options=setup.compiler_options or None)
