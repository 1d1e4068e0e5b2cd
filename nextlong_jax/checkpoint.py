"""Orbax checkpoints of a training run: save every N steps (async), keep K, resume from the latest.

A step directory holds `params` and `config` (the architecture as an HF config.json dict) exactly as
`nextlong_jax.convert` lays out a model checkpoint, so `nextlong-convert orbax-to-hf --ckpt
RUN/checkpoints/STEP` exports it; `opt_state`, `rng` (the training key) and `progress` (step, data
position, skipped updates, the full training config) sit beside them.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import jax

from nextlong_jax.train_config import CheckpointConfig, Config


class Checkpointer:
    def __init__(self, directory: Path, config: CheckpointConfig):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(save_interval_steps=config.every, max_to_keep=config.keep,
                                               enable_async_checkpointing=config.async_save, create=True)
        self.manager = ocp.CheckpointManager(directory.resolve(), options=options)

    def save(self, step: int, state: Any, progress: dict[str, Any], config: Config, *, force: bool = False) -> bool:
        """Starts a save when `step` is due (or forced); the write finishes in the background."""
        ocp = self._ocp
        if not (force or self.manager.should_save(step)):
            return False
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
            rng=ocp.args.PyTreeSave({"key": state.rng}),
            config=ocp.args.JsonSave(config.model.to_hf_dict(config.runtime.param_dtype)),
            progress=ocp.args.JsonSave({**progress, "train_config": config.to_dict()}))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
        """(state placed as `abstract_state`'s shardings say, progress), or None for a fresh run.

        The state's `rng` is None for a checkpoint written before training keys were saved.
        """
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            return None

        def restore_args(tree):
            return ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree))

        items = dict(params=restore_args(abstract_state.params), opt_state=restore_args(abstract_state.opt_state),
                     progress=ocp.args.JsonRestore())
        has_rng = (Path(self.manager.directory) / str(step) / "rng").exists()
        if has_rng:
            items["rng"] = restore_args({"key": abstract_state.rng})
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        rng = restored["rng"]["key"] if has_rng else None
        return type(abstract_state)(restored["params"], restored["opt_state"], rng), restored["progress"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class Preemption:
    """SIGTERM -> save at the end of the current step and stop.

    On several hosts the signal reaches them at different steps; jax's preemption sync (through
    orbax) picks one step for all, so every host saves the same one.
    """

    def __init__(self, checkpointer: Checkpointer):
        self._checkpointer = checkpointer
        self._signalled = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._signalled.set())

    def close(self) -> None:
        """SIGTERM goes back to its previous handler: a program that trains in-process keeps its own."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self._checkpointer.reached_preemption(step)
        return self._signalled.is_set()
