"""Chunked, tokenized and embedded collection on disk: the cache between reading and mining.

A collection is processed in blocks of consecutive documents. Each block directory holds the
token ids of its chunks and, per embedder, their embeddings; it is written under a temporary name
and renamed when complete, so a killed run leaves only whole blocks, and a rerun reuses them
instead of chunking and embedding again. Memory stays bounded by one block while building.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from synth.chunking import chunk_documents
from synth.config import ChunkingConfig
from synth.corpus import Document
from synth.embed import Embedder
from synth.files import temporary_sibling
from nextlong_contract.tokenizer import TextTokenizer

_TOKENS, _TOKEN_OFFSETS, _DOC_OFFSETS, _DOC_IDS, _DOC_SOURCES = (
    "tokens.npy", "token_offsets.npy", "doc_chunk_offsets.npy", "doc_ids.json", "doc_sources.json")
_FORMAT = 2  # in every store key: blocks of an older layout are rebuilt, not misread


def store_key(corpus_fingerprint: str, tokenizer: TextTokenizer, chunking: ChunkingConfig,
              docs_per_block: int) -> str:
    vocab = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()[:12]
    text = f"{corpus_fingerprint}|{vocab}|{chunking.unit}:{chunking.size}|{docs_per_block}|{_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _batched(items: Iterable, n: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, n)):
        yield batch


@dataclass
class BuildStats:
    blocks_built: int = 0
    blocks_reused: int = 0
    chunks: int = 0  # in built and reused blocks alike: the collection's size
    chunks_embedded: int = 0
    chunks_over_window: int = 0  # longer than the encoder reads (built and reused blocks alike)
    embed_seconds: float = 0.0
    chunk_seconds: float = 0.0


@dataclass(frozen=True)
class StoreRef:
    """Where a built store lives on disk; small and picklable, so worker processes can open it."""

    blocks: tuple[Path, ...]
    embedding_name: str
    dim: int

    def open(self) -> "ChunkStore":
        return load_store(self)

    def block_embeddings(self) -> list[np.ndarray]:
        """Each block's embeddings, memory-mapped: the collection's vectors without loading them all."""
        return [np.load(block / self.embedding_name, mmap_mode="r") for block in self.blocks]


@dataclass
class ChunkStore:
    """All chunks of a collection: ids per document, token ids per chunk, embeddings."""

    doc_ids: list[str]
    doc_sources: list[str]  # the input file of each document
    doc_chunk_offsets: np.ndarray  # [num_docs + 1] first chunk of each document
    dim: int
    _block_embeddings: list[np.ndarray] = field(repr=False)  # memory-mapped per block
    _block_tokens: list[np.ndarray] = field(repr=False)  # memory-mapped per block
    _block_token_offsets: list[np.ndarray] = field(repr=False)
    _block_first_chunk: np.ndarray = field(repr=False)  # [num_blocks + 1]

    @cached_property
    def embeddings(self) -> np.ndarray:
        """[num_chunks, dim] float32, unit rows, read into memory on first use. Mining reads only the
        meta-chunks' (the index holds what search needs), so a corpus store's vectors stay on disk."""
        return np.concatenate(self._block_embeddings) if self._block_embeddings else np.zeros((0, self.dim), np.float32)

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def num_chunks(self) -> int:
        return int(self.doc_chunk_offsets[-1])

    def chunk_doc(self) -> np.ndarray:
        """Document index of every chunk."""
        return np.repeat(np.arange(self.num_docs, dtype=np.int64),
                         np.diff(self.doc_chunk_offsets))

    def doc_chunks(self, doc: int) -> range:
        return range(int(self.doc_chunk_offsets[doc]), int(self.doc_chunk_offsets[doc + 1]))

    def tokens(self, chunk: int) -> np.ndarray:
        block = int(np.searchsorted(self._block_first_chunk, chunk, side="right")) - 1
        local = chunk - int(self._block_first_chunk[block])
        offsets = self._block_token_offsets[block]
        return np.asarray(self._block_tokens[block][offsets[local]:offsets[local + 1]])

    def chunk_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self._block_token_offsets]) \
            if self._block_token_offsets else np.zeros(0, np.int64)

    def chunk_id(self, chunk: int, chunk_doc: np.ndarray) -> str:
        doc = int(chunk_doc[chunk])
        return f"{self.doc_ids[doc]}#{chunk - int(self.doc_chunk_offsets[doc])}"


def _window_file(block: Path, embedding_name: str) -> Path:
    return block / embedding_name.replace(".npy", ".window.json")


def _over_window(block: Path, embedding_name: str) -> int:
    path = _window_file(block, embedding_name)
    return json.loads(path.read_text())["chunks_over_window"] if path.is_file() else 0


def _write_block(directory: Path, docs: list[Document], texts_chunks, embeddings: np.ndarray,
                 embedding_name: str, over_window: int) -> None:
    tmp = temporary_sibling(directory)
    tmp.mkdir(parents=True)
    chunks = [c for doc_chunks in texts_chunks for c in doc_chunks]
    lengths = [len(c.ids) for c in chunks]
    np.save(tmp / _TOKENS, np.concatenate([c.ids for c in chunks]) if chunks
            else np.zeros(0, np.int32))
    np.save(tmp / _TOKEN_OFFSETS, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]))
    np.save(tmp / _DOC_OFFSETS, np.concatenate(
        [[0], np.cumsum([len(c) for c in texts_chunks], dtype=np.int64)]))
    (tmp / _DOC_IDS).write_text(json.dumps([d.id for d in docs], ensure_ascii=False))
    (tmp / _DOC_SOURCES).write_text(json.dumps([d.source for d in docs], ensure_ascii=False))
    np.save(tmp / embedding_name, embeddings)
    _window_file(tmp, embedding_name).write_text(json.dumps({"chunks_over_window": over_window}))
    complete = (directory / _DOC_IDS).is_file()  # a block directory appears whole, by the rename below
    if complete and not (directory / embedding_name).is_file():
        # Made for another embedder: add this one's vectors beside its, the embedding file (the marker)
        # last, so that runs with and without an embedder (nextlong, plain-concat) share one cache.
        for name in (_window_file(tmp, embedding_name).name, embedding_name):
            os.replace(tmp / name, directory / name)
    elif not complete:
        shutil.rmtree(directory, ignore_errors=True)  # what an interrupted older version left
        try:
            os.replace(tmp, directory)
            return
        except OSError:
            if not (directory / embedding_name).is_file():
                raise
    # Done above, or another worker made the same block meanwhile, with the same content: keep theirs.
    shutil.rmtree(tmp, ignore_errors=True)


def count_reused(block: Path, embedding_name: str, stats: BuildStats) -> None:
    """Count a finished block as reused; reads only its small files (`counted_files`)."""
    stats.blocks_reused += 1
    stats.chunks += int(np.load(block / _DOC_OFFSETS)[-1])
    stats.chunks_over_window += _over_window(block, embedding_name)


def counted_files(block: Path, embedding_name: str) -> tuple[Path, Path]:
    """The files `count_reused` reads: what a worker fetches to count a block it need not rebuild."""
    return block / _DOC_OFFSETS, _window_file(block, embedding_name)


def embedding_name(embedder: Embedder | None) -> str:
    return f"emb-{embedder.fingerprint if embedder else 'none'}.npy"


def build_block(block: Path, docs: list[Document], tokenizer: TextTokenizer, chunking: ChunkingConfig,
                embedder: Embedder | None, stats: BuildStats) -> None:
    """One block of consecutive documents, chunked and embedded into `block`, or reused when a
    complete one is there. Every runner (local, Beam) builds blocks with this, so they agree."""
    name = embedding_name(embedder)
    if (block / name).is_file():
        count_reused(block, name, stats)
        return
    started = time.perf_counter()
    per_doc = chunk_documents([d.text for d in docs], chunking.size, chunking.unit, tokenizer)
    texts = [c.text for doc_chunks in per_doc for c in doc_chunks]
    stats.chunk_seconds += time.perf_counter() - started
    started = time.perf_counter()
    embeddings = embedder.embed(texts) if embedder else np.zeros((len(texts), 0), np.float32)
    over_window = embedder.over_window(texts) if embedder else 0
    stats.embed_seconds += time.perf_counter() - started
    stats.chunks += len(texts)
    stats.chunks_embedded += len(texts)
    stats.chunks_over_window += over_window
    _write_block(block, docs, per_doc, embeddings, name, over_window)
    stats.blocks_built += 1


def block_path(directory: Path, number: int) -> Path:
    return directory / f"block-{number:05d}"


def build_store(documents: Iterable[Document], directory: Path, tokenizer: TextTokenizer,
                chunking: ChunkingConfig, embedder: Embedder | None, docs_per_block: int,
                label: str) -> tuple[StoreRef, BuildStats]:
    """Chunk and embed `documents` into `directory`, reusing every complete block already there.

    Without an embedder (layouts that need no retrieval) the blocks hold zero-width embeddings.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stats = BuildStats()
    blocks: list[Path] = []
    progress = tqdm(desc=f"{label}: chunk+embed" if embedder else f"{label}: chunk", unit="doc",
                    dynamic_ncols=True)
    for number, docs in enumerate(_batched(documents, docs_per_block)):
        blocks.append(block_path(directory, number))
        progress.update(len(docs))
        build_block(blocks[-1], docs, tokenizer, chunking, embedder, stats)
        progress.set_postfix(chunks=stats.chunks, refresh=False)
    progress.close()
    return StoreRef(tuple(blocks), embedding_name(embedder), embedder.dim if embedder else 0), stats


def load_store(ref: StoreRef) -> ChunkStore:
    doc_ids: list[str] = []
    doc_sources: list[str] = []
    doc_offsets = [np.zeros(1, np.int64)]
    embeddings, tokens, token_offsets, first_chunk = [], [], [], [0]
    for block in ref.blocks:
        ids = json.loads((block / _DOC_IDS).read_text())
        offsets = np.load(block / _DOC_OFFSETS)
        doc_offsets.append(offsets[1:] + first_chunk[-1])
        doc_ids.extend(ids)
        doc_sources.extend(json.loads((block / _DOC_SOURCES).read_text()))
        embeddings.append(np.load(block / ref.embedding_name, mmap_mode="r"))
        tokens.append(np.load(block / _TOKENS, mmap_mode="r"))
        token_offsets.append(np.load(block / _TOKEN_OFFSETS))
        first_chunk.append(first_chunk[-1] + int(offsets[-1]))
    return ChunkStore(
        doc_ids=doc_ids,
        doc_sources=doc_sources,
        doc_chunk_offsets=np.concatenate(doc_offsets),
        dim=ref.dim,
        _block_embeddings=embeddings,
        _block_tokens=tokens,
        _block_token_offsets=token_offsets,
        _block_first_chunk=np.asarray(first_chunk, np.int64),
    )
