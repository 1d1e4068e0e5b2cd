"""IVF-PQ (faiss): coarse k-means lists of product-quantised codes, candidates re-ranked exactly
against the stored float32 vectors."""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from synth.errors import SynthError
from synth.index.base import (IVFPQ, PQ_BITS, POINTS_PER_CENTROID, Backend, IndexConfig,
                              training_sample)
from synth.index.faiss_index import FaissIndex, load_faiss

log = logging.getLogger(__name__)
# faiss k-means never uses more than this many points per centroid, so a larger sample is waste.
_MAX_POINTS_PER_CENTROID = 256


def _auto_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // POINTS_PER_CENTROID))


def _auto_pq_m(dim: int) -> int:
    """Largest divisor of dim giving >= 4 dims per sub-quantizer, capped at 64 bytes per code:
    re-ranking repairs the ordering, so codes only need to be good enough to shortlist."""
    target = max(1, min(dim // 4, 64))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def build(vectors: np.ndarray, config: IndexConfig) -> FaissIndex:
    n, dim = vectors.shape
    nlist = config.nlist or _auto_nlist(n)
    pq_m = config.pq_m or _auto_pq_m(dim)
    if dim % pq_m:
        raise SynthError(f"pq_m={pq_m} does not divide the embedding dimension {dim}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    index.pq.cp.seed = config.seed
    # k-means would subsample anyway; sampling here, seeded, also spares IVF's residual copy of
    # the whole collection during training.
    sample_size = max(nlist, 2 ** PQ_BITS) * _MAX_POINTS_PER_CENTROID
    sample = training_sample(vectors, sample_size, config.seed)
    if len(sample) < POINTS_PER_CENTROID * 2 ** PQ_BITS:
        # faiss would print this once per sub-quantizer on stderr; re-ranking makes coarse codes
        # harmless, so one log line is enough.
        log.info("training %d PQ sub-quantizers on only %d vectors; codes will be coarse",
                 pq_m, len(sample))
        index.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    index.add(vectors)
    return FaissIndex(config.kind, IVFPQ, config, index, index.ntotal, dim, {"nlist": nlist, "pq_m": pq_m}, vectors,
                      _search_params)


def _search_params(config: IndexConfig, params: dict[str, int], depth: int) -> faiss.SearchParameters:
    return faiss.SearchParametersIVF(nprobe=min(config.nprobe, params["nlist"]))


def _load(directory, meta, config) -> FaissIndex:
    return load_faiss(directory, meta, config, reranked=True, search_params=_search_params)


BACKEND = Backend(build, _load, lambda config, n: config.nlist or _auto_nlist(n))
