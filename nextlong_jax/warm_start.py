"""Warm start: a fresh run's first state from a Hugging Face Llama directory or from a step of an
earlier run (an orbax checkpoint, as the 64K -> 512K pair chains them).

The run trains the model it starts from: its shapes, norm epsilon, tied embeddings, rope scaling type
and special token ids are that model's whatever the config says (the start message names each key
where they differ). The config changes only what a context extension changes: rope_theta, the
parameters of the model's rope scaling, and max_position_embeddings (`started_model`).

A warm start takes the parameters. With `init_optimizer` (`--init-optimizer`) a checkpoint step also
gives Adam's moments and Adam's own update count, as in the NExtLong authors' 512K stage, which
loaded the 64K stage's optimizer state: torch AdamW keeps a step per parameter in it, so bias
correction continues (restarted on carried moments, it would scale the first update by
sqrt(1 - b2) / (1 - b1), 2.2x at 0.9/0.95). The learning-rate schedule's count and the training step
start at 0, as theirs did (they loaded no scheduler state). Checkpoint arrays are read straight
into this run's shardings, so the mesh may differ from the one that wrote them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from nextlong_jax.model.config import LlamaConfig, RopeScaling
from nextlong_jax.step import TrainState
from nextlong_jax.train_config import Config
from nextlong_jax.train_setup import Setup, TrainError, abstract_state, init_state

# What a warm start keeps of the model it starts from, whatever the config says: the shapes of its
# parameters, its norm, and the special ids its tokenizer and chat template use.
MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id")
# What the config may change, as a context extension does.
EXTENSION_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")


def _rope_type(model: LlamaConfig) -> str:
    return model.rope_scaling.rope_type if model.rope_scaling else "default"


def started_model(source: LlamaConfig, configured: LlamaConfig, seq_len: int) -> LlamaConfig:
    """The model a run warm-started from `source` trains on `seq_len`-token sequences: `source`'s
    MODEL_FIELDS and rope scaling type; the config's rope_theta, and its rope_scaling where it is of
    that type; the larger max_position_embeddings of the two (training on shorter sequences does not
    shorten a model's context), which must cover `seq_len`. The config's dropout_rate applies."""
    model = configured.replace(
        **{f: getattr(source, f) for f in MODEL_FIELDS},
        rope_scaling=configured.rope_scaling if _rope_type(configured) == _rope_type(source) else source.rope_scaling,
        max_position_embeddings=max(source.max_position_embeddings, configured.max_position_embeddings))
    if model.max_position_embeddings < seq_len:
        # Raising it silently would hide a context extension whose rope settings nobody chose.
        raise TrainError(f"data.seq_len={seq_len} is longer than max_position_embeddings (the model's "
                         f"{source.max_position_embeddings}, the config's {configured.max_position_embeddings}): "
                         f"to extend the context set model.max_position_embeddings={seq_len}, and usually "
                         "model.rope_theta")
    return model


def _show(value: Any) -> str:
    if isinstance(value, float):  # rope_theta 8000000, not 8e+06; rms_norm_eps 1e-05, not 9.999999747378752e-06
        return str(int(value)) if value.is_integer() else f"{value:g}"
    if isinstance(value, RopeScaling):
        return ",".join(f"{k}={_show(v)}" for k, v in value.to_hf().items())
    return "none" if value is None else str(value)


def start_notes(source: LlamaConfig, configured: LlamaConfig, model: LlamaConfig) -> str:
    """Where `model` (`started_model` of `source` and `configured`) is not the source's ("rope_theta
    100000 -> 500000 (config)") and where it kept the source's over the config's ("rms_norm_eps 1e-05
    (model; config 1e-06)")."""
    fields = MODEL_FIELDS + EXTENSION_FIELDS
    changed = [f"{f} {_show(getattr(source, f))} -> {_show(getattr(model, f))} (config)"
               for f in fields if getattr(model, f) != getattr(source, f)]
    kept = [f"{f} {_show(getattr(model, f))} (model; config {_show(getattr(configured, f))})"
            for f in fields if getattr(model, f) == getattr(source, f) != getattr(configured, f)]
    return "; ".join(changed + kept) or "the config's architecture is the model's"


def warm_model(config: Config, *, init_from_hf: Path | None = None, init_from: Path | None = None
               ) -> tuple[LlamaConfig, str]:
    """The model a run started from `init_from_hf` or `init_from` trains (`started_model`), and its
    start message; only configs are read."""
    from nextlong_jax.convert import read_hf_config

    source = read_hf_config(init_from_hf) if init_from_hf else checkpoint_model(init_from)
    model = started_model(source, config.model, config.data.seq_len)
    return model, f"model from {init_from_hf or init_from}: {start_notes(source, config.model, model)}"


def initial_state(setup: Setup, config: Config, *, init_from_hf: Path | None = None, init_from: Path | None = None,
                  init_optimizer: bool = False) -> TrainState:
    """A fresh run's state: seeded, with the parameters of `init_from_hf` or `init_from` if given (of the
    architecture `warm_model` gives), and with `init_optimizer` (which goes with `init_from`) Adam's
    state of that checkpoint step too."""
    abstract = abstract_state(setup)
    params = None
    if init_from_hf:
        params = hf_params(init_from_hf, config.model, config.runtime.jnp_param_dtype)
    elif init_from:
        if init_optimizer:  # checked before any array is read: a misfit fails in seconds, not after an 8B load
            check_optimizer_state(init_from, abstract.opt_state)
        params = checkpoint_params(init_from, abstract.params)
    state = init_state(setup, config.train.seed, params)
    if init_optimizer:
        state = state._replace(opt_state=checkpoint_adam_state(init_from, state.opt_state, abstract.opt_state))
    return state


def hf_params(hf_dir: Path, model_config: LlamaConfig, dtype: np.dtype) -> Any:
    """Host weights of an HF Llama directory of `model_config`'s shapes, in `dtype` (the runtime's param_dtype)."""
    from nextlong_jax.convert import read_hf_params

    params = read_hf_params(hf_dir, model_config)
    return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def check_optimizer_state(ckpt_dir: Path, abstract_opt_state: Any) -> None:
    """An orbax checkpoint step (RUN/checkpoints/STEP) holds an optimizer state of `abstract_opt_state`'s
    structure and shapes; only metadata is read."""
    import orbax.checkpoint as ocp

    ckpt_dir = ckpt_dir.resolve()
    if not (ckpt_dir / "opt_state").is_dir():
        raise TrainError(f"--init-optimizer: {ckpt_dir} holds no optimizer state (opt_state/): give a training "
                         "run's RUN/checkpoints/STEP, not a converted model")
    # Compared here rather than left to orbax, whose error names tree types, not leaves.
    saved = _leaf_shapes(ocp.PyTreeCheckpointer().metadata(ckpt_dir / "opt_state").item_metadata.tree)
    wanted = _leaf_shapes(abstract_opt_state)
    differ = [f"{k} {saved.get(k)} vs {wanted.get(k)}" for k in sorted(saved.keys() | wanted.keys())
              if saved.get(k) != wanted.get(k)]
    if differ:
        raise TrainError(f"--init-optimizer {ckpt_dir}: its optimizer state does not fit this run's optimizer "
                         f"({len(differ)} leaves differ, checkpoint shape vs this run's, None where absent: "
                         + ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else "") + ")")


def checkpoint_model(ckpt_dir: Path, flag: str = "--init-from") -> LlamaConfig:
    """The architecture an orbax checkpoint step holds (read from its `config`, no array)."""
    import orbax.checkpoint as ocp

    if not (ckpt_dir / "params").is_dir() or not (ckpt_dir / "config").is_dir():
        raise TrainError(f"{flag} {ckpt_dir}: not a checkpoint step (needs params/ and config/; give "
                         "RUN/checkpoints/STEP)")
    stored = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(ckpt_dir.resolve() / "config")
    return LlamaConfig.from_hf_dict(stored)


def checkpoint_params(ckpt_dir: Path, abstract_params: Any) -> Any:
    """The `params` of a checkpoint step (of the architecture `warm_model` gives), read straight into the
    shardings and dtype of `abstract_params`: no host copy of the model."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(params=ocp.PyTreeCheckpointHandler()))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    try:
        restored = checkpointer.restore(ckpt_dir.resolve(), ocp.args.Composite(
            params=ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args)))
    except (ValueError, KeyError) as e:
        raise TrainError(f"--init-from {ckpt_dir}: parameters do not fit the model ({' '.join(str(e).split())[:300]})")
    return restored["params"]


def checkpoint_adam_state(ckpt_dir: Path, fresh_opt_state: Any, abstract_opt_state: Any) -> Any:
    """`fresh_opt_state` with each `optax.ScaleByAdamState` (mu, nu, count) replaced by the checkpoint
    step's (checked by `check_optimizer_state`), read into the shardings of `abstract_opt_state`; every other
    part, the schedule's count among them, stays fresh."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(opt_state=ocp.PyTreeCheckpointHandler()))
    restored = checkpointer.restore(ckpt_dir.resolve(), ocp.args.Composite(opt_state=ocp.args.PyTreeRestore(
        item=abstract_opt_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_opt_state))))
    return jax.tree.map(lambda fresh, ckpt: ckpt if _is_adam(fresh) else fresh, fresh_opt_state,
                        restored["opt_state"], is_leaf=_is_adam)


def _is_adam(node: Any) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"1/0/mu/embed_tokens": shape, ...}, named alike for a state and for orbax's metadata of it."""
    def name(key: Any) -> str:
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
    return {"/".join(map(name, path)): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
