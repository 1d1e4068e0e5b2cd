"""ScaNN: a k-means partition tree with anisotropic asymmetric hashing, re-scored exactly.

With `scann_part_vectors`, consecutive row ranges get a searcher each, built one after another
(`build_parts` holds one part's vectors at a time); searches query every part and merge by the
exact scores. That is how a corpus too large for one build process is indexed with ScaNN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from synth.errors import SynthError
from synth.index.base import (POINTS_PER_CENTROID, SCANN, Backend, IndexConfig, best_k, check_k, check_queries,
                              empty, meta_of, padded, rerank_depth, write_atomically)

_SCANN_DIR = "scann"
_SCANN_TRAIN_SAMPLE = 100_000
_SCANN_BUILD_K = 10  # only ScaNN's default for searches that pass no k; every search passes one


def _scann():
    # Imported on first use: `import scann` imports TensorFlow, seconds faiss users never need.
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


def _auto_leaves(n: int) -> int:
    return max(2, min(round(math.sqrt(n)), n // POINTS_PER_CENTROID))


def _auto_leaves_to_search(leaves: int) -> int:
    return min(leaves, max(8, math.ceil(leaves / 5)))


@dataclass(eq=False)
class ScannIndex:
    """One searcher, or several over consecutive row ranges (`scann_part_vectors`), merged by score."""

    kind: str
    config: IndexConfig
    parts: list[tuple[int, Any]]  # (first row, scann_ops_pybind.ScannSearcher) per part
    ntotal: int
    dim: int
    params: dict[str, Any]
    backend: str = SCANN

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = check_queries(queries, self.dim), check_k(k)
        if not len(queries):
            return empty(k)
        found_scores, found_ids = [], []
        for first, searcher in self.parts:
            size = searcher.size()
            ids, scores = searcher.search_batched(
                queries, final_num_neighbors=min(k, size), pre_reorder_num_neighbors=min(rerank_depth(k), size),
                leaves_to_search=self.params["leaves_to_search"])
            # ScaNN pads short result lists with NaN scores and id 0, and returns uint32 ids.
            missing = np.isnan(scores)
            found_ids.append(np.where(missing, -1, ids.astype(np.int64) + first))
            found_scores.append(np.where(missing, -np.inf, scores))
        # Scores are exact inner products (re-scored), so parts merge by them directly.
        return padded(*best_k(np.concatenate(found_scores, axis=1), np.concatenate(found_ids, axis=1), k), k)

    def save(self, directory: Path) -> None:
        def write_files(tmp: Path) -> None:
            for number, (_, searcher) in enumerate(self.parts):
                _serialize(searcher, tmp, number)

        write_atomically(directory, meta_of(self), write_files)


def _part_dir(root: Path, number: int) -> Path:
    return root / _SCANN_DIR / f"part-{number:05d}"


def _serialize(searcher, root: Path, number: int) -> None:
    path = _part_dir(root, number)
    path.mkdir(parents=True)
    # Relative asset paths, or the index would point into the temp dir after the rename.
    searcher.serialize(str(path), relative_path=True)


def _layout(n: int, config: IndexConfig) -> dict[str, Any]:
    """Part boundaries (equal sizes, each at least half of scann_part_vectors) and tree sizes."""
    parts = max(1, round(n / config.scann_part_vectors)) if config.scann_part_vectors else 1
    starts = np.linspace(0, n, parts + 1).astype(int).tolist()
    smallest = min(b - a for a, b in zip(starts, starts[1:]))
    leaves = config.scann_leaves or _auto_leaves(smallest)
    if smallest < POINTS_PER_CENTROID * leaves and config.scann_part_vectors:
        raise SynthError(f"scann_part_vectors={config.scann_part_vectors} gives parts of {smallest} vectors, too few "
                         f"to train {leaves} leaves; raise it")
    to_search = min(leaves, config.scann_leaves_to_search or _auto_leaves_to_search(leaves))
    return {"leaves": leaves, "leaves_to_search": to_search, "part_starts": starts}


def _searcher(vectors: np.ndarray, layout: dict[str, Any]):
    return (
        _scann().builder(vectors, _SCANN_BUILD_K, "dot_product")
        # random_init=False (k-means++): random init picks its centres through an absl hash set,
        # whose iteration order changes between runs, so two builds of the same data differed.
        # Spherical k-means suits unit vectors: recall@10 0.91 -> 0.95 on the test set.
        .tree(num_leaves=layout["leaves"], num_leaves_to_search=layout["leaves_to_search"],
              training_sample_size=min(len(vectors), _SCANN_TRAIN_SAMPLE), random_init=False, spherical=True)
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        # Exact float32 re-scoring of the shortlist: the scores returned are true inner products.
        .reorder(rerank_depth(_SCANN_BUILD_K))
        .build())


def _rows(blocks: Sequence[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the blocks' concatenation, gathered from the blocks that hold them."""
    pieces, first = [], 0
    for block in blocks:
        lo, hi = max(start, first), min(stop, first + len(block))
        if lo < hi:
            pieces.append(block[lo - first:hi - first])
        first += len(block)
    return np.ascontiguousarray(np.concatenate(pieces), np.float32)


def build(vectors: np.ndarray, config: IndexConfig) -> ScannIndex:
    n, dim = vectors.shape
    layout = _layout(n, config)
    starts = layout["part_starts"]
    parts = [(a, _searcher(np.ascontiguousarray(vectors[a:b]), layout)) for a, b in zip(starts, starts[1:])]
    return ScannIndex(config.kind, config, parts, n, dim, layout)


def build_parts(blocks: Sequence[np.ndarray], config: IndexConfig, directory: Path) -> ScannIndex:
    """The index `build` makes of the blocks' concatenation, one part at a time: only one part's
    vectors and searcher are held while building. Written to `directory`; returns it loaded."""
    n, dim = sum(len(b) for b in blocks), blocks[0].shape[1]
    layout = _layout(n, config)
    starts = layout["part_starts"]
    meta = meta_of(ScannIndex(config.kind, config, [], n, dim, layout))

    def write_files(tmp: Path) -> None:
        for number, (a, b) in enumerate(zip(starts, starts[1:])):
            _serialize(_searcher(_rows(blocks, a, b), layout), tmp, number)

    write_atomically(directory, meta, write_files)
    return load(directory, meta, config)


def load(directory: Path, meta: dict[str, Any], config: IndexConfig) -> ScannIndex:
    starts = meta["params"]["part_starts"]
    parts = []
    for number, first in enumerate(starts[:-1]):
        path = _part_dir(directory, number)
        if not (path / "scann_assets.pbtxt").is_file():
            # Without it ScaNN would "upgrade" the directory in place as an old layout, not fail.
            raise FileNotFoundError(f"{path / 'scann_assets.pbtxt'} is missing")
        parts.append((first, _scann().load_searcher(str(path))))
    return ScannIndex(config.kind, config, parts, starts[-1], meta["dim"], meta["params"])


BACKEND = Backend(build, load, lambda config, n: config.scann_leaves or _auto_leaves(n))
