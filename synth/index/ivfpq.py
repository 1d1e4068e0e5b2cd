"""IVF-PQ (faiss): coarse k-means lists of product-quantised codes, candidates re-ranked exactly
against the stored float32 vectors.

`build_sharded` builds the same index from a collection given shard by shard (the blocks of a
chunk store, say): it trains on the same seeded sample, codes each shard into its own inverted
lists, and merges them on disk (`faiss.contrib.ondisk`), so no step holds more than one shard's
vectors, and the lists live in a file that is memory-mapped, not loaded, at search time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np

from synth.errors import SynthError
from synth.index.base import (IVFPQ, META, PQ_BITS, POINTS_PER_CENTROID, Backend, IndexConfig, meta_of,
                              training_sample, write_atomically)
from synth.index.faiss_index import FAISS_FILE, VECTORS_FILE, FaissIndex, load_faiss

ON_DISK_LISTS = "lists.ivfdata"  # the merged inverted lists of a sharded build

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


def _trained(sample_of: Callable[[int], np.ndarray], n: int, dim: int,
             config: IndexConfig) -> tuple[faiss.IndexIVFPQ, dict[str, int]]:
    """An empty IVF-PQ index trained on `sample_of(size)`, a seeded sample of the n vectors."""
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
    sample = sample_of(max(nlist, 2 ** PQ_BITS) * _MAX_POINTS_PER_CENTROID)
    if len(sample) < POINTS_PER_CENTROID * 2 ** PQ_BITS:
        # faiss would print this once per sub-quantizer on stderr; re-ranking makes coarse codes
        # harmless, so one log line is enough.
        log.info("training %d PQ sub-quantizers on only %d vectors; codes will be coarse",
                 pq_m, len(sample))
        index.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    return index, {"nlist": nlist, "pq_m": pq_m}


def build(vectors: np.ndarray, config: IndexConfig) -> FaissIndex:
    n, dim = vectors.shape
    index, params = _trained(lambda size: training_sample(vectors, size, config.seed), n, dim, config)
    index.add(vectors)
    return FaissIndex(config.kind, IVFPQ, config, index, index.ntotal, dim, params, vectors, _search_params)


def build_sharded(shards: Sequence[np.ndarray], config: IndexConfig, directory: Path) -> FaissIndex:
    """The index `build` makes of the shards' concatenation (the same training sample, the same
    lists), written to `directory` with its inverted lists merged on disk; returns it loaded."""
    from faiss.contrib.ondisk import merge_ondisk

    offsets = np.cumsum([0] + [len(s) for s in shards])
    n, dim = int(offsets[-1]), shards[0].shape[1]

    def sample_of(size: int) -> np.ndarray:
        if size >= n:
            return np.concatenate(shards)
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=size, replace=False))
        where = np.searchsorted(offsets, rows, side="right") - 1
        return np.stack([shards[s][r - offsets[s]] for s, r in zip(where, rows)])

    trained, params = _trained(sample_of, n, dim, config)
    work = Path(tempfile.mkdtemp(prefix=".ivf-shards.", dir=Path(directory).parent))
    try:
        parts = []
        for number, shard in enumerate(shards):
            part = faiss.clone_index(trained)
            part.add_with_ids(np.ascontiguousarray(shard, np.float32), np.arange(offsets[number], offsets[number + 1]))
            parts.append(str(work / f"part-{number:05d}.index"))
            faiss.write_index(part, parts[-1])
        vectors_path = work / VECTORS_FILE
        vectors = np.lib.format.open_memmap(vectors_path, mode="w+", dtype=np.float32, shape=(n, dim))
        for number, shard in enumerate(shards):
            vectors[offsets[number]:offsets[number + 1]] = shard
        vectors.flush()
        del vectors

        def write_files(tmp: Path) -> None:
            merge_ondisk(trained, parts, str(tmp / ON_DISK_LISTS))
            faiss.write_index(trained, str(tmp / FAISS_FILE))
            os.replace(vectors_path, tmp / VECTORS_FILE)

        index = FaissIndex(config.kind, IVFPQ, config, trained, n, dim, {**params, "on_disk": 1})
        write_atomically(directory, meta_of(index), write_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _load(directory, json.loads((Path(directory) / META).read_text()), config)


def _search_params(config: IndexConfig, params: dict[str, int], depth: int) -> faiss.SearchParameters:
    return faiss.SearchParametersIVF(nprobe=min(config.nprobe, params["nlist"]))


def _load(directory, meta, config) -> FaissIndex:
    return load_faiss(directory, meta, config, reranked=True, search_params=_search_params)


BACKEND = Backend(build, _load, lambda config, n: config.nlist or _auto_nlist(n))
