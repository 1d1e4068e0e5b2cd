"""The faiss-backed index wrapper shared by the flat, IVF-PQ and HNSW backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from synth.index.base import (IndexConfig, check_k, check_queries, empty, meta_of, padded, rerank,
                              rerank_depth, write_atomically)

FAISS_FILE, VECTORS_FILE = "faiss.index", "embeddings.npy"
SearchParams = Callable[[IndexConfig, dict[str, int], int], "faiss.SearchParameters | None"]


def no_params(config: IndexConfig, params: dict[str, int], depth: int) -> None:
    return None


@dataclass(eq=False)
class FaissIndex:
    kind: str
    backend: str
    config: IndexConfig
    index: faiss.Index
    ntotal: int
    dim: int
    params: dict[str, int] = field(default_factory=dict)
    # Exact copies of the vectors for re-ranking PQ candidates (IVF-PQ only): the caller's array
    # after a build, a read-only memmap of embeddings.npy after a load.
    vectors: np.ndarray | None = None
    search_params: SearchParams = no_params  # the backend's per-search knobs (efSearch, nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = check_queries(queries, self.dim), check_k(k)
        if not len(queries):
            return empty(k)
        depth = min(k if self.vectors is None else rerank_depth(k), self.ntotal)
        scores, ids = self.index.search(queries, depth, params=self.search_params(self.config, self.params, depth))
        if self.vectors is not None:
            scores, ids = rerank(queries, ids, self.vectors, k)
        return padded(scores, ids, k)

    def save(self, directory: Path) -> None:
        def write_files(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / FAISS_FILE))
            if self.vectors is not None:
                np.save(tmp / VECTORS_FILE, self.vectors)

        write_atomically(directory, meta_of(self), write_files)


def load_faiss(directory: Path, meta: dict[str, Any], config: IndexConfig, *, reranked: bool = False,
               search_params: SearchParams = no_params) -> FaissIndex:
    # On-disk inverted lists (a sharded IVF build) are found beside the index file, wherever the
    # directory was moved since it was written.
    index = faiss.read_index(str(directory / FAISS_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
    vectors = None
    if reranked:
        vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
        if vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32:
            raise ValueError(f"{VECTORS_FILE} holds {vectors.dtype} {vectors.shape}, "
                             f"expected float32 {(index.ntotal, index.d)}")
    return FaissIndex(config.kind, meta["backend"], config, index, index.ntotal, index.d, meta["params"], vectors,
                      search_params)
