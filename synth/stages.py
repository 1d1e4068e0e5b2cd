"""The synthesis stages both runners call: the output bound to one configuration, chunk collections,
the corpus index and its recall, the corpus's near-duplicate marks, the checks between stages, and
the manifest and summary that finish a run.

The local runner (`synth.local_runner`) calls them in one process; the Beam runner
(`synth.beam_runner`) calls the same functions inside its transforms, so both write the same
examples. Shards themselves are made by `synth.shards`.
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

from nextlong_contract.schema import MANIFEST, Manifest, ShardEntry
from synth.assemble import Extension
from synth.config import SynthConfig
from synth.corpus import CorpusSpec, ReadStats, corpus_fingerprint, read_documents
from synth.dedup import near_duplicates_path, write_near_duplicates
from synth.errors import SynthError
from synth.index import ChunkIndex, build_saved, exact_search_blocks, load_index, recall_at_k
from synth.index.base import FLAT, META
from synth.report import RunFigures, render_summary, summarize
from synth.staging import Mirror
from synth.store import BuildStats, ChunkStore, StoreRef, build_store, store_key
from synth.tfrecord import write_json
from nextlong_contract.tokenizer import TextTokenizer, load_tokenizer

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


def prepare(config: SynthConfig, mirror: Mirror) -> TextTokenizer:
    """What every runner does first: the output directory, bound to this configuration."""
    config.output.out.mkdir(parents=True, exist_ok=True)
    _check_same_run(config, mirror)
    return load_tokenizer(config.tokenizer)


def _check_same_run(config: SynthConfig, mirror: Mirror) -> None:
    """Refuse to mix the shards of two different configurations in one output directory."""
    saved = config.output.out / ".state" / "config.json"
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


def build_collection(spec: CorpusSpec, label: str, config: SynthConfig, tokenizer: TextTokenizer,
                     embedder) -> Collection:
    """The chunk store of `spec`, read, chunked and embedded here (or found in the cache)."""
    read = ReadStats()
    key = collection_key(spec, config, tokenizer)
    ref, build = build_store(read_documents(spec, read, strict=config.strict), collection_dir(config, key),
                             tokenizer, config.chunking, embedder, config.docs_per_block, label)
    return Collection(key, ref, read, build)


def check_collections(meta: Collection, corpus: Collection) -> None:
    if meta.chunks == 0 or corpus.chunks == 0:
        raise SynthError("no usable documents were read (see the skip counts above); "
                         "check --meta/--corpus and the field names")


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
    if config.index.kind == FLAT:
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
    if mining.strategy.extends and not extension.groups.groups:
        raise SynthError(f"no meta-document has --min-meta-chunks={mining.min_meta_chunks} chunks "
                         f"({len(extension.groups.skipped)} skipped): chunk smaller, merge short documents with "
                         "--short-meta merge, or allow single chunks with --min-meta-chunks 1")


def finish(config: SynthConfig, tokenizer: TextTokenizer, meta: Collection, corpus: Collection,
           figures: RunFigures, reports: list, started: float) -> dict:
    """The manifest and summary of a run whose shards are all written; returns the summary."""
    out = config.output.out
    summary = summarize(config, tokenizer, meta, corpus, reports, figures)
    manifest = Manifest(
        seq_len=config.output.seq_len, compression=config.output.compression,
        document_len=config.output.document_len if config.output.doc_len is not None else None,
        shards=tuple(ShardEntry(r.file, r.sequences, r.sha256, r.bytes) for r in reports),
        extra={"strategy": config.mining.strategy.value,
               "tokenizer": {"name": config.tokenizer, "vocab_size": tokenizer.vocab_size,
                             "vocab_sha256": tokenizer.vocab_sha256,
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
