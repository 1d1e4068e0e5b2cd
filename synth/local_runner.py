"""`nextlong-synth` on this machine: the stages (`synth.stages`) run in one process, the output
shards in `--workers` processes: read -> chunk -> embed -> index -> mine -> assemble -> write.

Resumable and deterministic: chunk blocks, embeddings and the index are cached under the cache
directory, and every output shard is generated from its own seeded inputs (`synth.shards`), so
shards can be made in any order, in several processes, and a finished one is never redone.
Killing the run at any point and running it again with the same arguments gives byte-identical
output, recomputing only what was not finished.
"""

from __future__ import annotations

import time

import numpy as np

from synth.assemble import Extension
from synth.config import SynthConfig
from synth.embed import load_embedder
from synth.errors import SynthError
from synth.report import RunFigures
from synth.shards import OpenInputs, ShardInputs, make_shards
from synth.stages import (build_collection, check_collections, check_meta_groups, corpus_index, finish,
                          index_recall, near_duplicates, prepare)
from synth.staging import Mirror
from nextlong_contract.tokenizer import load_tokenizer


def build_corpus_index(config: SynthConfig) -> dict:
    """`nextlong-synth index build`: chunk, embed and index the retrieval corpus into the cache, where
    every synthesis run with the same corpus, chunking, embedder and index settings finds it.

    Returns where it is and what it costs: size per million vectors and recall@10 against exact
    search on a seeded sample of corpus chunks.
    """
    _refuse_urls(config)
    tokenizer = load_tokenizer(config.tokenizer)
    embedder = load_embedder(config.embedder, config.embedding)
    corpus = build_collection(config.retrieval_corpus, "corpus", config, tokenizer, embedder)
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
    strategy = config.mining.strategy
    embedder = load_embedder(config.embedder, config.embedding) if strategy.embeds else None

    meta = build_collection(config.meta, "meta", config, tokenizer, embedder)
    corpus = meta if config.corpus is None else build_collection(
        config.corpus, "corpus", config, tokenizer, embedder)
    check_collections(meta, corpus)
    meta_store = meta.ref.open()
    corpus_store = meta_store if corpus is meta else corpus.ref.open()

    index, index_dir, recall = None, None, None
    if strategy.searches_index:
        index, index_dir = corpus_index(config, corpus.key, corpus.ref, embedder.fingerprint)
        recall = index_recall(config, index, corpus.ref, meta.ref)

    duplicates = near_duplicates(config, corpus.key, lambda: corpus_store)
    marks = np.load(duplicates) if duplicates else None
    inputs = ShardInputs(config, meta.ref, corpus.ref, index_dir, duplicates)
    extension = Extension.build(meta_store, corpus_store, config.mining, config.output.document_len, marks)
    check_meta_groups(config, extension)
    reports = make_shards(inputs, OpenInputs(config, extension, index, tokenizer), workers)
    return finish(config, tokenizer, meta, corpus, RunFigures(
        recall, None if marks is None else int(marks.sum()), embedder.window if embedder else None), reports,
        started)
