"""The synthesis stages wired together: read -> chunk -> embed -> index -> mine -> assemble -> write.

Resumable and deterministic: chunk blocks, embeddings and the index are cached under the cache
directory, every output shard is generated from its own seeded inputs (meta-document `d` belongs
to shard `d % num_shards`, the reuse cap is per shard), and a shard counts as done only when its
file and its statistics are both in place. Killing the run at any point and running it again
with the same arguments gives byte-identical output, recomputing only what was not finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from synth.assemble import Extension, Packer, concatenated_sequences, extended_sequences
from synth.config import SynthConfig
from synth.corpus import CorpusSpec, ReadStats, corpus_fingerprint, read_documents
from synth.embed import load_embedder
from synth.errors import SynthError
from synth.index import ChunkIndex, build_index, exact_search, load_index, recall_at_k
from synth.negatives import IndexCandidates, NegativeFilter, RandomCandidates
from synth.report import ShardReport, render_summary, summarize
from synth.store import BuildStats, ChunkStore, build_store, store_key
from synth.tfrecord import MANIFEST, shard_name, to_example, write_json, write_shard
from synth.tokenizer import TextTokenizer, load_tokenizer

RECALL_QUERIES = 256
RECALL_K = 10
FORMAT = "nextlong-tfrecord/1"


@dataclass
class Collection:
    key: str  # identifies the chunked collection (source files, tokenizer, chunking)
    store: ChunkStore
    read: ReadStats
    build: BuildStats


def _state_dir(config: SynthConfig) -> Path:
    return config.output.out / ".state"


def _check_same_run(config: SynthConfig) -> None:
    """Refuse to mix the shards of two different configurations in one output directory."""
    saved = _state_dir(config) / "config.json"
    current = config.to_dict()
    if saved.is_file():
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


def _collection(spec: CorpusSpec, label: str, config: SynthConfig, tokenizer: TextTokenizer,
                embedder) -> Collection:
    read = ReadStats()
    key = store_key(corpus_fingerprint(spec), tokenizer, config.chunking, config.docs_per_block)
    store, build = build_store(
        read_documents(spec, read, strict=config.strict), config.output.cache / f"chunks-{key}",
        tokenizer, config.chunking, embedder, config.docs_per_block, label)
    return Collection(key, store, read, build)


def _index(config: SynthConfig, corpus: Collection, embedder_fingerprint: str) -> ChunkIndex:
    digest = hashlib.sha256(json.dumps(
        [asdict(config.index), embedder_fingerprint, corpus.key]).encode()).hexdigest()[:16]
    directory = config.output.cache / f"index-{digest}"
    if (directory / "meta.json").is_file():
        return load_index(directory)
    started = time.perf_counter()
    index = build_index(corpus.store.embeddings, config.index)
    index.save(directory)
    tqdm.write(f"index {config.index.kind}: {corpus.store.num_chunks} chunks in "
               f"{time.perf_counter() - started:.1f}s")
    return index


def _recall(config: SynthConfig, index: ChunkIndex, corpus: ChunkStore, meta: ChunkStore) -> float:
    """recall@10 of the index against exact search, on a seeded sample of meta-chunks."""
    rng = np.random.default_rng(config.mining.seed)
    sample = rng.choice(meta.num_chunks, size=min(RECALL_QUERIES, meta.num_chunks), replace=False)
    queries = meta.embeddings[np.sort(sample)]
    k = min(RECALL_K, corpus.num_chunks)
    _, exact = exact_search(corpus.embeddings, queries, k)
    _, approx = index.search(queries, k)
    return recall_at_k(approx, exact, k)


def _shard_docs(num_docs: int, shard: int, num_shards: int, seed: int) -> list[int]:
    docs = np.arange(shard, num_docs, num_shards)
    return np.random.default_rng([seed, shard]).permutation(docs).tolist()


def _shard_cap(max_sequences: int | None, shard: int, num_shards: int) -> int | None:
    if max_sequences is None:
        return None
    return max_sequences // num_shards + (1 if shard < max_sequences % num_shards else 0)


def _generate_shard(config: SynthConfig, shard: int, extension: Extension,
                    index: ChunkIndex | None, tokenizer: TextTokenizer, name: str,
                    path: Path) -> ShardReport:
    out, mining = config.output, config.mining
    packer = Packer(out.seq_len, out.negative_weight, tokenizer.bos_id, tokenizer.pad_id)
    cap = _shard_cap(out.max_sequences, shard, out.num_shards)
    corpus = extension.corpus
    rules = NegativeFilter(extension.corpus_chunk_doc, mining.dedup_threshold, mining.max_reuse)
    if mining.strategy == "plain-concat":
        docs = _shard_docs(corpus.num_docs, shard, out.num_shards, mining.seed)
        sequences = concatenated_sequences(corpus, docs, packer, cap)
    else:
        source = IndexCandidates(index) if mining.strategy == "nextlong" else RandomCandidates(
            corpus.embeddings, np.random.default_rng([mining.seed, shard, 1]))
        docs = _shard_docs(extension.meta.num_docs, shard, out.num_shards, mining.seed)
        sequences = extended_sequences(extension, source, rules, docs, packer, cap)
    progress = tqdm(desc=f"shard {shard + 1}/{out.num_shards}", unit="seq", leave=False,
                    dynamic_ncols=True)

    def examples():
        for sequence in sequences:
            progress.update(1)
            yield to_example(sequence)

    count, sha256 = write_shard(path, examples(), out.compression)
    progress.close()
    return ShardReport.collect(name, count, sha256, packer.stats, rules.stats)


def run(config: SynthConfig) -> dict:
    """Run (or resume) a synthesis; returns the summary that is also written to OUT."""
    started = time.perf_counter()
    out = config.output.out
    out.mkdir(parents=True, exist_ok=True)
    _check_same_run(config)
    tokenizer = load_tokenizer(config.tokenizer)
    needs_embeddings = config.mining.strategy != "plain-concat"
    embedder = load_embedder(config.embedder) if needs_embeddings else None

    meta = _collection(config.meta, "meta", config, tokenizer, embedder)
    corpus = meta if config.corpus is None else _collection(
        config.corpus, "corpus", config, tokenizer, embedder)
    if meta.store.num_chunks == 0 or corpus.store.num_chunks == 0:
        raise SynthError("no usable documents were read (see the skip counts above); "
                         "check --meta/--corpus and the field names")

    index, recall = None, None
    if config.mining.strategy == "nextlong":
        index = _index(config, corpus, embedder.fingerprint)
        recall = 1.0 if config.index.kind == "faiss-flat" else _recall(
            config, index, corpus.store, meta.store)

    extension = Extension.build(meta.store, corpus.store, config.mining.k, config.mining.max_k)
    state = _state_dir(config)
    reports = []
    prefix = config.mining.strategy
    for shard in tqdm(range(config.output.num_shards), desc="shards", unit="shard",
                      dynamic_ncols=True):
        name = shard_name(prefix, shard, config.output.num_shards, config.output.compression)
        report_path = state / f"{name}.json"
        if (out / name).is_file():  # published only after its report, so the report is there
            reports.append(ShardReport.from_dict(json.loads(report_path.read_text())))
            continue
        tmp = out / f"{name}.tmp"
        report = _generate_shard(config, shard, extension, index, tokenizer, name, tmp)
        write_json(report_path, report.to_dict())
        os.replace(tmp, out / name)
        reports.append(report)

    summary = summarize(config, tokenizer, meta, corpus, reports, recall)
    manifest = {
        "format": FORMAT,
        "seq_len": config.output.seq_len,
        "compression": config.output.compression,
        "strategy": config.mining.strategy,
        "tokenizer": {"name": config.tokenizer, "vocab_size": tokenizer.vocab_size,
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                      "pad_id": tokenizer.pad_id},
        "shards": [{"file": r.file, "sequences": r.sequences, "sha256": r.sha256}
                   for r in reports],
        "content_hash": hashlib.sha256("".join(r.sha256 for r in reports).encode()).hexdigest(),
        "counts": summary,
        "config": config.to_dict(),
    }
    write_json(out / MANIFEST, manifest)
    (out / "summary.md").write_text(render_summary(summary))
    timing = {
        "seconds": round(time.perf_counter() - started, 2),
        "chunk_seconds": round(meta.build.chunk_seconds + (
            corpus.build.chunk_seconds if corpus is not meta else 0), 2),
        "embed_seconds": round(meta.build.embed_seconds + (
            corpus.build.embed_seconds if corpus is not meta else 0), 2),
    }
    return {**summary, "timing": timing}
