"""Long-document assembly (NExtLong step 4) and the ablation layouts.

A training sequence is exactly `seq_len` tokens made of segments. In `nextlong` and
`random-negatives` a segment is one extended meta-document
`[bos, m_1, n_11..n_1k, m_2, n_21..n_2k, ...]` (meta-chunk first); when one meta-document is
shorter than the target, further extended meta-documents follow as new segments (document
masking keeps them apart), and the segment that overflows is cut at the last token that fits.
The `*-concat` baselines fill each sequence with whole meta-documents in one segment, BOS between
them, in the order `synth.baselines` gives. `--meta-position tail|random` moves each meta-chunk
within its group of negatives (the paper's position ablation).

Only meta-documents of at least `min_meta_chunks` chunks are extended (`synth.meta_groups`): one
chunk followed by negatives has no dependency to bridge. Between two texts that do not continue
each other (a chunk and one from another document) goes a `Joiner`, so that no word runs across
documents. Every meta token is accounted for: placed, or dropped where a segment is cut
(`PackStats`).

Loss convention: `loss_weights[t]` weighs the prediction of `input_ids[t]` from the tokens before
it; the first token of every segment gets weight 0 (`nextlong_jax.schema.segment_starts`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from nextlong_jax.schema import ROLE_META, ROLE_NAMES, ROLE_NEGATIVE, segment_starts
from synth.meta_groups import MetaGroups, meta_groups
from synth.negatives import CandidateSource, MetaDocument, NegativeFilter, mine

if TYPE_CHECKING:
    from synth.config import MiningConfig
    from synth.store import ChunkStore
    from synth.tokenizer import TextTokenizer


@dataclass
class Sequence:
    input_ids: np.ndarray
    loss_weights: np.ndarray
    token_roles: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    meta_doc_ids: list[str]
    negative_chunk_ids: list[str]
    piece_starts: list[int]  # where each placed chunk starts, its joiner included
    negative_scores: list[float]  # parallel to negative_chunk_ids


@dataclass
class PackStats:
    sequences: int = 0
    tokens_by_role: Counter = field(default_factory=Counter)
    segments: int = 0
    truncated_tokens: int = 0  # tokens of the chunk cut where a segment ends
    documents_used: int = 0
    joiner_tokens: Counter = field(default_factory=Counter)  # by the role of the text they precede
    # Of the used meta-documents' chunk tokens: offered = placed + dropped (cut off, or in meta-chunks
    # after the cut that never appear).
    meta_tokens_offered: int = 0
    meta_tokens_placed: int = 0
    meta_chunks_dropped: int = 0
    meta_documents_skipped: int = 0  # below min_meta_chunks (`synth.meta_groups`)


@dataclass(frozen=True)
class Piece:
    """Where a chunk comes from: enough to tell whether it continues the text placed before it."""

    store: str  # "meta" or "corpus"
    doc: int
    chunk: int  # index in its store

    def continues(self, previous: "Piece | None") -> bool:
        return previous is not None and (previous.store, previous.doc, previous.chunk + 1) == (
            self.store, self.doc, self.chunk)


@dataclass(frozen=True)
class Joiner:
    """Tokens between two texts that do not continue each other, unless the first ends in whitespace.
    Without them a word runs across documents ("...ignored.bug-for-bug")."""

    tokens: np.ndarray
    ends_in_space: Callable[[int], bool]  # of a token id

    @classmethod
    def build(cls, kind: str, tokenizer: "TextTokenizer") -> "Joiner | None":
        if kind == "none":
            return None

        @lru_cache(maxsize=None)
        def ends_in_space(token: int) -> bool:
            return tokenizer.decode([token])[-1:].isspace()

        return cls(np.asarray(tokenizer.encode("\n"), np.int64), ends_in_space)


class Packer:
    """Appends tokens to the current sequence; a finished sequence is handed out by `take`.

    A segment (one extended document) holds at most `doc_len` tokens: `seq_len` for documents packed
    back to back, less for several fixed-length documents in one (64K documents 8 to a 512K sequence,
    say). Such documents each start a slot of `doc_len` tokens (a short one leaves padding): no document
    crosses a slot boundary, so a trainer may cut each row into its slots and attend within them
    (`document_len` in the manifest, `nextlong_jax.data`).
    """

    def __init__(self, seq_len: int, negative_weight: float, bos_id: int | None, pad_id: int,
                 doc_len: int, joiner: Joiner | None = None):
        self.seq_len, self.doc_len, self.bos_id, self.pad_id, self.joiner = seq_len, doc_len, bos_id, pad_id, joiner
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
        self.last: Piece | None = None  # the chunk placed last in the current segment
        self.meta_doc_ids: list[str] = []
        self.negative_chunk_ids: list[str] = []
        self.piece_starts: list[int] = []
        self.negative_scores: list[float] = []
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
    def _next_start(self) -> int:
        """Where the next segment starts: right after this one, or with slots, the next slot boundary."""
        if self.doc_len == self.seq_len:
            return self.fill
        return -(-self.fill // self.doc_len) * self.doc_len

    @property
    def next_segment_room(self) -> int:
        return min(self.seq_len - self._next_start, self.doc_len)

    @property
    def segment_full(self) -> bool:
        return self.room == 0

    @property
    def full(self) -> bool:
        return self.fill == self.seq_len

    def begin_segment(self, meta_doc_ids: tuple[str, ...] = ()) -> None:
        self.fill = self._next_start  # what it skips stays padding
        self.segment += 1
        self.segment_start = self.fill
        self.last = None
        self.stats.segments += 1
        self.meta_doc_ids.extend(meta_doc_ids)
        self.add_bos()

    def add_bos(self) -> None:
        """A document separator: part of the input, never a prediction target."""
        self.last = None
        if self.bos_id is not None and self.room:
            self._write(np.asarray([self.bos_id]), ROLE_META)
            self.weights[self.fill - 1] = 0.0

    def add(self, tokens: np.ndarray, role: int, piece: Piece, negative: tuple[str, float] | None = None) -> int:
        """Append what fits of chunk `tokens`, after the joiner it needs; returns how many were cut off.
        `negative`: a negative's chunk id and cosine to its meta-chunk, recorded if any of it is placed."""
        start = self.fill
        joiner = self._joiner_before(piece)
        self.last = piece
        take = self._write(np.concatenate([joiner, tokens]) if len(joiner) else tokens, role)
        placed = max(0, take - len(joiner))
        self.stats.joiner_tokens[ROLE_NAMES[role]] += take - placed
        if role == ROLE_META:
            self.stats.meta_tokens_placed += placed
        if placed:  # a joiner alone, its chunk cut off, is no piece: the provenance lists stay parallel
            self.piece_starts.append(start)
            if negative is not None:
                self.negative_chunk_ids.append(negative[0])
                self.negative_scores.append(negative[1])
        cut = len(tokens) - placed
        self.stats.truncated_tokens += cut
        return cut

    def _joiner_before(self, piece: Piece) -> np.ndarray:
        if (self.joiner is None or self.last is None or piece.continues(self.last)
                or self.joiner.ends_in_space(int(self.ids[self.fill - 1]))):
            return np.zeros(0, np.int64)
        return self.joiner.tokens

    def _write(self, tokens: np.ndarray, role: int) -> int:
        """Append what fits of `tokens` to the current segment; returns how many were written."""
        take = min(len(tokens), self.room)
        span = slice(self.fill, self.fill + take)
        self.ids[span] = tokens[:take]
        self.weights[span] = self.weight[role]
        self.roles[span] = role
        self.segments[span] = self.segment
        self.positions[span] = np.arange(self.fill - self.segment_start,
                                         self.fill - self.segment_start + take)
        self.fill += take
        return take

    def take(self) -> Sequence:
        """The current sequence, padded to `seq_len`; starts a new one."""
        self.weights[segment_starts(self.segments)] = 0.0  # the contract's rule
        sequence = Sequence(self.ids, self.weights, self.roles, self.segments, self.positions,
                            self.meta_doc_ids, self.negative_chunk_ids, self.piece_starts, self.negative_scores)
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
    groups: MetaGroups  # the meta-documents extended, as groups of meta-store documents
    prefetch_docs: int = 64

    @classmethod
    def build(cls, meta: ChunkStore, corpus: ChunkStore, mining: MiningConfig, doc_len: int,
              duplicates: np.ndarray | None) -> "Extension":
        """`doc_len`: tokens per extended document (`OutputConfig.document_len`); `duplicates`: the
        corpus's near-duplicate documents (`dedup`), None where that is off."""
        lengths = corpus.chunk_lengths()
        mean_negative = float(lengths.mean()) if len(lengths) else 1.0
        # Unless capped, k may grow to what fills the whole target from one meta-chunk.
        max_k = mining.max_k
        if max_k is None:
            max_k = max(1, math.ceil(doc_len * mining.headroom / mean_negative))
        if duplicates is None:
            duplicates = np.zeros(corpus.num_docs, bool)
        return cls(meta=meta, corpus=corpus, corpus_chunk_doc=corpus.chunk_doc(), corpus_duplicates=duplicates,
                   corpus_doc_index={doc_id: i for i, doc_id in enumerate(corpus.doc_ids)},
                   fixed_k=mining.k, max_k=max_k, headroom=mining.headroom,
                   min_segment=mining.min_segment_tokens, meta_position=mining.meta_position, seed=mining.seed,
                   mean_negative=mean_negative,
                   groups=meta_groups(meta, mining.min_meta_chunks, merge=mining.short_meta == "merge"))


def _search_depth(ctx: Extension) -> int:
    k_cap = ctx.fixed_k if ctx.fixed_k is not None else ctx.max_k
    return min(ctx.corpus.num_chunks, 2 * k_cap + 32)


def _group_chunks(ctx: Extension, group: tuple[int, ...]) -> list[tuple[int, int]]:
    """(meta-store document, chunk) of every chunk of a group, in order."""
    return [(doc, chunk) for doc in group for chunk in ctx.meta.doc_chunks(doc)]


def _prefetched(ctx: Extension, source: CandidateSource,
                groups: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """(group, scores, ids) per meta-document group, searching the meta-chunks of many at once."""
    depth = _search_depth(ctx)
    for start in range(0, len(groups), ctx.prefetch_docs):
        batch = groups[start:start + ctx.prefetch_docs]
        rows = np.asarray([chunk for group in batch for _, chunk in _group_chunks(ctx, group)], np.int64)
        if depth > 0 and len(rows):
            scores, ids = source.candidates(ctx.meta.embeddings[rows], depth)
        else:
            scores = np.zeros((len(rows), 0), np.float32)
            ids = np.zeros((len(rows), 0), np.int64)
        offset = 0
        for group in batch:
            n = len(_group_chunks(ctx, group))
            yield group, scores[offset:offset + n], ids[offset:offset + n]
            offset += n


def extended_sequences(ctx: Extension, source: CandidateSource, rules: NegativeFilter,
                       groups: list[tuple[int, ...]], packer: Packer,
                       max_sequences: int | None) -> Iterator[Sequence]:
    """Sequences of extended meta-documents (`groups` of meta-store documents, each extended as one)."""
    for group, scores, ids in _prefetched(ctx, source, groups):
        if max_sequences is not None and packer.stats.sequences >= max_sequences:
            return
        if packer.fill and packer.next_segment_room < min(ctx.min_segment, packer.doc_len):
            # Too little room for a dependency across negatives: pad rather than start a fragment.
            yield packer.take()
            if max_sequences is not None and packer.stats.sequences >= max_sequences:
                return
        chunks = _group_chunks(ctx, group)
        meta_tokens = [ctx.meta.tokens(chunk) for _, chunk in chunks]
        doc_ids = tuple(ctx.meta.doc_ids[doc] for doc in group)
        own = MetaDocument(frozenset(i for d in doc_ids if (i := ctx.corpus_doc_index.get(d)) is not None),
                           rules.overlap.document(meta_tokens))
        k = choose_k(packer.next_segment_room - 1, sum(len(t) for t in meta_tokens), len(chunks),
                     ctx.mean_negative, ctx.fixed_k, ctx.max_k, ctx.headroom)
        packer.begin_segment(doc_ids)
        packer.stats.documents_used += len(group)
        packer.stats.meta_tokens_offered += sum(len(t) for t in meta_tokens)
        started = 0  # meta-chunks handed to the packer; the rest never appear
        for i, ((doc, chunk), tokens) in enumerate(zip(chunks, meta_tokens)):
            meta = Piece("meta", doc, chunk)
            if ctx.meta_position == "head":  # placed before mining: a full segment then needs none
                packer.add(tokens, ROLE_META, meta)
                started += 1
                if packer.segment_full:
                    break
            negatives = mine(source, rules, ctx.meta.embeddings[chunk], k, (scores[i], ids[i]), own,
                             packer.negatives_in_sample, ctx.corpus.num_chunks)
            group_pieces: list[tuple[int, float] | None] = list(negatives)
            if ctx.meta_position != "head":
                group_pieces.insert(_meta_slot(ctx, len(group_pieces), doc, i), None)  # None: the meta-chunk
            for piece in group_pieces:
                if packer.segment_full:
                    break
                if piece is None:
                    packer.add(tokens, ROLE_META, meta)
                    started += 1
                    continue
                negative, score = piece
                tokens = ctx.corpus.tokens(negative)
                origin = Piece("corpus", int(ctx.corpus_chunk_doc[negative]), negative)
                chunk_id = ctx.corpus.chunk_id(negative, ctx.corpus_chunk_doc)
                cut = packer.add(tokens, ROLE_NEGATIVE, origin, (chunk_id, score))
                if cut < len(tokens):  # placed, if only in part: a joiner alone places nothing
                    rules.place(negative, score)
            if packer.segment_full:
                break
        packer.stats.meta_chunks_dropped += len(chunks) - started
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
    """Whole documents of `corpus` in the order of `docs`, back to back, one segment per sequence,
    BOS between documents; the document that overruns a sequence is cut at its end."""
    for doc in docs:
        if max_sequences is not None and packer.stats.sequences >= max_sequences:
            return
        if packer.fill == 0:
            packer.begin_segment()
        else:
            packer.add_bos()
        packer.meta_doc_ids.append(corpus.doc_ids[doc])
        packer.stats.documents_used += 1
        chunks = corpus.doc_chunks(doc)
        packer.stats.meta_tokens_offered += sum(len(corpus.tokens(c)) for c in chunks)
        for placed, chunk in enumerate(chunks, start=1):
            packer.add(corpus.tokens(chunk), ROLE_META, Piece("meta", doc, chunk))
            if packer.full:
                packer.stats.meta_chunks_dropped += len(chunks) - placed
                yield packer.take()
                break
    if packer.fill and (max_sequences is None or packer.stats.sequences < max_sequences):
        yield packer.take()
