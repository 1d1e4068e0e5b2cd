"""Warm start: a fresh run's first state from a Hugging Face Llama directory or from a step of an
earlier run (an orbax checkpoint, as the 64K -> 512K pair chains them), checked against the
configured model. Rope settings may differ (a longer stage raises rope_theta); the architecture may not.

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

from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.step import TrainState
from nextlong_jax.train_config import Config
from nextlong_jax.train_setup import Setup, TrainError, abstract_state, init_state

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")


def initial_state(setup: Setup, config: Config, *, init_from_hf: Path | None = None, init_from: Path | None = None,
                  init_optimizer: bool = False) -> TrainState:
    """A fresh run's state: seeded, with the parameters of `init_from_hf` or `init_from` if given, and
    with `init_optimizer` (which goes with `init_from`) Adam's state of that checkpoint step too."""
    abstract = abstract_state(setup)
    params = None
    if init_from_hf:
        params = hf_params(init_from_hf, config.model)
    elif init_from:
        # Every check before any array is read: a misfit fails in seconds, not after an 8B load.
        check_checkpoint(init_from, config.model, abstract.opt_state if init_optimizer else None)
        params = checkpoint_params(init_from, abstract.params)
    state = init_state(setup, config.train.seed, params)
    if init_optimizer:
        state = state._replace(opt_state=checkpoint_adam_state(init_from, state.opt_state, abstract.opt_state))
    return state


def _check_architecture(flag: str, source: Path, theirs: LlamaConfig, ours: LlamaConfig) -> None:
    diff = [f"{f}: config {getattr(ours, f)} vs {source} {getattr(theirs, f)}"
            for f in SHAPE_FIELDS if getattr(ours, f) != getattr(theirs, f)]
    if diff:
        raise TrainError(f"{flag} architecture differs from the config (" + "; ".join(diff) + ")")


def hf_params(hf_dir: Path, model_config: LlamaConfig) -> Any:
    """Host weights of an HF Llama directory."""
    from nextlong_jax.convert import read_hf_config, read_hf_params

    _check_architecture("--init-from-hf", hf_dir, read_hf_config(hf_dir), model_config)
    params = read_hf_params(hf_dir, model_config)
    return jax.tree.map(lambda x: np.asarray(x, model_config.jnp_param_dtype), params)


def check_checkpoint(ckpt_dir: Path, model_config: LlamaConfig, abstract_opt_state: Any | None = None) -> None:
    """An orbax checkpoint step (RUN/checkpoints/STEP, or `nextlong-convert hf-to-orbax` output) holds
    the configured architecture and, if `abstract_opt_state` is given, an optimizer state of its
    structure and shapes; only metadata is read."""
    import orbax.checkpoint as ocp

    ckpt_dir = ckpt_dir.resolve()
    _check_architecture("--init-from", ckpt_dir, checkpoint_model(ckpt_dir), model_config)
    if abstract_opt_state is None:
        return
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
    """The `params` of a checkpoint step (checked by `check_checkpoint`), read straight into the
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
    step's (checked by `check_checkpoint`), read into the shardings of `abstract_opt_state`; every other
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
