"""Causal load balancing for sequence parallelism: the zig-zag token order.

Under a causal mask, a contiguous split of the sequence over S devices gives the last device S
times the attention work of the first. Zig-zag order cuts the sequence into 2S equal chunks and
gives device i chunks i and 2S-1-i (one early, one late), so every device does the same work.
The layout is a fixed permutation of the length axis, applied identically to every [B, L]
feature (tokens, loss weights, roles, positions, segment ids) of a batch.

Order of operations for the trainer: form next-token targets and their weights in the ORIGINAL
order first (shifting by one is only meaningful there), then `reorder` the batch including those
targets. After that every per-token quantity is position-aligned and the loss is a plain weighted
sum that does not care about order. Attention must know each token's original index to keep the
causal mask right; `token_index` gives it (the ring backend uses it by default).

Functions work on numpy arrays (host side, before `device_put`) and on jax arrays (inside jit)
alike: they use only reshape and static integer indexing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import numpy as np

Array = TypeVar("Array")


def _chunk_order(num_shards: int) -> np.ndarray:
    """Chunk indices in zig-zag order: [0, 2S-1, 1, 2S-2, ...] (device i holds positions 2i, 2i+1)."""
    first = np.arange(num_shards)
    return np.stack([first, 2 * num_shards - 1 - first], axis=1).reshape(-1)


def _check(length: int, num_shards: int) -> int:
    if num_shards < 1 or length % (2 * num_shards):
        raise ValueError(f"zig-zag order needs the length ({length}) divisible by 2 * num_shards ({2 * num_shards})")
    return length // (2 * num_shards)


def _permute_chunks(x: Array, num_shards: int, chunks: np.ndarray) -> Array:
    b, length, *rest = x.shape
    size = _check(length, num_shards)
    blocks = x.reshape(b, 2 * num_shards, size, *rest)
    return blocks[:, chunks].reshape(b, length, *rest)


def zigzag(x: Array, num_shards: int) -> Array:
    """[B, L, ...] in original order -> zig-zag order for `num_shards` sequence shards."""
    return _permute_chunks(x, num_shards, _chunk_order(num_shards))


def unzigzag(x: Array, num_shards: int) -> Array:
    """Exact inverse of `zigzag`: [B, L, ...] in zig-zag order -> original order."""
    return _permute_chunks(x, num_shards, np.argsort(_chunk_order(num_shards)))


def token_index(length: int, num_shards: int) -> np.ndarray:
    """int32 [L]: the original index of the token at each zig-zag position."""
    return zigzag(np.arange(length, dtype=np.int32)[None], num_shards)[0]


def reorder(batch: Mapping[str, Array], num_shards: int) -> dict[str, Array]:
    """`zigzag` applied to every feature of a batch; all must be [B, L, ...] with one B and L.

    Strict on shapes on purpose: a feature left in the other order would silently misalign.
    """
    shapes = {name: tuple(x.shape[:2]) for name, x in batch.items()}
    if len(set(shapes.values())) > 1 or any(len(s) < 2 for s in shapes.values()):
        raise ValueError(f"reorder needs every feature shaped [B, L, ...] with one B and L, got {shapes}")
    return {name: zigzag(x, num_shards) for name, x in batch.items()}
