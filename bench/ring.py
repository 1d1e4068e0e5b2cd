"""Ring attention on 8 virtual CPU devices vs single-device blockwise attention, same total length.

Forward+backward wall time of: blockwise on one device; ring over sequence=8 with zig-zag load
balancing; ring over sequence=8 in contiguous order (no balancing). The virtual devices share this
machine's cores, so the total work is what is compared: a ratio near 1 means the ring adds little
beyond the attention itself (ppermute copies, per-step bookkeeping); contiguous order shows what
balancing saves when devices wait on the slowest one.

    python bench/ring.py [--lengths 4096 8192] [--heads 4] [--head-dim 64] [--block 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# The device count is fixed when jax initialises, so before any jax import.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.model import best_times  # noqa: E402
from nextlong_jax import load_balance  # noqa: E402
from nextlong_jax.model.attention import Blocks, attention  # noqa: E402
from nextlong_jax.model.attention.ring import ring_attention  # noqa: E402
from nextlong_jax.sharding import make_mesh  # noqa: E402

SHARDS = 8


def bench_length(length: int, heads: int, head_dim: int, block: int, repeats: int) -> dict:
    shape = (1, length, heads, head_dim)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.float32) for i in range(3))
    segments = jnp.ones((1, length), jnp.int32)

    def grad_fn(kernel=attention, **kwargs):
        loss = lambda q, k, v: jnp.sum(kernel(q, k, v, segments, blocks=Blocks(block), **kwargs))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    blockwise = grad_fn(backend="blockwise")
    # Inputs already in zig-zag order, as the trainer feeds them; only the mask's view of the order differs.
    zigzag = grad_fn(backend="ring")
    contiguous = grad_fn(ring_attention, token_index=jnp.arange(length))
    mesh = make_mesh(data=1, fsdp=1, tensor=1, sequence=SHARDS)
    zq, zk, zv = (load_balance.zigzag(x, SHARDS) for x in (q, k, v))

    def on_mesh(fn, *args):
        with jax.set_mesh(mesh):
            jax.block_until_ready(fn(*args))

    t = best_times({"blockwise_1_device": lambda: jax.block_until_ready(blockwise(q, k, v)),
                    "ring_zigzag": lambda: on_mesh(zigzag, zq, zk, zv),
                    "ring_contiguous": lambda: on_mesh(contiguous, q, k, v)}, repeats)
    return {"length": length, "seconds": t,
            "overhead_ratio_zigzag": t["ring_zigzag"] / t["blockwise_1_device"],
            "overhead_ratio_contiguous": t["ring_contiguous"] / t["blockwise_1_device"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{jax.device_count()} devices, {os.cpu_count()} cores", flush=True)
    for length in args.lengths:
        print(json.dumps(bench_length(length, args.heads, args.head_dim, args.block, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
