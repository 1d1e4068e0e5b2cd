"""Long-document assembly (NExtLong step 4) and the ablation layouts.

A training sequence is exactly `seq_len` tokens made of segments. In `nextlong` and
`random-negatives` a segment is one extended meta-document
`[bos, m_1, n_11..n_1k, m_2, n_21..n_2k, ...]` (meta-chunk first); when one meta-document is
shorter than the target, further extended meta-documents follow as new segments (document
masking keeps them apart), and the segment that overflows is cut at the last token that fits.
The `*-concat` baselines fill each sequence with whole meta-documents in one segment, in the order
`synth.baselines` gives. `--meta-position tail|random` moves each meta-chunk within its group
of negatives (the paper's position ablation).

Loss convention: `loss_weights[t]` weighs the prediction of `input_ids[t]` from the tokens before
it; the first token of every segment gets weight 0 (`nextlong_jax.schema.segment_starts`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from nextlong_jax.schema import ROLE_META, ROLE_NAMES, ROLE_NEGATIVE, segment_starts
from synth.negatives import CandidateSource, MetaDocument, NegativeFilter, mine

if TYPE_CHECKING:
    from synth.config import MiningConfig
    from synth.store import ChunkStore


@dataclass
class Sequence:
    input_ids: np.ndarray
    loss_weights: np.ndarray
    token_roles: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    meta_doc_ids: list[str]
    negative_chunk_ids: list[str]


@dataclass
class PackStats:
    sequences: int = 0
    tokens_by_role: Counter = field(default_factory=Counter)
    segments: int = 0
    truncated_tokens: int = 0  # tokens of the piece cut where a sequence ends
    documents_used: int = 0


class Packer:
    """Appends tokens to the current sequence; a finished sequence is handed out by `take`.

    With `doc_len`, a segment (one extended document) holds at most that many tokens, so several
    fixed-length documents pack one sequence (64K documents 8 to a 512K sequence, say).
    """

    def __init__(self, seq_len: int, negative_weight: float, bos_id: int | None, pad_id: int,
                 doc_len: int | None = None):
        self.seq_len, self.bos_id, self.pad_id = seq_len, bos_id, pad_id
        self.doc_len = doc_len or seq_len
        self.weight = {ROLE_META: 1.0, ROLE_NEGATIVE: negative_weight}
        self.stats = PackStats()
        self._reset()

    def _reset(self) -> None:
        self.ids = np.full(self.seq_len, self.pad_id, np.int64)
        self.weights = np.zeros(self.seq_len, np.float32)
        self.roles = np.zeros(self.seq_len, np.int64)
        self.segments = np.zeros(self.seq_len, np.int64)
        self.positions = np.zeros(self.seq_len, np.int64)
        self.fill = 0
        self.segment = 0
        self.segment_start = 0
        self.meta_doc_ids: list[str] = []
        self.negative_chunk_ids: list[str] = []
        self.negatives_in_sample: set[int] = set()  # no hard negative twice in one sequence

    @property
    def remaining(self) -> int:
        """Tokens left in the sequence."""
        return self.seq_len - self.fill

    @property
    def room(self) -> int:
        """Tokens left in the current segment."""
        return min(self.remaining, self.segment_start + self.doc_len - self.fill)

    @property
    def next_segment_room(self) -> int:
        return min(self.remaining, self.doc_len)

    @property
    def segment_full(self) -> bool:
        return self.room == 0

    @property
    def full(self) -> bool:
        return self.fill == self.seq_len

    def begin_segment(self, meta_doc_id: str | None = None) -> None:
        self.segment += 1
        self.segment_start = self.fill
        self.stats.segments += 1
        if meta_doc_id is not None:
            self.meta_doc_ids.append(meta_doc_id)
        self.add_bos()

    def add_bos(self) -> None:
        """A document separator: part of the input, never a prediction target."""
        if self.bos_id is not None and self.room:
            self.add(np.asarray([self.bos_id]), ROLE_META)
            self.weights[self.fill - 1] = 0.0

    def add(self, tokens: np.ndarray, role: int, chunk_id: str | None = None) -> int:
        """Append what fits of `tokens`; returns how many tokens were cut off."""
        take = min(len(tokens), self.room)
        span = slice(self.fill, self.fill + take)
        self.ids[span] = tokens[:take]
        self.weights[span] = self.weight[role]
        self.roles[span] = role
        self.segments[span] = self.segment
        self.positions[span] = np.arange(self.fill - self.segment_start,
                                         self.fill - self.segment_start + take)
        if chunk_id is not None and take:
            self.negative_chunk_ids.append(chunk_id)
        self.fill += take
        cut = len(tokens) - take
        self.stats.truncated_tokens += cut
        return cut

    def take(self) -> Sequence:
        """The current sequence, padded to `seq_len`; starts a new one."""
        self.weights[segment_starts(self.segments)] = 0.0  # the contract's rule
        sequence = Sequence(self.ids, self.weights, self.roles, self.segments, self.positions,
                            self.meta_doc_ids, self.negative_chunk_ids)
        roles, counts = np.unique(self.roles, return_counts=True)
        for role, count in zip(roles.tolist(), counts.tolist()):
            self.stats.tokens_by_role[ROLE_NAMES[role]] += count
        self.stats.sequences += 1
        self._reset()
        return sequence


def choose_k(remaining: int, meta_tokens: int, meta_chunks: int, mean_negative: float,
             fixed_k: int | None, max_k: int, headroom: float) -> int:
    """Negatives per meta-chunk: the paper's k = (T*E*w - S) / (p*s), counted here in tokens.

    T*E is the room left in the sequence (`remaining` tokens), w the headroom, S the meta-document's
    tokens, p its chunks and s the mean negative length. With w > 1 the extended document overruns
    the room and is cut at the sequence's end, so one meta-document spans the whole sequence unless
    `max_k` stops it short.
    """
    if fixed_k is not None:
        return fixed_k
    k = (remaining * headroom - meta_tokens) // max(1.0, meta_chunks * mean_negative)
    return int(np.clip(k, 1, max_k))


@dataclass(frozen=True)
class Extension:
    """What extending meta-documents needs, the same for every shard."""

    meta: ChunkStore
    corpus: ChunkStore
    corpus_chunk_doc: np.ndarray
    corpus_doc_index: dict[str, int]
    corpus_duplicates: np.ndarray  # bool per corpus document: a near-duplicate of an earlier one
    fixed_k: int | None
    max_k: int
    headroom: float
    min_segment: int
    meta_position: str
    seed: int
    mean_negative: float
    prefetch_docs: int = 64

    @classmethod
    def build(cls, meta: ChunkStore, corpus: ChunkStore, mining: MiningConfig, seq_len: int,
              duplicates: np.ndarray | None) -> "Extension":
        """`duplicates`: the corpus's near-duplicate documents (`dedup`), None where that is off."""
        lengths = corpus.chunk_lengths()
        mean_negative = float(lengths.mean()) if len(lengths) else 1.0
        # Unless capped, k may grow to what fills the whole target from one meta-chunk.
        max_k = mining.max_k
        if max_k is None:
            max_k = max(1, math.ceil(seq_len * mining.headroom / mean_negative))
        if duplicates is None:
            duplicates = np.zeros(corpus.num_docs, bool)
        return cls(meta=meta, corpus=corpus, corpus_chunk_doc=corpus.chunk_doc(), corpus_duplicates=duplicates,
                   corpus_doc_index={doc_id: i for i, doc_id in enumerate(corpus.doc_ids)},
                   fixed_k=mining.k, max_k=max_k, headroom=mining.headroom,
                   min_segment=mining.min_segment_tokens, meta_position=mining.meta_position, seed=mining.seed,
                   mean_negative=mean_negative)


def _search_depth(ctx: Extension) -> int:
    k_cap = ctx.fixed_k if ctx.fixed_k is not None else ctx.max_k
    return min(ctx.corpus.num_chunks, 2 * k_cap + 32)


def _prefetched(ctx: Extension, source: CandidateSource,
                docs: list[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(doc, scores, ids) per meta-document, searching the meta-chunks of many docs at once."""
    depth = _search_depth(ctx)
    for start in range(0, len(docs), ctx.prefetch_docs):
        batch = docs[start:start + ctx.prefetch_docs]
        rows = np.concatenate([np.arange(ctx.meta.doc_chunks(d).start, ctx.meta.doc_chunks(d).stop)
                               for d in batch])
        if depth > 0 and len(rows):
            scores, ids = source.candidates(ctx.meta.embeddings[rows], depth)
        else:
            scores = np.zeros((len(rows), 0), np.float32)
            ids = np.zeros((len(rows), 0), np.int64)
        offset = 0
        for d in batch:
            n = len(ctx.meta.doc_chunks(d))
            yield d, scores[offset:offset + n], ids[offset:offset + n]
            offset += n


def extended_sequences(ctx: Extension, source: CandidateSource, rules: NegativeFilter,
                       docs: list[int], packer: Packer,
                       max_sequences: int | None) -> Iterator[Sequence]:
    """Sequences of extended meta-documents (`docs` are meta-store document indexes, in order)."""
    for doc, scores, ids in _prefetched(ctx, source, docs):
        if max_sequences is not None and packer.stats.sequences >= max_sequences:
            return
        chunks = ctx.meta.doc_chunks(doc)
        if not len(chunks):
            continue
        if packer.fill and packer.remaining < min(ctx.min_segment, packer.doc_len):
            # Too little room for a dependency across negatives: pad rather than start a fragment.
            yield packer.take()
            if max_sequences is not None and packer.stats.sequences >= max_sequences:
                return
        meta_tokens = [ctx.meta.tokens(c) for c in chunks]
        doc_id = ctx.meta.doc_ids[doc]
        own = MetaDocument(ctx.corpus_doc_index.get(doc_id), rules.overlap.document(meta_tokens))
        k = choose_k(packer.next_segment_room - 1, sum(len(t) for t in meta_tokens), len(chunks),
                     ctx.mean_negative, ctx.fixed_k, ctx.max_k, ctx.headroom)
        packer.begin_segment(doc_id)
        packer.stats.documents_used += 1
        for i, (chunk, tokens) in enumerate(zip(chunks, meta_tokens)):
            if ctx.meta_position == "head":  # placed before mining: a full segment then needs none
                packer.add(tokens, ROLE_META)
                if packer.segment_full:
                    break
            negatives = mine(source, rules, ctx.meta.embeddings[chunk], k, (scores[i], ids[i]), own,
                             packer.negatives_in_sample, ctx.corpus.num_chunks)
            group: list[tuple[int, float] | None] = list(negatives)
            if ctx.meta_position != "head":
                group.insert(_meta_slot(ctx, len(group), doc, i), None)  # None: the meta-chunk itself
            for piece in group:
                if packer.segment_full:
                    break
                if piece is None:
                    packer.add(tokens, ROLE_META)
                    continue
                negative, score = piece
                rules.place(negative, score)
                chunk_id = ctx.corpus.chunk_id(negative, ctx.corpus_chunk_doc)
                packer.add(ctx.corpus.tokens(negative), ROLE_NEGATIVE, chunk_id)
            if packer.segment_full:
                break
        if packer.full:
            yield packer.take()
    if packer.fill and (max_sequences is None or packer.stats.sequences < max_sequences):
        yield packer.take()


def _meta_slot(ctx: Extension, negatives: int, doc: int, chunk: int) -> int:
    """Where meta-chunk `chunk` of `doc` goes among its negatives when not first: last, or at a place
    drawn from (seed, doc, chunk), so any shard split draws the same."""
    if ctx.meta_position == "tail":
        return negatives
    return int(np.random.default_rng([ctx.seed, doc, chunk]).integers(negatives + 1))


def concatenated_sequences(corpus: ChunkStore, docs: list[int], packer: Packer,
                           max_sequences: int | None) -> Iterator[Sequence]:
    """Whole documents of `corpus` in the order of `docs`, back to back, one segment per sequence."""
    for doc in docs:
        if max_sequences is not None and packer.stats.sequences >= max_sequences:
            return
        if packer.fill == 0:
            packer.begin_segment()
        else:
            packer.add_bos()
        packer.meta_doc_ids.append(corpus.doc_ids[doc])
        packer.stats.documents_used += 1
        for chunk in corpus.doc_chunks(doc):
            packer.add(corpus.tokens(chunk), ROLE_META)
            if packer.full:
                yield packer.take()
                break
    if packer.fill and (max_sequences is None or packer.stats.sequences < max_sequences):
        yield packer.take()
