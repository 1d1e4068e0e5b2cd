"""The training loop: data in, steps, metrics out, checkpoints, preemption; resumable at any step.

The pieces it runs live beside it: `train_setup` (mesh, model, shardings, state), `step` (loss and
update), `optimizer`, `host_data` (each host's rows to global arrays), `warm_start`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax

from nextlong_jax.compilers import put_planned_ptxas_first, runtime_mismatch
from nextlong_jax.convert import RUN_TOKENIZER, copy_tokenizer, model_tokenizer
from nextlong_jax.data import BatchIterator, Shards, find_shards, host_shards, resume_batches, whole_batches
from nextlong_jax.hardware import published_bf16_peak
from nextlong_jax.warm_start import initial_state, warm_model
from nextlong_jax.host_data import global_batch, host_rows
from nextlong_jax.sharding import axis_rules
from nextlong_jax.train_config import Config
from nextlong_jax.train_setup import (TrainError, abstract_batch, abstract_state, build, build_mesh, jit_step,
                                      rows_named, slot_counts, start_runtime, seed_keys)
from nextlong_jax.vocabulary import check_token_ids, check_vocabulary


class Reporter:
    """Where per-step metrics go (metrics.jsonl, TensorBoard, console); see train_cli."""

    def start(self, first_step: int, total_steps: int) -> None: ...
    def log(self, step: int, metrics: dict[str, float | None]) -> None: ...
    def message(self, text: str) -> None: ...


def train(config: Config, out_dir: Path, reporter: Reporter, *, init_from_hf: Path | None = None,
          init_from: Path | None = None, init_optimizer: bool = False) -> int:
    """Runs (or resumes) to `train.steps`; returns the last completed step. A fresh run starts from the
    model of an HF directory (`init_from_hf`) or a checkpoint step (`init_from`, with its Adam state too
    if `init_optimizer`), if given, and keeps that model's tokenizer beside its checkpoints (what an
    export of any step carries); see `warm_start`."""
    from nextlong_jax.checkpoint import Checkpointer, Preemption
    from nextlong_jax.compile_cache import use_compilation_cache

    start_runtime()
    compiled = use_compilation_cache(config.train.compilation_cache, out_dir)
    started = None
    if init_from_hf or init_from:
        model, started = warm_model(config, init_from_hf=init_from_hf, init_from=init_from)
        config = dataclasses.replace(config, model=model)
    tokenizer = model_tokenizer(init_from_hf, init_from)
    mesh = build_mesh(config)
    if (platform := mesh.devices.flat[0].platform) != "cpu" and (mismatch := runtime_mismatch(platform)):
        reporter.message(f"warning: {mismatch}")
    if platform == "gpu":
        put_planned_ptxas_first()
    sources = [find_shards(s, config.data.seq_len, config.data.verify_sha256) for s in config.data.sources]
    check_slot_lengths(sources, config, mesh.shape["sequence"])
    for source, shards in zip(config.data.sources, sources):
        check_vocabulary(shards.tokenizer, source, config.model.vocab_size, tokenizer)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    peak = config.train.peak_flops_per_device or (
        config.runtime.dtype == "bfloat16" and published_bf16_peak(jax.devices()[0]))
    checkpoints = Checkpointer(out_dir / "checkpoints", config.checkpoint)
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        try:
            block, blocks = host_rows(setup.batch_sharding, (config.data.batch_size, config.data.seq_len))
        except ValueError as e:
            raise TrainError(str(e)) from None
        sources = [host_shards(shards, block, blocks) for shards in sources]
        per_host_batch = config.data.batch_size // blocks
        try:
            restored = checkpoints.restore_latest(abstract_state(setup))
        except (KeyError, ValueError) as e:
            raise TrainError(f"cannot resume from {out_dir / 'checkpoints'}: {e}. Use another --out to start "
                             "afresh, or move the checkpoints away") from None
        if restored is not None:
            state, progress = restored
            if state.rng is None:  # written before keys were saved; such runs drew no randomness
                train_key = seed_keys(jax.random.key(config.train.seed))[1]
                state = state._replace(rng=jax.device_put(train_key, setup.state_shardings.rng))
            reporter.message(f"resumed from step {progress['step']} in {out_dir}")
        else:
            state = initial_state(setup, config, init_from_hf=init_from_hf, init_from=init_from,
                                  init_optimizer=init_optimizer)
            progress = {"step": 0, "data": None, "skipped": 0}
            if started:
                reporter.message(started)
            if tokenizer and jax.process_index() == 0:
                copy_tokenizer(tokenizer, out_dir / "checkpoints" / RUN_TOKENIZER)
            if init_optimizer:
                reporter.message(f"Adam's moments and update count from {init_from}; the learning-rate "
                                 "schedule and the step start at 0")
        step, skipped, nonfinite_run = progress["step"], progress["skipped"], 0
        data = BatchIterator(sources, config.data, per_host_batch, negative_weight=config.loss.negative_weight,
                             start_batches=resume_batches(progress["data"], per_host_batch, whole_batches(sources)))
        # Every program the sources need (rows of documents in slots take one of their own), compiled before
        # step 1: none compiles mid-run, and a restart finds them all in the compilation cache.
        shapes = abstract_batch(setup, config.data.batch_size, config.data.seq_len)
        steps = {slots: jit_step(setup, config.optimizer.grad_accum, slots).lower(state, shapes).compile()
                 for slots in slot_counts(config.data.seq_len, [shards.document_len for shards in sources])}
        reporter.message("train step compiled for " + " and ".join(map(rows_named, steps)))
        reporter.start(step, config.train.steps)
        preemption = Preemption(checkpoints)
        tick = time.perf_counter()
        try:
            while step < config.train.steps:
                lr = float(setup.schedule(step - skipped))  # optax counts applied updates only
                rows, document_len = next(data)
                check_token_ids(rows["input_ids"], config.model.vocab_size, f"the batch of step {step + 1}")
                batch = global_batch(rows, setup.batch_sharding, config.data.batch_size)
                state, metrics = steps[config.data.seq_len // document_len](state, batch)
                metrics = jax.device_get(metrics)
                step += 1
                now = time.perf_counter()
                seconds, tick = now - tick, now
                finite = bool(metrics.pop("finite"))
                nonfinite_run = 0 if finite else nonfinite_run + 1
                skipped += not finite
                row = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items() if k != "weight"}
                row.update(lr=lr, tokens_per_s=tokens_per_step / seconds,
                           mfu=(config.model.flops_per_token(document_len) * tokens_per_step / seconds
                                / (peak * mesh.size) if peak else None),
                           skipped=skipped)
                reporter.log(step, row)
                progress = {"step": step, "data": data.position, "skipped": skipped}
                stop = preemption.requested(step)
                checkpoints.save(step, state, progress, config, force=stop or step == config.train.steps)
                if nonfinite_run >= config.train.max_consecutive_nonfinite:
                    raise TrainError(f"stopping at step {step}: loss or gradients non-finite for {nonfinite_run} "
                                     f"steps in a row ({skipped} skipped in all); lower optimizer.learning_rate or "
                                     "check the data")
                if stop:
                    reporter.message(f"preempted: saved step {step}; rerun the same command to resume")
                    break
        finally:
            # Waits for an asynchronous save of a good step; a failure mid-step (unreadable data,
            # say) never reaches `save`, so nothing half-done is written.
            preemption.close()
            checkpoints.close()
            if compiled:
                reporter.message(compiled.summary())
                compiled.close()
    return step


def check_slot_lengths(sources: list[Shards], config: Config, sequence_shards: int) -> None:
    """Rows of documents in slots train as rows of the slot length: it must zig-zag over the shards."""
    for source, shards in zip(config.data.sources, sources):
        length = shards.document_len
        if length and length < config.data.seq_len and length % (2 * sequence_shards):
            raise TrainError(f"{source}: its documents are in slots of {length} tokens (document_len), which "
                             f"must divide by 2*mesh.sequence={2 * sequence_shards} to train as rows of that length")
