"""`nextlong-synth --runner beam`: the synthesis stages as one Apache Beam pipeline.

Each stage calls the function the local runner calls (`synth.stages`), so both write the same examples:

- read: one task per source file, records checked by `corpus.checked_records`; a repeated id is
  settled by grouping on the id (the record first in reading order wins, as the local reader's);
- number: each document gets its place in reading order from the per-source counts, and with it
  its block (`docs_per_block` consecutive documents), so blocks hold what the local runner's hold;
- blocks: chunked and embedded by `store.build_block`, tokenizer and embedder loaded once per worker;
- index: built once from the corpus blocks, or found in the cache (`stages.corpus_index`), and its
  recall@10 measured there;
- shards: `shards.make_shard` per output shard, stores and index opened once per worker.

The driver then writes the manifest and summary as the local runner does, from the pipeline's Beam
metrics alone: it opens no chunk store and no index, which on a cluster may be corpus-sized. Every
stage reuses finished work (blocks, index, shards), so a killed pipeline run again resumes. Any Beam
runner works: DirectRunner by default, Dataflow, Flink or Spark through `--beam-options`. The output
and cache directories are local paths (for DirectRunner, or a mount every worker shares) or URLs
(gs://, s3://, ...), which the workers stage through their local disks (`synth.staging`).

One difference from the local runner: with --max-meta-docs/--max-corpus-docs the local reader stops at
the cut, while every file is read here, so skips after the cut are counted too.
"""

from __future__ import annotations

import io
import logging
import re
import shlex
import time
from contextlib import contextmanager, redirect_stderr
from dataclasses import fields
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from nextlong_contract.schema import MANIFEST
from synth.config import SynthConfig
from synth.corpus import CorpusSpec, Document, ReadStats, checked_records, duplicate_id, resolve_sources
from synth.embed import load_embedder
from synth.errors import USER_ERRORS, SynthError
from synth.index.base import META
from synth.report import RunFigures
from synth.shards import OpenInputs, ShardInputs, finished_report, make_shard, publish_shard
from synth.stages import (SUMMARY, Collection, check_collections, collection_dir, collection_key, corpus_index,
                          finish, index_dir, index_recall, near_duplicates, prepare)
from synth.staging import Mirror
from synth.store import (BuildStats, StoreRef, block_path, build_block, count_reused, counted_files,
                         embedding_name)
from nextlong_contract.tokenizer import load_tokenizer

NAMESPACE = "nextlong-synth"
RECALL_MICROS, NEAR_DUPLICATES = "index.recall_at_10_micros", "corpus.near_duplicate_documents"
DEFAULT_OPTIONS = ("--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=2 "
                   "--default_sdk_harness_log_level=WARNING")


def _count(name: str, value: int = 1) -> None:
    if value:
        Metrics.counter(NAMESPACE, name).inc(value)


def _read_source(indexed, spec: CorpusSpec, strict: bool, label: str):
    """((source, position), document) for each usable record of one source; skips are counted."""
    number, source = indexed
    for position, record in checked_records(source, spec, strict):
        if isinstance(record, str):
            _count(f"{label}.skipped.{record}")
        else:
            yield (number, position), record


def _first_of_id(grouped, sources, spec: CorpusSpec, strict: bool, label: str):
    """Of the records sharing an id, the first in reading order; the rest count as duplicates."""
    _, records = grouped
    first, *later = sorted(records, key=lambda record: record[0])
    for (number, position), _ in later:
        _count(f"{label}.skipped.{duplicate_id(sources[number], position, spec, strict)}")
    yield first[0][0], (first[0][1], first[1])


def _in_reading_order(grouped, counts: dict[int, int], max_docs: int | None, docs_per_block: int):
    """(block, (place in reading order, document)) for the documents of one source."""
    number, records = grouped
    start = sum(n for s, n in counts.items() if s < number)
    for rank, (_, document) in enumerate(sorted(records, key=lambda record: record[0])):
        place = start + rank
        if max_docs is None or place < max_docs:
            yield place // docs_per_block, (place, document)


class _BuildBlock(beam.DoFn):
    def __init__(self, config: SynthConfig, directory: Path, label: str):
        self.config, self.directory, self.label = config, directory, label

    def setup(self):
        self.tokenizer = load_tokenizer(self.config.tokenizer)
        self.embedder = load_embedder(self.config.embedder, self.config.embedding) \
            if self.config.mining.strategy.embeds else None
        self.mirror = Mirror.of(self.config.output)

    def process(self, grouped):
        number, placed = grouped
        documents: list[Document] = [document for _, document in sorted(placed, key=lambda p: p[0])]
        stats = BuildStats()
        block, marker = block_path(self.directory, number), embedding_name(self.embedder)
        if self.mirror.exists(block / marker):  # finished, here or at the URL: count it, fetch no vectors
            for path in counted_files(block, marker):
                self.mirror.pull(path)
            count_reused(block, marker, stats)
        else:
            build_block(block, documents, self.tokenizer, self.config.chunking, self.embedder, stats)
            self.mirror.push_dir(block, marker)
        _count(f"{self.label}.accepted", len(documents))
        for name in ("blocks_built", "blocks_reused", "chunks", "chunks_embedded", "chunks_over_window"):
            _count(f"{self.label}.{name}", getattr(stats, name))
        _count(f"{self.label}.chunk_ms", round(stats.chunk_seconds * 1000))
        _count(f"{self.label}.embed_ms", round(stats.embed_seconds * 1000))
        yield number


def _store_ref(numbers: list[int], directory: Path, name: str, dim: int) -> StoreRef:
    return StoreRef(tuple(block_path(directory, n) for n in sorted(numbers)), name, dim)


def _collection(pipeline, spec: CorpusSpec, label: str, config: SynthConfig, directory: Path, name: str,
                dim: int):
    """The chunk store of `spec` built in the pipeline: a PCollection of its one StoreRef."""
    sources = resolve_sources(spec)
    documents = (
        pipeline
        | f"{label}: sources" >> beam.Create(list(enumerate(sources)))
        | f"{label}: read" >> beam.FlatMap(_read_source, spec, config.strict, label)
        | f"{label}: key by id" >> beam.Map(lambda record: (record[1].id, record))
        | f"{label}: group by id" >> beam.GroupByKey()
        | f"{label}: first of each id" >> beam.FlatMap(_first_of_id, sources, spec, config.strict, label))
    per_source = documents | f"{label}: group by source" >> beam.GroupByKey()
    counts = per_source | f"{label}: count per source" >> beam.MapTuple(lambda source, docs: (source, len(docs)))
    return (
        per_source
        | f"{label}: place" >> beam.FlatMap(_in_reading_order, beam.pvalue.AsDict(counts),
                                            spec.max_docs, config.docs_per_block)
        | f"{label}: group by block" >> beam.GroupByKey()
        | f"{label}: chunk and embed" >> beam.ParDo(_BuildBlock(config, directory, label))
        | f"{label}: all blocks" >> beam.combiners.ToList()
        | f"{label}: store" >> beam.Map(_store_ref, directory, name, dim))


def _build_index(corpus: StoreRef, meta: StoreRef, config: SynthConfig, corpus_key: str,
                 fingerprint: str) -> str | None:
    """The index's directory; its recall@10 goes to the driver as a metric, in millionths."""
    if not corpus.blocks or not meta.blocks:
        return None  # nothing usable was read: the driver says so once the pipeline is done
    mirror = Mirror.of(config.output)
    for store in (corpus, meta):  # built from the corpus, measured with the meta-chunks
        mirror.pull_store(store.blocks, store.embedding_name)
    directory = index_dir(config, corpus_key, fingerprint)
    done = mirror.pull_dir(directory, META)
    index, _ = corpus_index(config, corpus_key, corpus, fingerprint)
    if not done:
        mirror.push_dir(directory, META)
    _count(RECALL_MICROS, round(index_recall(config, index, corpus, meta) * 1e6))
    return str(directory)


def _opened(store: StoreRef, mirror: Mirror):
    mirror.pull_store(store.blocks, store.embedding_name)
    return store.open()


def _near_duplicates(corpus: StoreRef, config: SynthConfig, corpus_key: str) -> str | None:
    if config.mining.corpus_dedup is None or not corpus.blocks:
        return None
    mirror = Mirror.of(config.output)
    found = near_duplicates(config, corpus_key, lambda: _opened(corpus, mirror), mirror)
    _count(NEAR_DUPLICATES, int(np.load(found).sum()))
    return str(found)


def _shard_inputs(index: str | None, meta: StoreRef, corpus: StoreRef, duplicates: str | None,
                  config: SynthConfig) -> ShardInputs | None:
    if not meta.blocks or not corpus.blocks:
        return None
    return ShardInputs(config, meta, corpus, Path(index) if index else None, Path(duplicates) if duplicates else None)


class _MakeShard(beam.DoFn):
    """One output shard (or the report of one a previous run finished); inputs opened once per worker."""

    def setup(self):
        self.inputs, self.opened = None, None

    def process(self, shard: int, inputs: ShardInputs | None):
        if inputs is None:
            return
        mirror = Mirror.of(inputs.config.output)
        report = finished_report(inputs.config, shard, mirror)
        if report is None:
            if self.inputs != inputs:
                inputs.pull(mirror)
                self.inputs, self.opened = inputs, OpenInputs.open(inputs)
            report = make_shard(self.opened, shard, progress=False)
            publish_shard(inputs.config, shard, mirror)
            _count("shards.written")
        _count("sequences", report.sequences)
        for role, tokens in report.tokens_by_role.items():
            _count(f"tokens.{role}", tokens)
        yield report


@contextmanager
def _user_errors():
    """A SynthError raised in a worker (a --strict violation, an unreadable file) reaches the driver
    wrapped in the runner's own error, traceback included: show it as the one line it is."""
    try:
        yield
    except USER_ERRORS:
        raise
    except Exception as error:
        found = re.search(r"(?:SynthError|TokenizerError): (.+)", str(error))
        if found is None:
            raise
        raise SynthError(found.group(1).strip()) from error


def _counters(result) -> dict[str, int]:
    result.wait_until_finish()
    found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    return {c.key.metric.name: c.committed if c.committed is not None else c.attempted for c in found}


def _collection_from(counters: dict[str, int], label: str, key: str, config: SynthConfig, name: str,
                     dim: int) -> Collection:
    """The collection the pipeline built, with the counts it reported."""
    accepted = counters.get(f"{label}.accepted", 0)
    blocks = -(-accepted // config.docs_per_block)
    ref = StoreRef(tuple(block_path(collection_dir(config, key), n) for n in range(blocks)), name, dim)
    read = ReadStats(accepted=accepted)
    prefix = f"{label}.skipped."
    read.skipped.update({k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)})
    build = BuildStats(**{f.name: counters.get(f"{label}.{f.name}", 0) for f in fields(BuildStats)
                          if not f.name.endswith("seconds")},
                       chunk_seconds=counters.get(f"{label}.chunk_ms", 0) / 1000,
                       embed_seconds=counters.get(f"{label}.embed_ms", 0) / 1000)
    return Collection(key, ref, read, build)


def pipeline_options(given: str) -> PipelineOptions:
    """DEFAULT_OPTIONS overridden by `given`; a bad option is a one-line SynthError, not Beam's usage text."""
    options = PipelineOptions(shlex.split(f"{DEFAULT_OPTIONS} {given}"))
    printed = io.StringIO()
    try:
        with redirect_stderr(printed):
            options.get_all_options()
    except SystemExit:
        problem = printed.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise SynthError(f"--beam-options: {problem}") from None
    return options


def _stages(pipeline, config: SynthConfig, keys: dict[str, str], name: str, dim: int, fingerprint: str | None):
    """The whole synthesis as transforms of `pipeline`: collections -> index -> shards."""
    specs = {"meta": config.meta, "corpus": config.corpus}
    refs = {label: _collection(pipeline, specs[label], label, config, collection_dir(config, key), name, dim)
            for label, key in keys.items()}
    corpus_ref, corpus_key = refs.get("corpus", refs["meta"]), keys.get("corpus", keys["meta"])
    if config.mining.strategy.searches_index:
        index_dir = corpus_ref | "index" >> beam.Map(_build_index, beam.pvalue.AsSingleton(refs["meta"]), config,
                                                     corpus_key, fingerprint)
    else:
        index_dir = pipeline | "no index" >> beam.Create([None])
    duplicates = corpus_ref | "corpus near-duplicates" >> beam.Map(_near_duplicates, config, corpus_key)
    inputs = (index_dir | "shard inputs" >> beam.Map(
        _shard_inputs, beam.pvalue.AsSingleton(refs["meta"]), beam.pvalue.AsSingleton(corpus_ref),
        beam.pvalue.AsSingleton(duplicates), config))
    _ = (pipeline
         | "shard numbers" >> beam.Create(range(config.output.num_shards))
         | "spread shards" >> beam.Reshuffle()
         | "make shards" >> beam.ParDo(_MakeShard(), beam.pvalue.AsSingleton(inputs)))


def run_beam(config: SynthConfig, beam_options: str = "") -> dict:
    """Run (or resume) a synthesis as a Beam pipeline; returns the summary also written to OUT."""
    started = time.perf_counter()
    options = pipeline_options(beam_options)
    mirror = Mirror.of(config.output)
    tokenizer = prepare(config, mirror)
    embedder = load_embedder(config.embedder, config.embedding) if config.mining.strategy.embeds else None
    name, dim = embedding_name(embedder), embedder.dim if embedder else 0
    specs = {"meta": config.meta} if config.corpus is None else {"meta": config.meta, "corpus": config.corpus}
    keys = {label: collection_key(spec, config, tokenizer) for label, spec in specs.items()}
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # per-stage chatter; failures still show
    pipeline = beam.Pipeline(options=options)
    _stages(pipeline, config, keys, name, dim, embedder.fingerprint if embedder else None)
    with _user_errors():
        counters = _counters(pipeline.run())

    collections = {label: _collection_from(counters, label, keys[label], config, name, dim) for label in specs}
    meta, corpus = collections["meta"], collections.get("corpus", collections["meta"])
    check_collections(meta, corpus)
    reports = [finished_report(config, shard, mirror) for shard in range(config.output.num_shards)]
    if any(report is None for report in reports):
        raise SynthError("the Beam pipeline finished without writing every shard; run it again to resume")
    figures = RunFigures(
        counters.get(RECALL_MICROS, 0) / 1e6 if config.mining.strategy.searches_index else None,
        counters.get(NEAR_DUPLICATES, 0) if config.mining.corpus_dedup is not None else None,
        embedder.window if embedder else None)
    summary = finish(config, tokenizer, meta, corpus, figures, reports, started)
    for name in (MANIFEST, SUMMARY):
        mirror.push(config.output.out / name)
    return summary
