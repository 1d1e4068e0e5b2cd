"""Model benchmark on this CPU; every figure is measured side by side in this one run.

1. Forward and forward+backward tokens/s of the Flax Llama vs transformers' torch LlamaForCausalLM,
   same config and weights (8 layers, d=512, seq 2048, fp32 by default).
2. Achieved model FLOP/s of the train step as a fraction of the measured jnp.dot fp32 peak.
3. Where the train step's gap to torch lies, part by part on the same shapes: every matmul of the
   step in the three forms it takes (forward X.W, input gradient dY.W^T, weight gradient X^T.dY),
   XLA:CPU vs torch GFLOP/s; and one layer's causal attention forward+backward, our blockwise
   kernel vs torch's fused CPU kernel (sdpa).
4. Peak host memory of blockwise attention forward+backward at 8K, 32K, 64K tokens, one child
   process per length: the resident high-water mark of the run itself (VmHWM reset after compiling),
   next to XLA's own temp-buffer figure.

    python bench/model.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__":
    # A CPU benchmark: with libtpu and the CUDA plugin installed, jax would first probe for those
    # chips. (bench/train.py --gpu imports this module and keeps its accelerator.)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each callable, timed in alternating rounds so load from other processes on
    the machine hits every contender alike."""
    for fn in fns.values():
        fn()  # compile / warm up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of one jitted n x n matmul on the default device, best of `repeats`."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    dot = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / best_times({"dot": lambda: dot(a, a).block_until_ready()}, repeats)["dot"]


def bench_models(args) -> dict:
    import torch

    from nextlong_jax.model.config import LlamaConfig
    from nextlong_jax.model.llama import Llama
    from nextlong_jax.model.runtime import Runtime
    from nextlong_jax.testing import hf_model, params_from_hf

    hf_dict = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=args.layers,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=args.seq_len,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch_model = hf_model(hf_dict, std=0.02)
    torch_model.config._attn_implementation = "sdpa"  # torch's fastest CPU path, causal kernel
    config = LlamaConfig.from_hf_dict(hf_dict)
    runtime = Runtime(remat_policy=args.remat, attention_backend="blockwise", attention_block_size=args.block)
    params = params_from_hf(torch_model, config)
    model = Llama(config, runtime)
    length = args.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (1, length)).astype(np.int32)
    positions, segments, weights = np.arange(length)[None], np.ones_like(ids), np.ones((1, length), np.float32)

    forward = jax.jit(lambda p: model.apply({"params": p}, ids, positions, segments))

    def loss(p):
        nll, w = model.apply({"params": p}, ids, positions, segments, weights, method=Llama.loss_pieces)
        return nll / w

    train = jax.jit(jax.value_and_grad(loss))
    tids = torch.as_tensor(ids, dtype=torch.long)

    def torch_forward():
        with torch.no_grad():
            torch_model(tids)

    def torch_train():
        torch_model.zero_grad(set_to_none=True)
        torch_model(tids, labels=tids).loss.backward()

    t = best_times({"ours_fwd": lambda: forward(params).block_until_ready(), "hf_fwd": torch_forward,
                    "ours_train": lambda: jax.block_until_ready(train(params)), "hf_train": torch_train},
                   args.repeats)
    ours_fwd, hf_fwd, ours_train, hf_train = t["ours_fwd"], t["hf_fwd"], t["ours_train"], t["hf_train"]
    with torch.no_grad():
        diff = float(np.abs(np.asarray(forward(params)) - torch_model(tids).logits.numpy()).max())

    peak = matmul_peak()
    flops = config.flops_per_token(length) / 3 * length  # the forward third of training FLOPs
    return {
        "config": f"{config.num_hidden_layers} layers, d={config.hidden_size}, ff={config.intermediate_size}, "
                  f"vocab={config.vocab_size}, seq={length}, fp32, remat={runtime.remat_policy}",
        "torch_threads": torch.get_num_threads(),
        "max_abs_logit_diff_vs_torch": diff,
        "forward_tokens_per_s": {"ours": length / ours_fwd, "transformers": length / hf_fwd,
                                 "ratio": hf_fwd / ours_fwd},
        "train_step_tokens_per_s": {"ours": length / ours_train, "transformers": length / hf_train,
                                    "ratio": hf_train / ours_train},
        "jnp_dot_fp32_peak_gflops": peak / 1e9,
        "model_gflops": {"ours_forward": flops / ours_fwd / 1e9, "ours_train": 3 * flops / ours_train / 1e9,
                         "transformers_train": 3 * flops / hf_train / 1e9},
        "mfu_vs_dot_peak": {"ours_train": 3 * flops / ours_train / peak,
                            "transformers_train": 3 * flops / hf_train / peak},
    }


def _matmul_forms(m: int, k: int, n: int) -> dict[str, tuple[tuple[int, int], tuple[int, int], object]]:
    """The three matmuls a [m,k] x [k,n] layer costs in training, as (a shape, b shape, product)."""
    return {f"{m}x{k}x{n} X.W": ((m, k), (k, n), lambda a, b: a @ b),
            f"{m}x{k}x{n} dY.W^T": ((m, n), (k, n), lambda a, b: a @ b.T),
            f"{m}x{k}x{n} X^T.dY": ((m, k), (m, n), lambda a, b: a.T @ b)}


def bench_parts(args) -> dict:
    """The step's matmuls and one layer's attention, XLA:CPU vs torch, each pair timed alternately."""
    import torch
    import torch.nn.functional as F

    from nextlong_jax.model.attention import Blocks, attention

    rng = np.random.default_rng(0)
    length, d, ff, vocab, heads = args.seq_len, 512, 1376, 32000, 8
    loss_block = min(length, 1024)  # the blocked loss's vocabulary projection, per block of tokens
    forms = {**_matmul_forms(length, d, d), **_matmul_forms(length, d, ff), **_matmul_forms(length, ff, d),
             **_matmul_forms(loss_block, d, vocab)}
    dots, ours_total, torch_total = {}, 0.0, 0.0
    for name, (a_shape, b_shape, product) in forms.items():
        a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in (a_shape, b_shape))
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        ours = jax.jit(product)
        t = best_times({"ours": lambda: ours(ja, jb).block_until_ready(), "torch": lambda: product(ta, tb)},
                       args.repeats + 2)
        m, k, n = (int(x) for x in name.split()[0].split("x"))
        dots[name] = {"ours_gflops": 2 * m * k * n / t["ours"] / 1e9, "torch_gflops": 2 * m * k * n / t["torch"] / 1e9}
        ours_total, torch_total = ours_total + t["ours"], torch_total + t["torch"]

    shape = (1, length, heads, d // heads)
    q, k, v, g = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    blocks = Blocks(args.block)
    ours = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, blocks=blocks) * g), argnums=(0, 1, 2)))
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g.transpose(0, 2, 1, 3).copy())

    def torch_attention():
        for x in (tq, tk, tv):
            x.grad = None
        F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tg)

    t = best_times({"ours": lambda: jax.block_until_ready(ours(q, k, v)), "torch": torch_attention},
                   args.repeats + 2)
    return {"matmuls": dots,
            "matmuls_time_ratio_torch_over_ours": torch_total / ours_total,
            "attention_layer_fwd_bwd_seconds": {"ours_blockwise": t["ours"], "torch_sdpa": t["torch"],
                                                "ratio": t["torch"] / t["ours"]}}


def attention_memory_child(length: int, heads: int, head_dim: int, block: int) -> None:
    from nextlong_jax.model.attention import Blocks, attention

    shape = (1, length, heads, head_dim)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(3))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, backend="blockwise", blocks=Blocks(block))),
                            argnums=(0, 1, 2)))
    compiled = grad.lower(q, k, v).compile()
    jax.block_until_ready((q, k, v))
    # Compilation peaks above the run itself, and ru_maxrss keeps the parent's peak across fork+exec;
    # resetting the VmHWM high-water mark (Linux) isolates the run.
    Path("/proc/self/clear_refs").write_text("5")
    base = _vm_hwm_kib()
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v))
    seconds = time.perf_counter() - start
    peak = _vm_hwm_kib()
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(json.dumps({"length": length, "run_peak_rss_mib": peak / 1024, "rss_growth_mib": (peak - base) / 1024,
                      "xla_temp_mib": temp / 2**20, "qkv_mib": 3 * np.prod(shape) * 4 / 2**20, "seconds": seconds}))


def _vm_hwm_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def bench_attention_memory(args) -> list[dict]:
    rows = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--attention-child", str(length), "--heads", str(args.heads),
               "--head-dim", str(args.head_dim), "--block", str(args.block)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  attention fwd+bwd L={length}: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, seq 512, lengths 2K/8K: a smoke run")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--remat", default="none", help="remat policy for the train step (none: like torch)")
    p.add_argument("--block", type=int, default=512, help="attention block size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    p.add_argument("--heads", type=int, default=4, help="heads for the attention memory test")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--attention-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.attention_child:
        attention_memory_child(args.attention_child, args.heads, args.head_dim, args.block)
        return
    if args.quick:
        args.layers, args.seq_len, args.lengths, args.repeats = 2, 512, [2048, 8192], 1
    results = {"models": bench_models(args)}
    print(json.dumps(results["models"], indent=2), flush=True)
    results["parts"] = bench_parts(args)
    print(json.dumps(results["parts"], indent=2), flush=True)
    results["attention_memory"] = bench_attention_memory(args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
