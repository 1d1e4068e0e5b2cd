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
from typing import TYPE_CHECKING, Iterator, Protocol

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
    short_of_k: int = 0  # meta-chunks whose quota the admissible candidates of the whole corpus fell short of
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

    def admissible(self, scores: np.ndarray, ids: np.ndarray, own: MetaDocument,
                   in_sample: set[int]) -> Iterator[tuple[int, float]]:
        """The (chunk, score) candidates that pass every rule, in candidate order, judged as they are
        drawn (so a chunk taken meanwhile counts as in the sample); rejections are counted."""
        for score, chunk in zip(scores.tolist(), ids.tolist()):
            reason = self._rejection(score, chunk, own, in_sample)
            if reason:
                self.stats.filtered[reason] += 1
                continue
            yield chunk, score

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


@dataclass(frozen=True)
class Quota:
    """How many negatives one meta-chunk takes: a prefix of its admissible candidates in rank order,
    at most `count` of them and, given `tokens`, only as many as fit in that many tokens by the corpus
    chunk lengths `lengths`, though the first is taken however long (an automatic k is at least 1)."""

    count: int | None = None
    tokens: int | None = None
    lengths: np.ndarray | None = None  # tokens per corpus chunk; needed with `tokens`

    def __post_init__(self) -> None:
        if self.tokens is not None and self.lengths is None:
            raise ValueError("a quota in tokens needs the corpus chunk lengths")

    def met(self, taken: int, used: int) -> bool:
        return taken == self.count or (self.tokens is not None and used >= self.tokens)

    def length(self, chunk: int) -> int:
        """What `chunk` counts against the quota: its tokens, where the quota is in tokens."""
        return 0 if self.tokens is None else int(self.lengths[chunk])

    def fits(self, taken: int, used: int, chunk: int) -> bool:
        # The first candidate that does not fit ends the prefix: passing over it for a shorter one
        # would trade hardness for length.
        return self.tokens is None or taken == 0 or used + self.length(chunk) <= self.tokens


def mine(source: CandidateSource, rules: NegativeFilter, query: np.ndarray, quota: Quota,
         first_pass: tuple[np.ndarray, np.ndarray], own: MetaDocument,
         in_sample: set[int], corpus_size: int) -> list[tuple[int, float]]:
    """The (chunk, score) negatives of one meta-chunk, as many as `quota` takes; each is added to
    `in_sample`. Searches deeper only when the filters exhaust the first pass."""
    chosen: list[tuple[int, float]] = []
    used = 0
    candidates = _admissible(source, rules, query, first_pass, own, in_sample, corpus_size)
    while not quota.met(len(chosen), used):
        candidate = next(candidates, None)
        if candidate is None:
            rules.stats.short_of_k += 1
            break
        chunk, _ = candidate
        if not quota.fits(len(chosen), used, chunk):
            break
        chosen.append(candidate)
        in_sample.add(chunk)
        used += quota.length(chunk)
    return chosen


def _admissible(source: CandidateSource, rules: NegativeFilter, query: np.ndarray,
                first_pass: tuple[np.ndarray, np.ndarray], own: MetaDocument, in_sample: set[int],
                corpus_size: int) -> Iterator[tuple[int, float]]:
    """Admissible candidates of `first_pass` (the batched search result for this query), then, drawn
    only once those run out, of searches of this one query four times deeper each, up to the whole
    corpus."""
    scores, ids = first_pass
    yield from rules.admissible(scores, ids, own, in_sample)
    judged = set(ids.tolist())
    depth = len(ids)
    while depth < corpus_size:
        depth = min(corpus_size, max(depth, 1) * 4)
        scores, ids = source.candidates(query[None, :], depth)
        # Candidates judged in a shallower pass are skipped, not counted twice.
        fresh = np.fromiter((i not in judged for i in ids[0].tolist()), bool, len(ids[0]))
        judged.update(ids[0].tolist())
        yield from rules.admissible(scores[0][fresh], ids[0][fresh], own, in_sample)
