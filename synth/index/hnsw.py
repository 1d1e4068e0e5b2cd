"""HNSW graph search (faiss IndexHNSWFlat), built single-threaded so the graph is reproducible."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import faiss
import numpy as np

from synth.index.base import HNSW, Backend, IndexConfig
from synth.index.faiss_index import FaissIndex, load_faiss


@contextmanager
def _single_threaded() -> Iterator[None]:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def build(vectors: np.ndarray, config: IndexConfig) -> FaissIndex:
    index = faiss.IndexHNSWFlat(vectors.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    # Parallel HNSW insertion links each vector to whatever neighbours other threads have inserted
    # so far, so the graph (and every search result) would change from run to run. One thread
    # costs build time but makes the cached index, and the synthesized data, reproducible.
    with _single_threaded():
        index.add(vectors)
    return FaissIndex(config.kind, HNSW, config, index, index.ntotal, index.d, search_params=_search_params)


def _search_params(config: IndexConfig, params: dict[str, int], depth: int) -> faiss.SearchParameters:
    return faiss.SearchParametersHNSW(efSearch=max(config.ef_search, depth))


def _load(directory, meta, config) -> FaissIndex:
    return load_faiss(directory, meta, config, search_params=_search_params)


BACKEND = Backend(build, _load)
