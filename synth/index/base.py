"""What every index backend shares: the config, the interface, input checks, result shaping,
exact re-ranking, and the atomic on-disk layout. Backends live in sibling modules; `synth.index`
holds the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from synth.errors import SynthError
from synth.options import MODEL, option

INDEX_KINDS = ("faiss-flat", "faiss-ivfpq", "faiss-hnsw", "scann")
FLAT, IVFPQ, HNSW, SCANN = INDEX_KINDS

META = "meta.json"
FORMAT = 1
# faiss warns below 39 training points per centroid; the same floor keeps ScaNN leaves populated.
POINTS_PER_CENTROID = 39
PQ_BITS = 8
# Fewer points than this cannot train 2^8 PQ centroids (faiss refuses), nor a useful ScaNN tree.
MIN_TRAIN_POINTS = 2 ** PQ_BITS
_CHECK_ROWS = 65_536  # rows per block when scanning for NaN, so a huge memmap is never copied
_RERANK_QUERIES = 1024  # queries per block when gathering candidate vectors for re-ranking


def _positive(name: str, value: Any, optional: bool) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SynthError(f"index setting {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """Index kind and tuning; None means "choose from the number of vectors and their dim".

    `seed` drives the IVF-PQ training sample and k-means. faiss HNSW draws levels from its own
    fixed-seed generator and ScaNN's builder exposes no seed, so those two are deterministic but
    ignore it.
    """

    kind: str = option("index", MODEL, "nearest-neighbour index", FLAT, choices=INDEX_KINDS)
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int | None = None
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    scann_leaves: int | None = None
    scann_leaves_to_search: int | None = None
    scann_part_vectors: int | None = None  # build one ScaNN searcher per this many vectors; None: one in all
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise SynthError(
                f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction"):
            _positive(name, getattr(self, name), optional=False)
        for name in ("nlist", "pq_m", "scann_leaves", "scann_leaves_to_search", "scann_part_vectors"):
            _positive(name, getattr(self, name), optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SynthError(f"index seed must be a non-negative integer, got {self.seed!r}")


class ChunkIndex(Protocol):
    kind: str  # what the user asked for
    backend: str  # what actually serves searches (faiss-flat when n was too small to train)
    config: IndexConfig
    ntotal: int
    dim: int
    params: dict[str, int]  # what the build chose where the config said "auto"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], ids int64 [q, k]), best first; -inf / -1 pad missing results."""
        ...

    def save(self, directory: Path) -> None:
        ...


class Backend(NamedTuple):
    """One index kind: how to build it, how to load what `save` wrote, and how many centroids it
    trains for n vectors (0: no training), below which the exact index serves instead."""

    build: Callable[[np.ndarray, IndexConfig], ChunkIndex]
    load: Callable[[Path, dict[str, Any], IndexConfig], ChunkIndex]
    centroids: Callable[[IndexConfig, int], int] = lambda config, n: 0


def check_matrix(array: Any, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise SynthError(f"{what} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 2:
        raise SynthError(f"{what} must be 2-D [rows, dim], got shape {array.shape}")
    if array.dtype != np.float32:
        raise SynthError(f"{what} must be float32, got {array.dtype}")
    if array.shape[1] == 0:
        raise SynthError(f"{what} have dimension 0")
    for start in range(0, len(array), _CHECK_ROWS):
        finite = np.isfinite(array[start:start + _CHECK_ROWS]).all(axis=1)
        if not finite.all():
            raise SynthError(f"{what} row {start + int(np.argmin(finite))} holds NaN or infinity")
    return np.ascontiguousarray(array)


def check_queries(queries: Any, dim: int) -> np.ndarray:
    queries = check_matrix(queries, "queries")
    if queries.shape[1] != dim:
        raise SynthError(
            f"queries have dimension {queries.shape[1]} but the index holds {dim}-dim vectors")
    return queries


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SynthError(f"k must be a positive integer, got {k!r}")
    return int(k)


def padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Backends mark missing results differently (faiss: -FLT_MAX, ScaNN: NaN with id 0)."""
    ids = ids.astype(np.int64)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    missing = k - ids.shape[1]
    if missing > 0:
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
    return scores, ids


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest-scoring of each row's candidates (candidate lists side by side, e.g. one per part
    or block, scores comparable across them); ties go to the earlier column."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, 1), np.take_along_axis(ids, best, 1)


def rerank_depth(k: int) -> int:
    """Candidates fetched per query before exact re-scoring: enough to absorb quantisation noise."""
    return max(4 * k, k + 32)


def rerank(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of the candidate ids, the best k kept; -1 candidates sink to the end."""
    out_scores, out_ids = [], []
    for start in range(0, len(queries), _RERANK_QUERIES):
        block = ids[start:start + _RERANK_QUERIES]
        valid = block >= 0
        rows = vectors[np.where(valid, block, 0)]
        scores = np.einsum("qd,qcd->qc", queries[start:start + _RERANK_QUERIES], rows)
        scores = np.where(valid, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        out_scores.append(np.take_along_axis(scores, order, axis=1))
        out_ids.append(np.where(np.take_along_axis(valid, order, axis=1),
                                np.take_along_axis(block, order, axis=1), -1))
    return np.concatenate(out_scores), np.concatenate(out_ids)


def empty(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, k), np.float32), np.empty((0, k), np.int64)


def write_atomically(directory: Path, meta: dict[str, Any],
                      write_files: Callable[[Path], None]) -> None:
    """Backend files, then meta.json, in a sibling temp dir that is renamed over `directory`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write_files(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        if directory.exists():
            # A directory cannot be renamed over a non-empty one; a kill between these two renames
            # leaves no index (rebuilt on the next run), never a mixed one.
            old = tmp.with_suffix(".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def meta_of(index: ChunkIndex) -> dict[str, Any]:
    return {"format": FORMAT, "kind": index.kind, "backend": index.backend,
            "config": asdict(index.config), "ntotal": index.ntotal, "dim": index.dim,
            "params": index.params}


def training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])
