"""Train-step benchmark on this CPU; every figure is measured side by side in this one run.

1. The full train step (`nextlong_jax.train_setup.jit_step`: loss, grads, AdamW) on one device: tokens/s
   and model FLOP/s as a fraction of the measured jnp.dot fp32 peak.
2. The same step with ring attention and zig-zag order over sequence=8 virtual devices, same total
   length. The virtual devices share this machine's cores, so the ratio is the cost of sequence
   parallelism's bookkeeping (ppermute copies, reorder, per-device dispatch), not a speed-up.
3. Attention alone, ring vs blockwise (`bench/ring.py`'s measurement, imported).
4. Memory per device of the compiled train step (XLA's own accounting: arguments + temporaries)
   against sequence length, single device vs ring over 8 (the ring also at 128K and 512K).

With --gpu, instead, on the first accelerator: the Llama-3.2-1B architecture at 32K tokens, bf16
compute over fp32 master weights, one train step per attention backend (pallas_gpu, which GPU
training runs, and blockwise) side by side, as tokens/s, model TFLOP/s, MFU against the chip's
published dense bf16 peak, the fraction of the bf16 matmul peak measured in the same run, and the
step's memory.

    python bench/train.py [--layers 4] [--hidden 256] [--seq-len 2048]
    python bench/train.py --gpu [--seq-len 32768] [--layers 16] [--remat full]
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

# Decided before jax initialises: the CPU benchmark needs bench.ring's 8 virtual CPU devices, the GPU
# one the real accelerator.
GPU = "--gpu" in sys.argv[1:]
if not GPU:
    from bench import ring

from bench.model import best_times, matmul_peak  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nextlong_jax.hardware import published_bf16_peak  # noqa: E402
from nextlong_jax.host_data import global_batch  # noqa: E402
from nextlong_jax.model.attention import resolve  # noqa: E402
from nextlong_jax.model.config import LlamaConfig  # noqa: E402
from nextlong_jax.model.runtime import Runtime  # noqa: E402
from nextlong_jax.sharding import axis_rules, make_mesh  # noqa: E402
from nextlong_jax.train_config import MODEL_PRESETS, Config, DataConfig, MeshConfig  # noqa: E402
from nextlong_jax.train_setup import build, init_state, jit_step  # noqa: E402


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


def accelerator_main(args: argparse.Namespace) -> None:
    """The 1B architecture on one accelerator: per attention backend, one timed train step and its MFU."""
    device = jax.devices()[0]
    if device.platform == "cpu" and args.seq_len > 4096:
        raise SystemExit("--gpu found no accelerator (jax sees only the CPU); on a CPU pass a small "
                         "--seq-len and --layers to smoke-test this path")
    preset = MODEL_PRESETS["llama3.2-1b"]
    model = LlamaConfig(**{**preset, "num_hidden_layers": args.layers or preset["num_hidden_layers"]})
    runtime = Runtime(dtype="bfloat16", param_dtype="float32", remat_policy=args.remat,
                      attention_block_size=args.block, logits_block_size=4096)
    mesh = make_mesh(1, 1, 1, 1, devices=[device])
    flops = model.flops_per_token(args.seq_len) * args.seq_len
    peak = published_bf16_peak(device)
    measured = matmul_peak(8192 if device.platform != "cpu" else 1024, dtype="bfloat16")
    results = {}
    for backend in ("pallas_gpu", "blockwise"):  # what GPU training runs, and the pure-JAX baseline
        # On a CPU (a smoke test of this path) pallas_gpu runs auto's choice instead.
        config = Config(model=model, runtime=runtime.replace(attention_backend=backend, attention_allow_fallback=True),
                        mesh=MeshConfig(1, 1, 1, 1), data=DataConfig(seq_len=args.seq_len, batch_size=1))
        try:
            memory = step_memory_mib(config, mesh)
            seconds = best_times({backend: step_runner(config, mesh)}, args.repeats)[backend]
        except Exception as e:  # a backend failing to compile here is a result to report, not a crash
            results[backend] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            continue
        results[backend] = {"ran_as": resolve(backend, device.platform, allow_fallback=True).value, "seconds": seconds,
                            "tokens_per_s": args.seq_len / seconds,
                            "model_tflops": flops / seconds / 1e12,
                            "mfu": flops / seconds / peak if peak else None,
                            "fraction_of_measured_bf16_matmul_peak": flops / seconds / measured,
                            "step_memory_gib": memory / 1024}
    print(json.dumps({
        "config": f"llama3.2-1b architecture, {model.num_hidden_layers} layers, seq={args.seq_len}, batch=1, "
                  f"bf16 compute, fp32 master, remat={args.remat}",
        "device": device.device_kind, "published_bf16_peak_tflops": peak and peak / 1e12,
        "measured_bf16_matmul_peak_tflops": measured / 1e12, "train_step": results}, indent=1), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the 1B preset on the first accelerator, reporting MFU")
    p.add_argument("--layers", type=int, default=None, help="default: 4 on the CPU, the preset's 16 with --gpu")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=None, help="default: 2048 on the CPU, 32768 with --gpu")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--remat", default="full", help="remat policy of the --gpu run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--ring-memory-lengths", type=int, nargs="*", default=[131072, 524288],
                   help="further lengths planned for the ring only (one device would need tens of GiB)")
    args = p.parse_args()
    if args.gpu:
        args.seq_len = args.seq_len or 32768
        return accelerator_main(args)
    args.layers, args.seq_len = args.layers or 4, args.seq_len or 2048
    heads = args.hidden // 64
    model = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads)
    runtime = Runtime(attention_block_size=args.block, logits_block_size=1024)
    single = Config(model=model, runtime=runtime, data=DataConfig(seq_len=args.seq_len, batch_size=1),
                    mesh=MeshConfig(1, 1, 1, 1))
    sharded = Config(model=model, runtime=runtime.replace(attention_backend="ring"), data=single.data,
                     mesh=MeshConfig(1, 1, 1, ring.SHARDS))
    meshes = {"single_device": (single, make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])),
              f"ring_sequence_{ring.SHARDS}": (sharded, make_mesh(1, 1, 1, ring.SHARDS))}
    lengths = {"single_device": args.memory_lengths,
               f"ring_sequence_{ring.SHARDS}": args.memory_lengths + args.ring_memory_lengths}
    memory = {name: {length: round(step_memory_mib(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=length)), mesh), 1)
        for length in lengths[name]} for name, (cfg, mesh) in meshes.items()}
    runs = {name: step_runner(cfg, mesh) for name, (cfg, mesh) in meshes.items()}
    seconds = best_times(runs, args.repeats)
    peak = matmul_peak()
    flops = model.flops_per_token(args.seq_len) * args.seq_len
    print(json.dumps({
        "config": f"{args.layers} layers, d={args.hidden}, heads={heads}, vocab={args.vocab}, seq={args.seq_len}, "
                  f"batch=1, fp32, remat={runtime.remat_policy}",
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
