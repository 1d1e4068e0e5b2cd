"""Nearest-neighbour search over chunk embeddings: one interface, four backends.

Embeddings are L2-normalised float32 rows, so inner product is cosine similarity. Every backend
returns exact inner products as scores (the approximate ones re-rank their candidates against the
stored vectors), so similarity thresholds downstream mean the same thing whichever index found the
candidates. Ids are row numbers of the matrix given to `build_index`; -1 (score -inf) pads rows
that have fewer than k results.

An index directory holds `meta.json` (requested kind, effective backend, config, size) and the
backend's files. It is written under a temporary name and renamed when complete, so a killed save
never leaves a directory that looks like an index but is not one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import faiss
import numpy as np

from synth.errors import SynthError

log = logging.getLogger(__name__)

INDEX_KINDS = ("faiss-flat", "faiss-ivfpq", "faiss-hnsw", "scann")
FLAT, IVFPQ, HNSW, SCANN = INDEX_KINDS

_META, _FAISS_FILE, _VECTORS_FILE = "meta.json", "faiss.index", "embeddings.npy"
_SCANN_DIR = "scann"
_FORMAT = 1
# faiss warns below 39 training points per centroid; the same floor keeps ScaNN leaves populated.
_POINTS_PER_CENTROID = 39
_PQ_BITS = 8
# Fewer points than this cannot train 2^8 PQ centroids (faiss refuses), nor a useful ScaNN tree.
_MIN_TRAIN_POINTS = 2 ** _PQ_BITS
# faiss k-means never uses more than this many points per centroid, so a larger sample is waste.
_MAX_POINTS_PER_CENTROID = 256
_SCANN_TRAIN_SAMPLE = 100_000
_SCANN_BUILD_K = 10  # only ScaNN's default for searches that pass no k; every search passes one
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

    kind: str = FLAT
    nlist: int | None = None
    nprobe: int = 16
    pq_m: int | None = None
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    scann_leaves: int | None = None
    scann_leaves_to_search: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise SynthError(
                f"unknown index kind {self.kind!r}; choose one of {', '.join(INDEX_KINDS)}")
        for name in ("nprobe", "hnsw_m", "ef_search", "ef_construction"):
            _positive(name, getattr(self, name), optional=False)
        for name in ("nlist", "pq_m", "scann_leaves", "scann_leaves_to_search"):
            _positive(name, getattr(self, name), optional=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SynthError(f"index seed must be a non-negative integer, got {self.seed!r}")


class ChunkIndex(Protocol):
    kind: str  # what the user asked for
    backend: str  # what actually serves searches (faiss-flat when n was too small to train)
    ntotal: int
    dim: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], ids int64 [q, k]), best first; -inf / -1 pad missing results."""
        ...

    def save(self, directory: Path) -> None:
        ...


# ---------------------------------------------------------------- validation and result shaping

def _check_matrix(array: Any, what: str) -> np.ndarray:
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


def _check_queries(queries: Any, dim: int) -> np.ndarray:
    queries = _check_matrix(queries, "queries")
    if queries.shape[1] != dim:
        raise SynthError(
            f"queries have dimension {queries.shape[1]} but the index holds {dim}-dim vectors")
    return queries


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SynthError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _padded(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Backends mark missing results differently (faiss: -FLT_MAX, ScaNN: NaN with id 0)."""
    ids = ids.astype(np.int64)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    missing = k - ids.shape[1]
    if missing > 0:
        ids = np.pad(ids, ((0, 0), (0, missing)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, missing)), constant_values=-np.inf)
    return scores, ids


def _rerank_depth(k: int) -> int:
    """Candidates fetched per query before exact re-scoring: enough to absorb quantisation noise."""
    return max(4 * k, k + 32)


def _rerank(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
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


def _empty(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.empty((0, k), np.float32), np.empty((0, k), np.int64)


# ------------------------------------------------------------------------- on-disk layout

def _write_atomically(directory: Path, meta: dict[str, Any],
                      write_files: Callable[[Path], None]) -> None:
    """Backend files, then meta.json, in a sibling temp dir that is renamed over `directory`."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write_files(tmp)
        (tmp / _META).write_text(json.dumps(meta, indent=2) + "\n")
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


def _meta(index: _FaissIndex | _ScannIndex) -> dict[str, Any]:
    return {"format": _FORMAT, "kind": index.kind, "backend": index.backend,
            "config": asdict(index.config), "ntotal": index.ntotal, "dim": index.dim,
            "params": index.params}


# ------------------------------------------------------------------------------ faiss backends

@contextmanager
def _single_threaded() -> Iterator[None]:
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


@dataclass(eq=False)
class _FaissIndex:
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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = _check_queries(queries, self.dim), _check_k(k)
        if not len(queries):
            return _empty(k)
        depth = min(k if self.vectors is None else _rerank_depth(k), self.ntotal)
        scores, ids = self.index.search(queries, depth, params=self._search_params(depth))
        if self.vectors is not None:
            scores, ids = _rerank(queries, ids, self.vectors, k)
        return _padded(scores, ids, k)

    def _search_params(self, depth: int) -> faiss.SearchParameters | None:
        if self.backend == HNSW:
            return faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, depth))
        if self.backend == IVFPQ:
            return faiss.SearchParametersIVF(nprobe=min(self.config.nprobe, self.params["nlist"]))
        return None

    def save(self, directory: Path) -> None:
        def write_files(tmp: Path) -> None:
            faiss.write_index(self.index, str(tmp / _FAISS_FILE))
            if self.vectors is not None:
                np.save(tmp / _VECTORS_FILE, self.vectors)

        _write_atomically(directory, _meta(self), write_files)


def _build_flat(vectors: np.ndarray, config: IndexConfig) -> _FaissIndex:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return _FaissIndex(config.kind, FLAT, config, index, index.ntotal, index.d)


def _auto_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // _POINTS_PER_CENTROID))


def _auto_pq_m(dim: int) -> int:
    """Largest divisor of dim giving >= 4 dims per sub-quantizer, capped at 64 bytes per code:
    re-ranking repairs the ordering, so codes only need to be good enough to shortlist."""
    target = max(1, min(dim // 4, 64))
    return max(m for m in range(1, target + 1) if dim % m == 0)


def _training_sample(vectors: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= len(vectors):
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows])


def _build_ivfpq(vectors: np.ndarray, config: IndexConfig) -> _FaissIndex:
    n, dim = vectors.shape
    nlist = config.nlist or _auto_nlist(n)
    pq_m = config.pq_m or _auto_pq_m(dim)
    if dim % pq_m:
        raise SynthError(f"pq_m={pq_m} does not divide the embedding dimension {dim}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, _PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = config.seed
    index.pq.cp.seed = config.seed
    # k-means would subsample anyway; sampling here, seeded, also spares IVF's residual copy of
    # the whole collection during training.
    sample_size = max(nlist, 2 ** _PQ_BITS) * _MAX_POINTS_PER_CENTROID
    sample = _training_sample(vectors, sample_size, config.seed)
    if len(sample) < _POINTS_PER_CENTROID * 2 ** _PQ_BITS:
        # faiss would print this once per sub-quantizer on stderr; re-ranking makes coarse codes
        # harmless, so one log line is enough.
        log.info("training %d PQ sub-quantizers on only %d vectors; codes will be coarse",
                 pq_m, len(sample))
        index.pq.cp.min_points_per_centroid = 1
    index.train(sample)
    index.add(vectors)
    return _FaissIndex(config.kind, IVFPQ, config, index, index.ntotal, dim,
                       {"nlist": nlist, "pq_m": pq_m}, vectors)


def _build_hnsw(vectors: np.ndarray, config: IndexConfig) -> _FaissIndex:
    index = faiss.IndexHNSWFlat(vectors.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    # Parallel HNSW insertion links each vector to whatever neighbours other threads have inserted
    # so far, so the graph (and every search result) would change from run to run. One thread
    # costs build time but makes the cached index, and the synthesized data, reproducible.
    with _single_threaded():
        index.add(vectors)
    return _FaissIndex(config.kind, HNSW, config, index, index.ntotal, index.d)


def _load_faiss(directory: Path, meta: dict[str, Any], config: IndexConfig) -> _FaissIndex:
    index = faiss.read_index(str(directory / _FAISS_FILE))
    vectors = None
    if meta["backend"] == IVFPQ:
        vectors = np.load(directory / _VECTORS_FILE, mmap_mode="r")
        if vectors.shape != (index.ntotal, index.d) or vectors.dtype != np.float32:
            raise ValueError(f"{_VECTORS_FILE} holds {vectors.dtype} {vectors.shape}, "
                             f"expected float32 {(index.ntotal, index.d)}")
    return _FaissIndex(config.kind, meta["backend"], config, index, index.ntotal, index.d,
                       meta["params"], vectors)


# -------------------------------------------------------------------------------- ScaNN backend

def _scann():
    # Imported on first use: `import scann` imports TensorFlow, seconds faiss users never need.
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


def _auto_leaves(n: int) -> int:
    return max(2, min(round(math.sqrt(n)), n // _POINTS_PER_CENTROID))


def _auto_leaves_to_search(leaves: int) -> int:
    return min(leaves, max(8, math.ceil(leaves / 5)))


@dataclass(eq=False)
class _ScannIndex:
    kind: str
    config: IndexConfig
    searcher: Any  # scann_ops_pybind.ScannSearcher
    ntotal: int
    dim: int
    params: dict[str, int]
    backend: str = SCANN

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries, k = _check_queries(queries, self.dim), _check_k(k)
        if not len(queries):
            return _empty(k)
        final = min(k, self.ntotal)
        ids, scores = self.searcher.search_batched(
            queries, final_num_neighbors=final,
            pre_reorder_num_neighbors=min(_rerank_depth(k), self.ntotal),
            leaves_to_search=self.params["leaves_to_search"])
        # ScaNN pads short result lists with NaN scores and id 0, and returns uint32 ids.
        ids = np.where(np.isnan(scores), -1, ids.astype(np.int64))
        return _padded(scores, ids, k)

    def save(self, directory: Path) -> None:
        def write_files(tmp: Path) -> None:
            (tmp / _SCANN_DIR).mkdir()
            # Relative asset paths, or the index would point into the temp dir after the rename.
            self.searcher.serialize(str(tmp / _SCANN_DIR), relative_path=True)

        _write_atomically(directory, _meta(self), write_files)


def _build_scann(vectors: np.ndarray, config: IndexConfig) -> _ScannIndex:
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
        .reorder(_rerank_depth(_SCANN_BUILD_K))
        .build())
    return _ScannIndex(config.kind, config, searcher, n, dim,
                       {"leaves": leaves, "leaves_to_search": to_search})


def _load_scann(directory: Path, meta: dict[str, Any], config: IndexConfig) -> _ScannIndex:
    path = directory / _SCANN_DIR
    if not (path / "scann_assets.pbtxt").is_file():
        # Without it ScaNN would "upgrade" the directory in place as an old layout, not fail.
        raise FileNotFoundError(f"{path / 'scann_assets.pbtxt'} is missing")
    searcher = _scann().load_searcher(str(path))
    return _ScannIndex(config.kind, config, searcher, searcher.size(), meta["dim"], meta["params"])


# ---------------------------------------------------------------------------------- public API

def _min_training_points(config: IndexConfig, n: int) -> int:
    if config.kind == IVFPQ:
        centroids = config.nlist or _auto_nlist(n)
    elif config.kind == SCANN:
        centroids = config.scann_leaves or _auto_leaves(n)
    else:
        return 0
    return max(_MIN_TRAIN_POINTS, _POINTS_PER_CENTROID * centroids)


def build_index(embeddings: np.ndarray, config: IndexConfig) -> ChunkIndex:
    """Index the rows of `embeddings` (float32, L2-normalised); deterministic for a given config."""
    vectors = _check_matrix(embeddings, "embeddings")
    if not len(vectors):
        raise SynthError("cannot build an index over 0 embeddings (is the corpus empty?)")
    needed = _min_training_points(config, len(vectors))
    if len(vectors) < needed:
        log.warning("%s needs at least %d vectors to train, got %d: using exact faiss-flat search",
                    config.kind, needed, len(vectors))
        return _build_flat(vectors, config)
    builders = {FLAT: _build_flat, IVFPQ: _build_ivfpq, HNSW: _build_hnsw, SCANN: _build_scann}
    return builders[config.kind](vectors, config)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_index(directory: Path) -> ChunkIndex:
    """The index `save` wrote to `directory`; SynthError if it is missing or damaged."""
    directory = Path(directory)
    if not (directory / _META).is_file():
        raise SynthError(f"no index at {directory} ({_META} missing)")
    loaders = {FLAT: _load_faiss, IVFPQ: _load_faiss, HNSW: _load_faiss, SCANN: _load_scann}
    try:
        meta = json.loads((directory / _META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{_META} is not in format {_FORMAT}")
        config = IndexConfig(**meta["config"])
        index = loaders[meta["backend"]](directory, meta, config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SynthError) as error:
        raise SynthError(f"cannot load the index at {directory}: {_one_line(error)}; "
                         f"delete it to rebuild") from error
    if (index.ntotal, index.dim) != (meta["ntotal"], meta["dim"]):
        raise SynthError(f"index at {directory} holds {index.ntotal} x {index.dim} vectors but "
                         f"{_META} says {meta['ntotal']} x {meta['dim']}; delete it to rebuild")
    return index


def exact_search(embeddings: np.ndarray, queries: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product search: the ground truth that recall is measured against."""
    return _build_flat(_check_matrix(embeddings, "embeddings"), IndexConfig()).search(queries, k)


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
