"""Warm start: the parameters of a Hugging Face Llama directory or of an orbax checkpoint (a step of
an earlier run, as the 64K -> 512K recipe chains them), checked against the configured model.

Only parameters come over: the optimizer starts fresh. Rope settings may differ (a longer stage
raises rope_theta); the architecture may not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from nextlong_jax.model.config import LlamaConfig
from nextlong_jax.train_setup import TrainError

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings")


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


def checkpoint_params(ckpt_dir: Path, model_config: LlamaConfig, abstract_params: Any) -> Any:
    """The `params` of an orbax checkpoint step (RUN/checkpoints/STEP, or `nextlong-convert hf-to-orbax`
    output), read straight into the shardings and dtype of `abstract_params`: no host copy of the model."""
    import orbax.checkpoint as ocp

    if not (ckpt_dir / "params").is_dir() or not (ckpt_dir / "config").is_dir():
        raise TrainError(f"--init-from {ckpt_dir}: not a checkpoint step (needs params/ and config/; "
                         "give RUN/checkpoints/STEP)")
    ckpt_dir = ckpt_dir.resolve()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        params=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler()))
    config = checkpointer.restore(ckpt_dir, ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    _check_architecture("--init-from", ckpt_dir, LlamaConfig.from_hf_dict(config), model_config)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    try:
        restored = checkpointer.restore(ckpt_dir, ocp.args.Composite(
            params=ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args)))
    except (ValueError, KeyError) as e:
        raise TrainError(f"--init-from {ckpt_dir}: parameters do not fit the model ({' '.join(str(e).split())[:300]})")
    return restored["params"]
