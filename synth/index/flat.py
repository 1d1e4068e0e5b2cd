"""Exact inner-product search (faiss IndexFlatIP): the ground truth, and the fallback for collections
too small to train an approximate index."""

from __future__ import annotations

import faiss
import numpy as np

from synth.index.base import FLAT, Backend, IndexConfig
from synth.index.faiss_index import FaissIndex, load_faiss


def build(vectors: np.ndarray, config: IndexConfig) -> FaissIndex:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return FaissIndex(config.kind, FLAT, config, index, index.ntotal, index.d)


BACKEND = Backend(build, load_faiss)
