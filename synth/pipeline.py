"""The synthesis stages wired together: read -> chunk -> embed -> index -> mine -> assemble -> write.

Resumable and deterministic: chunk blocks, embeddings and the index are cached under the cache
directory, and every output shard is generated from its own seeded inputs (`synth.shards`), so
shards can be made in any order, in several processes, and a finished one is never redone.
Killing the run at any point and running it again with the same arguments gives byte-identical
output, recomputing only what was not finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from nextlong_jax.schema import MANIFEST, Manifest, ShardEntry
from synth.assemble import Extension
from synth.config import SynthConfig
from synth.corpus import CorpusSpec, ReadStats, corpus_fingerprint, read_documents
from synth.dedup import near_duplicates_path, write_near_duplicates
from synth.embed import load_embedder
from synth.errors import SynthError
from synth.index import ChunkIndex, build_saved, exact_search_blocks, load_index, recall_at_k
from synth.index.base import META
from synth.report import RunFigures, render_summary, summarize
from synth.shards import OpenInputs, ShardInputs, make_shards
from synth.staging import Mirror
from synth.store import BuildStats, ChunkStore, StoreRef, build_store, store_key
from synth.tfrecord import write_json
from synth.tokenizer import TextTokenizer, load_tokenizer

SUMMARY = "summary.md"
RECALL_QUERIES = 256
RECALL_K = 10


@dataclass
class Collection:
    key: str  # identifies the chunked collection (source files, tokenizer, chunking)
    ref: StoreRef
    read: ReadStats
    build: BuildStats

    @property
    def chunks(self) -> int:
        return self.build.chunks


def _state_dir(config: SynthConfig) -> Path:
    return config.output.out / ".state"


def _check_same_run(config: SynthConfig, mirror: Mirror) -> None:
    """Refuse to mix the shards of two different configurations in one output directory."""
    saved = _state_dir(config) / "config.json"
    current = config.to_dict()
    if mirror.pull(saved):
        previous = json.loads(saved.read_text())
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current)
                             if previous.get(k) != current.get(k))
            raise SynthError(
                f"{config.output.out} holds a run with other settings (differs in: "
                f"{', '.join(changed)}); use a new --out or delete the directory")
    else:
        saved.parent.mkdir(parents=True, exist_ok=True)
        write_json(saved, current)
        mirror.push(saved)


def collection_key(spec: CorpusSpec, config: SynthConfig, tokenizer: TextTokenizer) -> str:
    """Names a chunked collection: its source files, tokenizer and chunking."""
    return store_key(corpus_fingerprint(spec), tokenizer, config.chunking, config.docs_per_block)


def collection_dir(config: SynthConfig, key: str) -> Path:
    return config.output.cache / f"chunks-{key}"


def _collection(spec: CorpusSpec, label: str, config: SynthConfig, tokenizer: TextTokenizer,
                embedder) -> Collection:
    read = ReadStats()
    key = collection_key(spec, config, tokenizer)
    ref, build = build_store(read_documents(spec, read, strict=config.strict), collection_dir(config, key),
                             tokenizer, config.chunking, embedder, config.docs_per_block, label)
    return Collection(key, ref, read, build)


def index_dir(config: SynthConfig, corpus_key: str, embedder_fingerprint: str) -> Path:
    """Where the corpus index is cached: named by the index settings, the embedder and the corpus."""
    digest = hashlib.sha256(json.dumps(
        [asdict(config.index), embedder_fingerprint, corpus_key]).encode()).hexdigest()[:16]
    return config.output.cache / f"index-{digest}"


def corpus_index(config: SynthConfig, corpus_key: str, corpus: StoreRef,
                 embedder_fingerprint: str) -> tuple[ChunkIndex, Path]:
    """The index of the corpus chunks, from the cache when an earlier run (or `index build`) made it."""
    directory = index_dir(config, corpus_key, embedder_fingerprint)
    if (directory / META).is_file():
        return load_index(directory), directory
    started = time.perf_counter()
    index = build_saved(corpus.block_embeddings(), config.index, directory)
    tqdm.write(f"index {config.index.kind}: {index.ntotal} chunks in {time.perf_counter() - started:.1f}s")
    return index, directory


def index_recall(config: SynthConfig, index: ChunkIndex, corpus: StoreRef, queries: StoreRef) -> float:
    """recall@10 of the index against exact search, on a seeded sample of the `queries` chunks; the
    stores are read block by block, so this holds at any corpus size."""
    if config.index.kind == "faiss-flat":
        return 1.0
    blocks = queries.block_embeddings()
    starts = np.cumsum([0] + [len(block) for block in blocks])
    rng = np.random.default_rng(config.mining.seed)
    sample = np.sort(rng.choice(starts[-1], size=min(RECALL_QUERIES, starts[-1]), replace=False))
    sampled = np.concatenate([block[sample[(sample >= start) & (sample < end)] - start]
                              for block, start, end in zip(blocks, starts, starts[1:])])
    k = min(RECALL_K, index.ntotal)
    _, exact = exact_search_blocks(corpus.block_embeddings(), sampled, k)
    _, approx = index.search(sampled, k)
    return recall_at_k(approx, exact, k)


def build_corpus_index(config: SynthConfig) -> dict:
    """`nextlong-synth index build`: chunk, embed and index the retrieval corpus into the cache, where
    every synthesis run with the same corpus, chunking, embedder and index settings finds it.

    Returns where it is and what it costs: size per million vectors and recall@10 against exact
    search on a seeded sample of corpus chunks.
    """
    _refuse_urls(config)
    tokenizer = load_tokenizer(config.tokenizer)
    embedder = load_embedder(config.embedder, config.embedding)
    corpus = _collection(config.retrieval_corpus, "corpus", config, tokenizer, embedder)
    if corpus.chunks == 0:
        raise SynthError("no usable corpus documents were read; check --corpus/--meta and the field names")
    started = time.perf_counter()
    index, directory = corpus_index(config, corpus.key, corpus.ref, embedder.fingerprint)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    return {"index_dir": str(directory), "kind": config.index.kind, "backend": index.backend,
            "vectors": index.ntotal, "seconds": round(seconds, 2),
            "mib_per_million_vectors": round(size / index.ntotal * 1e6 / 2**20, 1),
            "recall_at_10": round(index_recall(config, index, corpus.ref, corpus.ref), 4)}


def needs_embeddings(config: SynthConfig) -> bool:
    return config.mining.strategy not in ("plain-concat", "keyword-concat")


def prepare(config: SynthConfig, mirror: Mirror) -> TextTokenizer:
    """What every runner does first: the output directory, bound to this configuration."""
    config.output.out.mkdir(parents=True, exist_ok=True)
    _check_same_run(config, mirror)
    return load_tokenizer(config.tokenizer)


def _refuse_urls(config: SynthConfig) -> None:
    if config.output.staged:
        raise SynthError("an --out or --cache-dir URL needs --runner beam (its workers stage the files through "
                         "local disk); the local runner writes local paths: write there, then copy")


def run(config: SynthConfig, workers: int = 1) -> dict:
    """Run (or resume) a synthesis; returns the summary that is also written to OUT.

    `workers` processes make the output shards; it does not change the output.
    """
    started = time.perf_counter()
    _refuse_urls(config)
    tokenizer = prepare(config, Mirror())
    embedder = load_embedder(config.embedder, config.embedding) if needs_embeddings(config) else None

    meta = _collection(config.meta, "meta", config, tokenizer, embedder)
    corpus = meta if config.corpus is None else _collection(
        config.corpus, "corpus", config, tokenizer, embedder)
    check_collections(meta, corpus)
    meta_store = meta.ref.open()
    corpus_store = meta_store if corpus is meta else corpus.ref.open()

    index, index_dir, recall = None, None, None
    if config.mining.strategy == "nextlong":
        index, index_dir = corpus_index(config, corpus.key, corpus.ref, embedder.fingerprint)
        recall = index_recall(config, index, corpus.ref, meta.ref)

    duplicates = near_duplicates(config, corpus.key, lambda: corpus_store)
    marks = np.load(duplicates) if duplicates else None
    inputs = ShardInputs(config, meta.ref, corpus.ref, index_dir, duplicates)
    extension = Extension.build(meta_store, corpus_store, config.mining,
                                config.output.doc_len or config.output.seq_len, marks)
    check_meta_groups(config, extension)
    reports = make_shards(inputs, OpenInputs(config, extension, index, tokenizer), workers)
    return finish(config, tokenizer, meta, corpus, RunFigures(
        recall, None if marks is None else int(marks.sum()), embedder.window if embedder else None), reports,
        started)


def near_duplicates(config: SynthConfig, corpus_key: str, corpus: Callable[[], ChunkStore],
                    mirror: Mirror = Mirror()) -> Path | None:
    """Where the corpus's near-duplicate documents are marked, or None when --corpus-dedup is off.
    `corpus` opens the store, called only when the marks are not cached yet."""
    mining = config.mining
    if mining.corpus_dedup is None:
        return None
    path = near_duplicates_path(collection_dir(config, corpus_key), mining.corpus_dedup, mining.shingle_tokens)
    if not mirror.pull(path):
        write_near_duplicates(corpus(), path, mining.corpus_dedup, mining.shingle_tokens)
        mirror.push(path)
    return path


def check_meta_groups(config: SynthConfig, extension: Extension) -> None:
    mining = config.mining
    if not mining.strategy.endswith("-concat") and not extension.groups.groups:
        raise SynthError(f"no meta-document has --min-meta-chunks={mining.min_meta_chunks} chunks "
                         f"({len(extension.groups.skipped)} skipped): chunk smaller, merge short documents with "
                         "--short-meta merge, or allow single chunks with --min-meta-chunks 1")


def check_collections(meta: Collection, corpus: Collection) -> None:
    if meta.chunks == 0 or corpus.chunks == 0:
        raise SynthError("no usable documents were read (see the skip counts above); "
                         "check --meta/--corpus and the field names")


def finish(config: SynthConfig, tokenizer: TextTokenizer, meta: Collection, corpus: Collection,
           figures: RunFigures, reports: list, started: float) -> dict:
    """The manifest and summary of a run whose shards are all written; returns the summary."""
    out = config.output.out
    summary = summarize(config, tokenizer, meta, corpus, reports, figures)
    manifest = Manifest(
        seq_len=config.output.seq_len, compression=config.output.compression,
        shards=tuple(ShardEntry(r.file, r.sequences, r.sha256, r.bytes) for r in reports),
        extra={"strategy": config.mining.strategy,
               "tokenizer": {"name": config.tokenizer, "vocab_size": tokenizer.vocab_size,
                             "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id},
               "content_hash": hashlib.sha256("".join(r.sha256 for r in reports).encode()).hexdigest(),
               "counts": summary, "config": config.to_dict()})
    write_json(out / MANIFEST, manifest.to_dict())
    (out / SUMMARY).write_text(render_summary(summary))
    timing = {
        "seconds": round(time.perf_counter() - started, 2),
        "chunk_seconds": round(meta.build.chunk_seconds + (
            corpus.build.chunk_seconds if corpus is not meta else 0), 2),
        "embed_seconds": round(meta.build.embed_seconds + (
            corpus.build.embed_seconds if corpus is not meta else 0), 2),
    }
    return {**summary, "timing": timing}
