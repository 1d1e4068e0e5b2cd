"""Output shards: each is generated from its own seeded slice of the inputs, so shards are
independent of each other and of the order (or the process) in which they are made.

Meta-document `d` belongs to shard `d % num_shards`, visited in a per-shard seeded order; the
negative reuse cap is split between shards (`NegativeFilter.allowance`). A shard is written
under a temporary name, its report is saved, and only then is the shard renamed into place: a
shard file that exists is complete and has its report.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from synth.assemble import Extension, Joiner, Packer, Sequence, concatenated_sequences, extended_sequences
from synth.baselines import document_vectors, keyword_order, knn_walk
from synth.config import SynthConfig
from synth.errors import SynthError
from synth.files import temporary_sibling
from synth.index import ChunkIndex, load_index
from synth.index.base import META
from synth.negatives import IndexCandidates, NegativeFilter, RandomCandidates
from synth.overlap import MetaOverlap
from synth.report import ShardReport
from synth.staging import Mirror
from synth.store import StoreRef
from synth.strategies import Order
from synth.tfrecord import shard_name, to_example, write_json, write_shard
from nextlong_contract.tokenizer import TextTokenizer, load_tokenizer


@dataclass(frozen=True)
class ShardInputs:
    """Everything a shard is made from, as paths: picklable for worker processes."""

    config: SynthConfig
    meta: StoreRef
    corpus: StoreRef
    index_dir: Path | None  # None for layouts that need no retrieval
    duplicates: Path | None  # the corpus's near-duplicate documents (`synth.dedup`); None: not deduplicated

    def pull(self, mirror: Mirror) -> None:
        """Stage everything a shard is made from, for a worker whose disk holds none of it (`synth.staging`)."""
        for store in (self.meta, self.corpus):
            mirror.pull_store(store.blocks, store.embedding_name)
        if self.index_dir is not None and not mirror.pull_dir(self.index_dir, META):
            raise SynthError(f"{mirror.url(self.index_dir)} is not complete; run the same command again")
        if self.duplicates is not None and not mirror.pull(self.duplicates):
            raise SynthError(f"{mirror.url(self.duplicates)} is missing; run the same command again")


@dataclass
class OpenInputs:
    config: SynthConfig
    extension: Extension
    index: ChunkIndex | None
    tokenizer: TextTokenizer

    @classmethod
    def open(cls, inputs: ShardInputs) -> "OpenInputs":
        meta = inputs.meta.open()
        corpus = meta if inputs.corpus == inputs.meta else inputs.corpus.open()
        config = inputs.config
        return cls(config=config,
                   extension=Extension.build(meta, corpus, config.mining, config.output.document_len,
                                             np.load(inputs.duplicates) if inputs.duplicates else None),
                   index=load_index(inputs.index_dir) if inputs.index_dir else None,
                   tokenizer=load_tokenizer(inputs.config.tokenizer))


def _shard_order(count: int, shard: int, num_shards: int, seed: int) -> list[int]:
    """This shard's share of `count` items (documents, or groups of them), in its seeded order."""
    items = np.arange(shard, count, num_shards)
    return np.random.default_rng([seed, shard]).permutation(items).tolist()


def _shard_cap(max_sequences: int | None, shard: int, num_shards: int) -> int | None:
    if max_sequences is None:
        return None
    return max_sequences // num_shards + (1 if shard < max_sequences % num_shards else 0)


def shard_file(config: SynthConfig, shard: int) -> str:
    out = config.output
    return shard_name(config.mining.strategy.value, shard, out.num_shards, out.compression)


def report_path(config: SynthConfig, name: str) -> Path:
    return config.output.out / ".state" / f"{name}.json"


def finished_report(config: SynthConfig, shard: int, mirror: Mirror = Mirror()) -> ShardReport | None:
    """The report of a shard a previous (or killed) run completed, else None. The report is saved
    before the shard appears, so a shard that exists has one."""
    name = shard_file(config, shard)
    if not mirror.exists(config.output.out / name) or not mirror.pull(report_path(config, name)):
        return None
    return ShardReport.from_dict(json.loads(report_path(config, name).read_text()))


def publish_shard(config: SynthConfig, shard: int, mirror: Mirror) -> None:
    """Push a shard made in local staging (`synth.staging`): its report first, as `make_shard` writes them."""
    name = shard_file(config, shard)
    mirror.push(report_path(config, name))
    mirror.push(config.output.out / name)


def _concatenation_order(opened: OpenInputs, shard: int) -> list[int]:
    """This shard's meta-documents in the order its concatenation baseline packs them (`synth.baselines`)."""
    config, ext = opened.config, opened.extension
    seed = config.mining.seed
    docs = _shard_order(ext.meta.num_docs, shard, config.output.num_shards, seed)
    match config.mining.strategy.order:
        case Order.KNN_WALK:
            vectors = document_vectors(ext.meta.embeddings, ext.meta.doc_chunk_offsets, docs)
            return [docs[i] for i in knn_walk(vectors, list(range(len(docs))))]
        case Order.KEYWORDS:
            texts = [opened.tokenizer.decode([t for c in ext.meta.doc_chunks(d) for t in ext.meta.tokens(c).tolist()])
                     for d in docs]
            return [docs[i] for i in keyword_order(texts, seed)]
        case Order.SHUFFLED:
            return docs


def _sequences(opened: OpenInputs, shard: int, packer: Packer, rules: NegativeFilter) -> Iterator[Sequence]:
    config, ext = opened.config, opened.extension
    out, mining = config.output, config.mining
    cap = _shard_cap(out.max_sequences, shard, out.num_shards)
    if not mining.strategy.extends:
        return concatenated_sequences(ext.meta, _concatenation_order(opened, shard), packer, cap)
    source = IndexCandidates(opened.index) if mining.strategy.searches_index else \
        RandomCandidates(ext.corpus.embeddings, np.random.default_rng([mining.seed, shard, 1]))
    groups = ext.groups.groups
    order = _shard_order(len(groups), shard, out.num_shards, mining.seed)
    packer.stats.meta_documents_skipped = ext.groups.skipped_in_shard(shard, out.num_shards)
    return extended_sequences(ext, source, rules, [groups[g] for g in order], packer, cap)


def make_shard(opened: OpenInputs, shard: int, progress: bool = True) -> ShardReport:
    config, ext = opened.config, opened.extension
    out, mining = config.output, config.mining
    packer = Packer(out.seq_len, out.negative_weight, opened.tokenizer.bos_id, opened.tokenizer.pad_id,
                    out.document_len, Joiner.build(mining.joiner, opened.tokenizer))
    overlap = MetaOverlap(ext.corpus.tokens, mining.shingle_tokens, mining.overlap_threshold)
    rules = NegativeFilter(ext.corpus_chunk_doc, mining.dedup_threshold, mining.max_reuse, overlap,
                           shard=shard, num_shards=out.num_shards, reuse_scope=mining.reuse_scope,
                           duplicate_doc=ext.corpus_duplicates)
    sequences = _sequences(opened, shard, packer, rules)
    bar = tqdm(desc=f"shard {shard + 1}/{out.num_shards}", unit="seq", leave=False,
               dynamic_ncols=True, disable=not progress)

    def examples() -> Iterator[bytes]:
        for sequence in sequences:
            bar.update(1)
            yield to_example(sequence)

    name = shard_file(config, shard)
    report_path(config, name).parent.mkdir(parents=True, exist_ok=True)  # a worker's fresh disk may lack both
    tmp = temporary_sibling(out.out / name)
    count, sha256 = write_shard(tmp, examples(), out.compression)
    bar.close()
    report = ShardReport.collect(name, count, sha256, tmp.stat().st_size, packer.stats, rules.stats)
    write_json(report_path(config, name), report.to_dict())
    os.replace(tmp, out.out / name)
    return report


_worker_inputs: OpenInputs | None = None  # one per worker process, opened once


def _open_worker(inputs: ShardInputs) -> None:
    global _worker_inputs
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _worker_inputs = OpenInputs.open(inputs)


def _make_in_worker(shard: int) -> ShardReport:
    return make_shard(_worker_inputs, shard, progress=False)


def make_shards(inputs: ShardInputs, opened: OpenInputs, workers: int) -> list[ShardReport]:
    """All shards, reusing finished ones; missing shards in `workers` processes (1 = here)."""
    config = inputs.config
    num_shards = config.output.num_shards
    reports = {s: r for s in range(num_shards) if (r := finished_report(config, s)) is not None}
    missing = [s for s in range(num_shards) if s not in reports]
    bar = tqdm(total=num_shards, initial=len(reports), desc="shards", unit="shard",
               dynamic_ncols=True)
    if workers <= 1 or len(missing) <= 1:
        for shard in missing:
            reports[shard] = make_shard(opened, shard)
            bar.update(1)
    else:
        # Spawned, not forked: TensorFlow and OpenMP thread pools do not survive a fork.
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=get_context("spawn"),
                                 initializer=_open_worker, initargs=(inputs,)) as pool:
            futures = {pool.submit(_make_in_worker, s): s for s in missing}
            for future in as_completed(futures):
                reports[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return [reports[s] for s in range(num_shards)]
