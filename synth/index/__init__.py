"""Nearest-neighbour search over chunk embeddings: one interface, one registry of backends.

Embeddings are L2-normalised float32 rows, so inner product is cosine similarity. Every backend
returns exact inner products as scores (the approximate ones re-rank their candidates against the
stored vectors), so similarity thresholds downstream mean the same thing whichever index found the
candidates. Ids are row numbers of the matrix given to `build_index`; -1 (score -inf) pads rows
that have fewer than k results.

An index directory holds `meta.json` (requested kind, effective backend, config, size) and the
backend's files. It is written under a temporary name and renamed when complete, so a killed save
never leaves a directory that looks like an index but is not one.

Backends, one module each: `flat` (exact), `ivfpq`, `hnsw` (faiss) and `scann`; `backend` gives
each kind's build, load and training needs, importing its module on first use, so what only names
the kinds (the synthesis options) loads no index library.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from synth.errors import SynthError
from synth.index.base import (FLAT, FORMAT, HNSW, INDEX_KINDS, IVFPQ, META, MIN_TRAIN_POINTS, POINTS_PER_CENTROID,
                              SCANN, Backend, ChunkIndex, IndexConfig, best_k, check_matrix)

__all__ = ["INDEX_KINDS", "backend", "ChunkIndex", "IndexConfig", "build_index", "build_saved", "load_index",
           "exact_search", "exact_search_blocks", "recall_at_k"]

log = logging.getLogger(__name__)


def backend(kind: str) -> Backend:
    """The backend of an index kind (one of INDEX_KINDS)."""
    match kind:
        case "faiss-flat":
            from synth.index import flat as module
        case "faiss-ivfpq":
            from synth.index import ivfpq as module
        case "faiss-hnsw":
            from synth.index import hnsw as module
        case "scann":
            from synth.index import scann as module
        case _:
            raise SynthError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    return module.BACKEND


def _trainable(config: IndexConfig, n: int) -> bool:
    """Whether n vectors are enough to train `config.kind`; if not, the index is exact (with a warning)."""
    if not n:
        raise SynthError("cannot build an index over 0 embeddings (is the corpus empty?)")
    centroids = backend(config.kind).centroids(config, n)
    needed = max(MIN_TRAIN_POINTS, POINTS_PER_CENTROID * centroids) if centroids else 0
    if n < needed:
        log.warning("%s needs at least %d vectors to train, got %d: using exact %s search",
                    config.kind, needed, n, FLAT)
    return n >= needed


def build_index(embeddings: np.ndarray, config: IndexConfig) -> ChunkIndex:
    """Index the rows of `embeddings` (float32, L2-normalised); deterministic for a given config."""
    vectors = check_matrix(embeddings, "embeddings")
    if not _trainable(config, len(vectors)):
        return backend(FLAT).build(vectors, config)
    return backend(config.kind).build(vectors, config)


def build_saved(blocks: Sequence[np.ndarray], config: IndexConfig, directory: Path) -> ChunkIndex:
    """The index of the blocks' rows, in order, saved to `directory`: equal to `build_index` of their
    concatenation. IVF-PQ is built block by block with its inverted lists merged on disk
    (`ivfpq.build_sharded`), and ScaNN one part at a time (`scann.build_parts`), so with memory-mapped
    blocks neither build holds every vector."""
    blocks = [check_matrix(block, "embeddings") for block in blocks if len(block)]
    trainable = _trainable(config, sum(len(block) for block in blocks))
    if trainable and config.kind == IVFPQ:
        from synth.index.ivfpq import build_sharded

        return build_sharded(blocks, config, directory)
    if trainable and config.kind == SCANN:
        from synth.index.scann import build_parts

        return build_parts(blocks, config, directory)
    index = backend(config.kind if trainable else FLAT).build(np.concatenate(blocks), config)
    index.save(directory)
    return index


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_index(directory: Path) -> ChunkIndex:
    """The index `save` wrote to `directory`; SynthError if it is missing or damaged."""
    directory = Path(directory)
    if not (directory / META).is_file():
        raise SynthError(f"no index at {directory} ({META} missing)")
    try:
        meta = json.loads((directory / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{META} is not in format {FORMAT}")
        config = IndexConfig(**meta["config"])
        index = backend(meta["backend"]).load(directory, meta, config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SynthError) as error:
        raise SynthError(f"cannot load the index at {directory}: {_one_line(error)}; "
                         f"delete it to rebuild") from error
    if (index.ntotal, index.dim) != (meta["ntotal"], meta["dim"]):
        raise SynthError(f"index at {directory} holds {index.ntotal} x {index.dim} vectors but "
                         f"{META} says {meta['ntotal']} x {meta['dim']}; delete it to rebuild")
    return index


def exact_search(embeddings: np.ndarray, queries: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product search: the ground truth that recall is measured against."""
    return backend(FLAT).build(check_matrix(embeddings, "embeddings"), IndexConfig()).search(queries, k)


def exact_search_blocks(blocks: Sequence[np.ndarray], queries: np.ndarray,
                        k: int) -> tuple[np.ndarray, np.ndarray]:
    """`exact_search` over the rows of `blocks` stacked, one block in memory at a time (a corpus-sized
    store need not fit); ids count rows across blocks, ties go to the lower id."""
    scores = np.full((len(queries), 0), -np.inf, np.float32)
    ids = np.zeros((len(queries), 0), np.int64)
    start = 0
    for block in blocks:
        if len(block):
            found_scores, found = exact_search(np.asarray(block, np.float32), queries, k)
            scores, ids = best_k(np.concatenate([scores, found_scores], axis=1),
                                 np.concatenate([ids, np.where(found >= 0, found + start, -1)], axis=1), k)
        start += len(block)
    return scores, ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k, ignoring -1 padding.

    Where fewer than k true neighbours exist, the denominator is how many do, so an exact index
    scores 1.0 whatever k is.
    """
    if approx_ids.ndim != 2 or approx_ids.shape[0] != exact_ids.shape[0]:
        raise ValueError(f"id arrays disagree: {approx_ids.shape} vs {exact_ids.shape}")
    if k < 1 or min(approx_ids.shape[1], exact_ids.shape[1]) < k:
        raise ValueError(f"k={k} needs at least k columns of ids")
    if not len(exact_ids):
        raise ValueError("recall of zero queries is undefined")
    recalls = []
    for approx, exact in zip(approx_ids[:, :k], exact_ids[:, :k]):
        truth = exact[exact >= 0]
        hits = np.intersect1d(approx[approx >= 0], truth).size
        recalls.append(hits / len(truth) if len(truth) else 1.0)
    return float(np.mean(recalls))
