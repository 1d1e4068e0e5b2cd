"""Attention work per preset, counted from the kernels' own block tables: what a step's attention
costs on its target, for a row of one document, for a row of 8 packed documents seen only through
their segment ids, and for the same row declared as 8 slots (a manifest's `document_len`), which the
trainer runs as 8 rows of an eighth of the length.

Counts are (query block, key block) pairs a kernel computes, per query head and layer, summed over
the `sequence` shards (zig-zag order), at the preset's blocks:
  * pallas_gpu (GPU): `pallas_gpu.visited_steps`, the ranges its kernels loop over, which follow the
    segment ids of each row, so packed documents skip each other's blocks;
  * splash (TPU): the non-empty entries of its mask tables, which are static (causal over original
    token indices): a packed row costs what a one-document row costs;
  * ring / blockwise (CPU, the pure-JAX reference): block pairs with anything visible (they skip the
    rest at run time, one `lax.switch` per pair).
Slot rows cost 8 one-document rows of L / 8 on every backend. Nothing is timed; no accelerator is needed.

    python bench/attention_cost.py [--docs 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from nextlong_jax import load_balance  # noqa: E402
from nextlong_jax.model.attention import Backend, resolve  # noqa: E402
from nextlong_jax.topology import parse_topology  # noqa: E402
from nextlong_jax.train_config import load_config  # noqa: E402


def _rows(length: int, docs: int) -> dict[str, np.ndarray]:
    one = np.ones((1, length), np.int32)
    return {"one_document": one, f"{docs}_packed": 1 + np.arange(length, dtype=np.int32)[None] // (length // docs)}


def _visible_pairs(segments: np.ndarray, block: int) -> int:
    """Block pairs with a visible entry (causal, same segment) for contiguous segments: pure numpy."""
    seg = segments[0]
    n = seg.size // block
    starts = np.searchsorted(seg, seg, side="left")  # first index of each token's (contiguous) segment
    lo = starts.reshape(n, block).min(1) // block
    hi = np.arange(n)
    return int(np.sum(hi - lo + 1))


def _cost(backend: Backend, segments: np.ndarray, blocks, shards: int) -> int:
    length = segments.shape[1]
    match backend:
        case Backend.PALLAS_GPU:
            from nextlong_jax.model.attention import pallas_gpu

            if shards == 1:
                return pallas_gpu.visited_steps(segments, block_q=blocks.q, block_kv=blocks.kv).forward
            order = load_balance.token_index(length, shards)
            rows = load_balance.zigzag(segments, shards).reshape(1, shards, -1)
            index = order.reshape(shards, -1)
            return sum(pallas_gpu.visited_steps(rows[:, s], index[s], block_q=min(blocks.q, length // (2 * shards)),
                                                block_kv=blocks.kv, kv_segment_ids=segments, chunks=2).forward
                       for s in range(shards))
        case Backend.SPLASH:
            from nextlong_jax.model.attention import splash

            fitted = splash._clamp(blocks, length, shards)
            q_sequence = load_balance.token_index(length, shards) if shards > 1 else np.arange(length, dtype=np.int32)
            info = splash._mask_info(q_sequence, length, (fitted.q, fitted.kv), shards, dkv=False, shrink=False)
            return int(np.count_nonzero(info.block_mask))
        case _:
            return _visible_pairs(segments, blocks.q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=8, help="documents packed into a row (the 512K stage: 8 x 64K)")
    args = p.parse_args()
    out = {}
    for preset in sorted((ROOT / "configs/train").glob("*.yaml")):
        config = load_config(preset)
        if not config.mesh.topology:
            continue
        topology = parse_topology(config.mesh.topology)
        length, shards = config.data.seq_len, config.mesh.sequence
        backend = resolve(config.runtime.attention_backend, topology.chip.platform, sequence_shards=shards,
                          length=length, allow_fallback=config.runtime.attention_allow_fallback)
        blocks = config.runtime.attention_blocks
        dense = (length // blocks.q) * (length // blocks.q + 1) // 2
        costs = {name: _cost(backend, rows, blocks, shards) for name, rows in _rows(length, args.docs).items()}
        width = length // args.docs
        costs[f"{args.docs}_slot_rows"] = args.docs * _cost(backend, np.ones((1, width), np.int32), blocks, shards)
        packed, slots = costs[f"{args.docs}_packed"], costs[f"{args.docs}_slot_rows"]
        out[preset.stem] = {"target": topology.name, "backend": backend.value, "seq_len": length,
                            "sequence_shards": shards, "blocks": blocks._asdict(), **costs,
                            "dense_causal_pairs_at_q_block": dense,
                            "packed_over_one_document": round(packed / costs["one_document"], 3),
                            "slot_rows_over_one_document": round(slots / costs["one_document"], 3)}
        print(f"{preset.stem:28s} {topology.name:10s} {backend.value:10s} L={length:>7d} S={shards} "
              f"one doc {costs['one_document']:>10,d}  {args.docs} packed {packed:>10,d} "
              f"({packed / costs['one_document']:.3f})  as slot rows {slots:>10,d} "
              f"({slots / costs['one_document']:.3f})", flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
