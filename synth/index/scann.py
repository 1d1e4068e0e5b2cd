"""ScaNN: a k-means partition tree with anisotropic asymmetric hashing, re-scored exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synth.index.base import (SCANN, POINTS_PER_CENTROID, Backend, IndexConfig, check_k, check_queries,
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
    kind: str
    config: IndexConfig
    searcher: Any  # scann_ops_pybind.ScannSearcher
    ntotal: int
    dim: int
    params: dict[str, int]
    backend: str = SCANN

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = check_queries(queries, self.dim), check_k(k)
        if not len(queries):
            return empty(k)
        final = min(k, self.ntotal)
        ids, scores = self.searcher.search_batched(
            queries, final_num_neighbors=final,
            pre_reorder_num_neighbors=min(rerank_depth(k), self.ntotal),
            leaves_to_search=self.params["leaves_to_search"])
        # ScaNN pads short result lists with NaN scores and id 0, and returns uint32 ids.
        ids = np.where(np.isnan(scores), -1, ids.astype(np.int64))
        return padded(scores, ids, k)

    def save(self, directory: Path) -> None:
        def write_files(tmp: Path) -> None:
            (tmp / _SCANN_DIR).mkdir()
            # Relative asset paths, or the index would point into the temp dir after the rename.
            self.searcher.serialize(str(tmp / _SCANN_DIR), relative_path=True)

        write_atomically(directory, meta_of(self), write_files)


def build(vectors: np.ndarray, config: IndexConfig) -> ScannIndex:
    n, dim = vectors.shape
    leaves = config.scann_leaves or _auto_leaves(n)
    to_search = min(leaves, config.scann_leaves_to_search or _auto_leaves_to_search(leaves))
    searcher = (
        _scann().builder(vectors, _SCANN_BUILD_K, "dot_product")
        # random_init=False (k-means++): random init picks its centres through an absl hash set,
        # whose iteration order changes between runs, so two builds of the same data differed.
        # Spherical k-means suits unit vectors: recall@10 0.91 -> 0.95 on the test set.
        .tree(num_leaves=leaves, num_leaves_to_search=to_search,
              training_sample_size=min(n, _SCANN_TRAIN_SAMPLE), random_init=False, spherical=True)
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        # Exact float32 re-scoring of the shortlist: the scores returned are true inner products.
        .reorder(rerank_depth(_SCANN_BUILD_K))
        .build())
    return ScannIndex(config.kind, config, searcher, n, dim,
                       {"leaves": leaves, "leaves_to_search": to_search})


def load(directory: Path, meta: dict[str, Any], config: IndexConfig) -> ScannIndex:
    path = directory / _SCANN_DIR
    if not (path / "scann_assets.pbtxt").is_file():
        # Without it ScaNN would "upgrade" the directory in place as an old layout, not fail.
        raise FileNotFoundError(f"{path / 'scann_assets.pbtxt'} is missing")
    searcher = _scann().load_searcher(str(path))
    return ScannIndex(config.kind, config, searcher, searcher.size(), meta["dim"], meta["params"])


BACKEND = Backend(build, load, lambda config, n: config.scann_leaves or _auto_leaves(n))
