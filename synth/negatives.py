"""Hard-negative mining (NExtLong step 3).

For a meta-chunk, candidates come from the ANN index (`nextlong`) or uniformly from the corpus
(`random-negatives`, the ablation); both pass through the same filters, in this order: never a
chunk of the meta-document's own source document, never a near-duplicate of the meta-chunk
(cosine above the threshold; real corpora are not deduplicated), never twice in one sample, never
more than `max_reuse` times (see `NegativeFilter.allowance`), so that "hub" chunks that are close
to everything do not dominate, and never a chunk whose text repeats any part of the meta-document
(`synth.overlap`: the same text under another id, shared boilerplate).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from synth.overlap import MetaOverlap

if TYPE_CHECKING:
    from synth.index import ChunkIndex

SIMILARITY_BINS = np.linspace(-1.0, 1.0, 41)


class CandidateSource(Protocol):
    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k], chunk ids [q, k]) for each query, best first; id -1 pads."""
        ...


@dataclass
class IndexCandidates:
    index: ChunkIndex

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, min(k, self.index.ntotal))


@dataclass
class RandomCandidates:
    embeddings: np.ndarray
    rng: np.random.Generator

    def candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.embeddings)
        k = min(k, n)
        ids = np.stack([self.rng.choice(n, size=k, replace=False) for _ in range(len(queries))])
        scores = np.einsum("qd,qkd->qk", queries, self.embeddings[ids])
        return scores.astype(np.float32), ids.astype(np.int64)


@dataclass
class MiningStats:
    """Filter decisions, and what was PLACED: a selected negative cut off at a sequence's end counts
    nowhere, neither here nor toward its reuse cap."""

    chosen: int = 0
    filtered: Counter = field(default_factory=Counter)
    short_of_k: int = 0  # meta-chunks for which fewer than k negatives survived the filters
    similarity_hist: np.ndarray = field(default_factory=lambda: np.zeros(40, np.int64))
    similarity_sum: float = 0.0

    def record(self, score: float) -> None:
        self.chosen += 1
        self.similarity_sum += score
        bin_index = int(np.searchsorted(SIMILARITY_BINS, score, side="right")) - 1
        self.similarity_hist[min(max(bin_index, 0), len(self.similarity_hist) - 1)] += 1


@dataclass(frozen=True)
class MetaDocument:
    """What a negative must not repeat: the corpus indexes of the meta-document's own source documents
    (several when short ones were merged; none that the corpus does not hold) and the shingles of all
    its text."""

    corpus_docs: frozenset[int]
    shingles: np.ndarray


@dataclass
class NegativeFilter:
    """The mining rules for one output shard of `num_shards`."""

    chunk_doc: np.ndarray  # corpus document index of every corpus chunk
    dedup_threshold: float
    max_reuse: int
    overlap: MetaOverlap
    shard: int = 0
    num_shards: int = 1
    reuse_scope: str = "run"
    duplicate_doc: np.ndarray | None = None  # bool per corpus document, from `synth.dedup`
    stats: MiningStats = field(default_factory=MiningStats)
    reuse: Counter = field(default_factory=Counter)

    def allowance(self, chunk: int) -> int:
        """Placements of `chunk` this shard may make. Over the run, max_reuse is split between the
        shards, the remainder going to shards chosen by the chunk id, so the shards sum to exactly
        max_reuse while each one stays independent (parallel, resumable, the same bytes)."""
        if self.reuse_scope == "shard":
            return self.max_reuse
        base, extra = divmod(self.max_reuse, self.num_shards)
        return base + ((chunk + self.shard) % self.num_shards < extra)

    def select(self, scores: np.ndarray, ids: np.ndarray, k: int, own: MetaDocument,
               in_sample: set[int]) -> list[tuple[int, float]]:
        """Up to k admissible (chunk, score) candidates, in candidate order; `place` the ones used."""
        chosen: list[tuple[int, float]] = []
        for score, chunk in zip(scores.tolist(), ids.tolist()):
            if len(chosen) == k:
                break
            reason = self._rejection(score, chunk, own, in_sample)
            if reason:
                self.stats.filtered[reason] += 1
                continue
            chosen.append((chunk, score))
            in_sample.add(chunk)
        return chosen

    def place(self, chunk: int, score: float) -> None:
        """Count a negative that made it into a sequence."""
        self.reuse[chunk] += 1
        self.stats.record(score)

    def _rejection(self, score: float, chunk: int, own: MetaDocument,
                   in_sample: set[int]) -> str | None:
        if chunk < 0:
            return "index_padding"
        if int(self.chunk_doc[chunk]) in own.corpus_docs:
            return "same_document"
        if self.duplicate_doc is not None and self.duplicate_doc[self.chunk_doc[chunk]]:
            return "corpus_near_duplicate"
        if score > self.dedup_threshold:
            return "near_duplicate"
        if chunk in in_sample:
            return "already_in_sample"
        if self.reuse[chunk] >= self.allowance(chunk):
            return "reuse_cap"
        if self.overlap.repeats(chunk, own.shingles):  # last: the only check that reads text
            return "repeats_meta_document"
        return None


def mine(source: CandidateSource, rules: NegativeFilter, query: np.ndarray, k: int,
         first_pass: tuple[np.ndarray, np.ndarray], own: MetaDocument,
         in_sample: set[int], corpus_size: int) -> list[tuple[int, float]]:
    """k (chunk, score) negatives for one meta-chunk; searches deeper only when the filters exhaust
    the first pass.

    `first_pass` is the batched search result for this query; widening re-searches this one
    query with four times the depth, up to the whole corpus.
    """
    scores, ids = first_pass
    chosen = rules.select(scores, ids, k, own, in_sample)
    judged = set(ids.tolist())
    depth = len(ids)
    while len(chosen) < k and depth < corpus_size:
        depth = min(corpus_size, max(depth, 1) * 4)
        scores, ids = source.candidates(query[None, :], depth)
        # Candidates judged in a shallower pass are skipped, not counted twice.
        fresh = np.fromiter((i not in judged for i in ids[0].tolist()), bool, len(ids[0]))
        judged.update(ids[0].tolist())
        chosen += rules.select(scores[0][fresh], ids[0][fresh], k - len(chosen), own, in_sample)
    if len(chosen) < k:
        rules.stats.short_of_k += 1
    return chosen
