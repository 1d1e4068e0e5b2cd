"""Train-step benchmark on this CPU; every figure is measured side by side in this one run.

1. The full train step (`nextlong_jax.train.jit_step`: loss, grads, AdamW) on one device: tokens/s
   and model FLOP/s as a fraction of the measured jnp.dot fp32 peak.
2. The same step with ring attention and zig-zag order over sequence=8 virtual devices, same total
   length. The virtual devices share this machine's cores, so the ratio is the cost of sequence
   parallelism's bookkeeping (ppermute copies, reorder, per-device dispatch), not a speed-up.
3. Attention alone, ring vs blockwise (`bench/ring.py`'s measurement, imported).
4. Memory per device of the compiled train step (XLA's own accounting: arguments + temporaries)
   against sequence length, single device vs ring over 8.

    python bench/train.py [--layers 4] [--hidden 256] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bench.ring fixes 8 virtual CPU devices before jax initialises, so it comes first.
from bench import ring  # noqa: E402
from bench.model import best_times, matmul_peak  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nextlong_jax.model import LlamaConfig  # noqa: E402
from nextlong_jax.sharding import axis_rules, make_mesh  # noqa: E402
from nextlong_jax.train import build, global_batch, init_state, jit_step, model_flops_per_token  # noqa: E402
from nextlong_jax.train_config import Config, DataConfig, MeshConfig  # noqa: E402


def _prepared(config: Config, mesh: jax.sharding.Mesh):
    """(state, jitted step, global batch) for one step on random tokens."""
    length = config.data.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.model.vocab_size, (config.data.batch_size, length)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = dict(input_ids=ids, positions=np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy(),
                 segment_ids=ones, token_roles=ones, loss_weights=ones.astype(np.float32))
    with jax.set_mesh(mesh), axis_rules():
        setup = build(config, mesh)
        return init_state(setup, 0), jit_step(setup, config.optimizer.grad_accum), \
            global_batch(batch, setup.batch_sharding)


def step_memory_mib(config: Config, mesh: jax.sharding.Mesh) -> float:
    """Per-device bytes XLA plans for one compiled step: arguments plus temporaries."""
    state, step, inputs = _prepared(config, mesh)
    with jax.set_mesh(mesh), axis_rules():
        stats = step.lower(state, inputs).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.temp_size_in_bytes) / 2**20


def step_runner(config: Config, mesh: jax.sharding.Mesh) -> Callable[[], None]:
    """A no-argument callable running one train step to completion (state threads through calls)."""
    state, step, inputs = _prepared(config, mesh)

    def run() -> None:
        nonlocal state
        with jax.set_mesh(mesh), axis_rules():  # ring reads the mesh when the step is traced
            state, metrics = step(state, inputs)
        jax.block_until_ready(metrics)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    args = p.parse_args()
    heads = args.hidden // 64
    model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                        attention_block_size=args.block, logits_block_size=1024)
    single = Config(model=model, data=DataConfig(seq_len=args.seq_len, batch_size=1), mesh=MeshConfig(1, 1, 1, 1))
    sharded = Config(model=model.replace(attention_backend="ring"), data=single.data,
                     mesh=MeshConfig(1, 1, 1, ring.SHARDS))
    meshes = {"single_device": (single, make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])),
              f"ring_sequence_{ring.SHARDS}": (sharded, make_mesh(1, 1, 1, ring.SHARDS))}
    memory = {name: {length: round(step_memory_mib(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=length)), mesh), 1)
        for length in args.memory_lengths} for name, (cfg, mesh) in meshes.items()}
    runs = {name: step_runner(cfg, mesh) for name, (cfg, mesh) in meshes.items()}
    seconds = best_times(runs, args.repeats)
    peak = matmul_peak()
    flops = model_flops_per_token(model, args.seq_len) * args.seq_len
    print(json.dumps({
        "config": f"{args.layers} layers, d={args.hidden}, heads={heads}, vocab={args.vocab}, seq={args.seq_len}, "
                  f"batch=1, fp32, remat={model.remat_policy}",
        "devices": jax.device_count(), "cores": os.cpu_count(),
        "matmul_peak_gflops": peak / 1e9,
        "train_step": {name: {"seconds": t, "tokens_per_s": args.seq_len / t, "model_gflops": flops / t / 1e9,
                              "fraction_of_matmul_peak": flops / t / peak} for name, t in seconds.items()},
        "ring_step_over_single": seconds[f"ring_sequence_{ring.SHARDS}"] / seconds["single_device"],
        "attention_only": ring.bench_length(args.seq_len, heads, 64, args.block, args.repeats),
        "step_memory_per_device_mib_by_seq_len": memory,
    }, indent=1), flush=True)


if __name__ == "__main__":
    main()
