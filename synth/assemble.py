"""Long-document assembly (NExtLong step 4) and the ablation layouts.

A training sequence is exactly `seq_len` tokens made of segments. In `nextlong` and
`random-negatives` a segment is one extended meta-document
`[bos, m_1, n_11..n_1k, m_2, n_21..n_2k, ...]` (meta-chunk first); when one meta-document is
shorter than the target, further extended meta-documents follow as new segments (document
masking keeps them apart), and the segment that overflows is cut at the last token that fits.
The negatives after each meta-chunk are budgeted in tokens (`negative_quota`), and those before the
second meta-chunk never push it out of its segment: every extended document that has room for two
meta-chunks holds two, a dependency across negatives. The `*-concat` baselines pack meta-documents
back to back, one segment per sequence, BOS between them, in the order `synth.baselines` gives; a
document that crosses a sequence's end goes on in the next one (standard packing, the paper's
"Standard"). `--meta-position tail|random` moves each meta-chunk within its group of negatives (the
paper's position ablation).

Only meta-documents of at least `min_meta_chunks` chunks are extended (`synth.meta_groups`): one
chunk followed by negatives has no dependency to bridge. Between two texts that do not continue
each other (a chunk and one from another document) goes a `Joiner`, so that no word runs across
documents. Every meta token is accounted for: placed, or dropped where a segment is cut
(`PackStats`).

Loss convention: `loss_weights[t]` weighs the prediction of `input_ids[t]` from the tokens before
it; the first token of every segment gets weight 0 (`nextlong_contract.schema.segment_starts`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from nextlong_contract.schema import ROLE_META, ROLE_NAMES, ROLE_NEGATIVE, segment_starts
from synth.meta_groups import MetaGroups, meta_groups
from synth.negatives import CandidateSource, MetaDocument, NegativeFilter, Quota, mine

if TYPE_CHECKING:
    from synth.config import MiningConfig
    from synth.store import ChunkStore
    from nextlong_contract.tokenizer import TextTokenizer


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
    truncated_tokens: int = 0  # tokens of the chunk cut where a segment ends, and lost
    documents_used: int = 0
    joiner_tokens: Counter = field(default_factory=Counter)  # by the role of the text they precede
    # Of the used meta-documents' chunk tokens: offered = placed + dropped (cut off, or in meta-chunks
    # after the cut that never appear).
    meta_tokens_offered: int = 0
    meta_tokens_placed: int = 0
    meta_chunks_dropped: int = 0
    meta_documents_skipped: int = 0  # below min_meta_chunks (`synth.meta_groups`)
    # Extended documents with fewer than two meta-chunks placed, nothing to bridge: one-chunk
    # meta-documents (--min-meta-chunks 1) and segments without room for the first two whole (`_extend`).
    single_meta_chunk_segments: int = 0


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

    @property
    def joiner_len(self) -> int:
        """Tokens a joiner takes where one is needed."""
        return 0 if self.joiner is None else len(self.joiner.tokens)

    def begin_segment(self, meta_doc_ids: tuple[str, ...] = (), bos: bool = True) -> None:
        """`bos=False`: the segment goes on with a document begun in the previous sequence."""
        self.fill = self._next_start  # what it skips stays padding
        self.segment += 1
        self.segment_start = self.fill
        self.last = None
        self.stats.segments += 1
        self.meta_doc_ids.extend(meta_doc_ids)
        if bos:
            self.add_bos()

    def add_bos(self) -> None:
        """A document separator: part of the input, never a prediction target."""
        self.last = None
        if self.bos_id is not None and self.room:
            self._write(np.asarray([self.bos_id]), ROLE_META)
            self.weights[self.fill - 1] = 0.0

    def add(self, tokens: np.ndarray, role: int, piece: Piece, negative: tuple[str, float] | None = None) -> int:
        """`place`, the tokens that do not fit counted as lost; returns how many."""
        cut = self.place(tokens, role, piece, negative)
        self.stats.truncated_tokens += cut
        return cut

    def cost(self, tokens: np.ndarray, piece: Piece) -> int:
        """Tokens that placing chunk `tokens` takes, its joiner included."""
        return len(self._joiner_before(piece)) + len(tokens)

    def place(self, tokens: np.ndarray, role: int, piece: Piece, negative: tuple[str, float] | None = None) -> int:
        """Append what fits of chunk `tokens`, after the joiner it needs; returns how many did not fit,
        for the caller to carry on or drop. `negative`: a negative's chunk id and cosine to its
        meta-chunk, recorded if any of it is placed."""
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
        return len(tokens) - placed

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


def negative_quota(room: int, meta_tokens: int, meta_chunks: int, fixed_k: int | None, max_k: int | None,
                   headroom: float, lengths: np.ndarray) -> Quota:
    """The negatives after each meta-chunk of one meta-document, placed in a segment of `room` tokens.

    The paper's k = (T*w - S) / (p*s) counts negatives: T the room, w the headroom, S the
    meta-document's tokens, p its chunks, s the negatives' length. A count assumes every negative is
    s tokens long, as in the authors' data, where meta-documents and negatives alike are cut at 2048
    characters (`group_segments`, caskcsg/longcontext NExtLong/chunking.py) from the same corpora
    (FineWeb-Edu and Cosmopedia v2, NExtLong/README.md). Over a corpus of shorter texts it is not:
    hard negatives of a long meta-chunk run longer than the corpus's mean, and k of them can fill the
    sequence before the second meta-chunk. The authors' released code holds the chunker and the
    trainer, not the synthesis (its README points to the paper's pseudocode), so the unit is this
    code's choice: k*s itself, in tokens. Each meta-chunk's negatives take at most (T*w - S) / p tokens
    (at least one negative), which is the paper's count wherever negatives are s tokens long. With
    w > 1 the extended document overruns the room and is cut at the sequence's end. `max_k` caps the
    count; a fixed k stays a count, as given.
    """
    if fixed_k is not None:
        return Quota(count=fixed_k)
    budget = max(1, int((room * headroom - meta_tokens) // meta_chunks))
    return Quota(count=max_k, tokens=budget, lengths=lengths)


@dataclass(frozen=True)
class Extension:
    """What extending meta-documents needs, the same for every shard."""

    meta: ChunkStore
    corpus: ChunkStore
    corpus_chunk_doc: np.ndarray
    corpus_doc_index: dict[str, int]
    corpus_duplicates: np.ndarray  # bool per corpus document: a near-duplicate of an earlier one
    negative_lengths: np.ndarray  # tokens per corpus chunk
    fixed_k: int | None
    max_k: int | None
    headroom: float
    min_segment: int
    meta_position: str
    seed: int
    search_depth: int  # candidates searched per meta-chunk in the first, batched pass
    groups: MetaGroups  # the meta-documents extended, as groups of meta-store documents
    prefetch_docs: int = 64

    @classmethod
    def build(cls, meta: ChunkStore, corpus: ChunkStore, mining: MiningConfig, doc_len: int,
              duplicates: np.ndarray | None) -> "Extension":
        """`doc_len`: tokens per extended document (`OutputConfig.document_len`); `duplicates`: the
        corpus's near-duplicate documents (`dedup`), None where that is off."""
        lengths = corpus.chunk_lengths()
        # The count a meta-chunk may take: fixed, or at most what fills the whole target from one
        # meta-chunk with negatives of the mean length. Searching twice as deep leaves room for the
        # filters, so most meta-chunks need no second search.
        expected = mining.k
        if expected is None:
            mean_negative = float(lengths.mean()) if len(lengths) else 1.0
            expected = min(math.ceil(doc_len * mining.headroom / mean_negative), mining.max_k or math.inf)
        if duplicates is None:
            duplicates = np.zeros(corpus.num_docs, bool)
        return cls(meta=meta, corpus=corpus, corpus_chunk_doc=corpus.chunk_doc(), corpus_duplicates=duplicates,
                   corpus_doc_index={doc_id: i for i, doc_id in enumerate(corpus.doc_ids)},
                   negative_lengths=lengths, fixed_k=mining.k, max_k=mining.max_k, headroom=mining.headroom,
                   min_segment=mining.min_segment_tokens, meta_position=mining.meta_position, seed=mining.seed,
                   search_depth=min(corpus.num_chunks, 2 * int(expected) + 32),
                   groups=meta_groups(meta, mining.min_meta_chunks, merge=mining.short_meta == "merge"))


def _group_chunks(ctx: Extension, group: tuple[int, ...]) -> list[tuple[int, int]]:
    """(meta-store document, chunk) of every chunk of a group, in order."""
    return [(doc, chunk) for doc in group for chunk in ctx.meta.doc_chunks(doc)]


def _prefetched(ctx: Extension, source: CandidateSource,
                groups: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], np.ndarray, np.ndarray]]:
    """(group, scores, ids) per meta-document group, searching the meta-chunks of many at once."""
    depth = ctx.search_depth
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
        quota = negative_quota(packer.next_segment_room - 1, sum(len(t) for t in meta_tokens), len(chunks),
                               ctx.fixed_k, ctx.max_k, ctx.headroom, ctx.negative_lengths)
        packer.begin_segment(doc_ids)
        packer.stats.documents_used += len(group)
        packer.stats.meta_tokens_offered += sum(len(t) for t in meta_tokens)
        _extend(ctx, source, rules, packer, chunks, meta_tokens, (scores, ids), own, quota)
        if packer.full:
            yield packer.take()
    if packer.fill and (max_sequences is None or packer.stats.sequences < max_sequences):
        yield packer.take()


def _extend(ctx: Extension, source: CandidateSource, rules: NegativeFilter, packer: Packer,
            chunks: list[tuple[int, int]], meta_tokens: list[np.ndarray],
            first_pass: tuple[np.ndarray, np.ndarray], own: MetaDocument, quota: Quota) -> None:
    """One meta-document laid out in the segment just begun: each meta-chunk among its negatives,
    until the segment is full."""
    scores, ids = first_pass
    # Negatives placed before the second meta-chunk keep room for it (and for the first, where that is
    # not yet placed) whenever the segment can hold both whole; the rest of that meta-chunk's
    # negatives, in rank order, stay out. The paper needs no such rule: with negatives of s tokens and
    # meta-chunks of equal length, the second lands at T*w/p, inside the sequence for any p >= 2 > w.
    first_two = [len(tokens) + packer.joiner_len for tokens in meta_tokens[:2]]
    if len(first_two) < 2 or sum(first_two) > packer.room:
        first_two = []
    started = placed = 0  # meta-chunks handed to the packer (the rest never appear), and those placed
    for i, ((doc, chunk), tokens) in enumerate(zip(chunks, meta_tokens)):
        meta = Piece("meta", doc, chunk)
        if ctx.meta_position == "head":  # placed before mining: a full segment then needs none
            placed += packer.add(tokens, ROLE_META, meta) < len(tokens)
            started += 1
            if packer.segment_full:
                break
        negatives = mine(source, rules, ctx.meta.embeddings[chunk], quota, (scores[i], ids[i]), own,
                         packer.negatives_in_sample, ctx.corpus.num_chunks)
        group_pieces: list[tuple[int, float] | None] = list(negatives)
        if ctx.meta_position != "head":
            group_pieces.insert(_meta_slot(ctx, len(group_pieces), doc, i), None)  # None: the meta-chunk
        held_back = False
        for piece in group_pieces:
            if packer.segment_full:
                break
            if piece is None:
                placed += packer.add(tokens, ROLE_META, meta) < len(tokens)
                started += 1
                continue
            negative, score = piece
            negative_tokens = ctx.corpus.tokens(negative)
            origin = Piece("corpus", int(ctx.corpus_chunk_doc[negative]), negative)
            reserve = sum(first_two[started:])
            held_back = held_back or (reserve > 0 and packer.room - packer.cost(negative_tokens, origin) < reserve)
            if held_back:
                continue
            chunk_id = ctx.corpus.chunk_id(negative, ctx.corpus_chunk_doc)
            cut = packer.add(negative_tokens, ROLE_NEGATIVE, origin, (chunk_id, score))
            if cut < len(negative_tokens):  # placed, if only in part: a joiner alone places nothing
                rules.place(negative, score)
        if packer.segment_full:
            break
    packer.stats.meta_chunks_dropped += len(chunks) - started
    packer.stats.single_meta_chunk_segments += int(placed < 2)


def _meta_slot(ctx: Extension, negatives: int, doc: int, chunk: int) -> int:
    """Where meta-chunk `chunk` of `doc` goes among its negatives when not first: last, or at a place
    drawn from (seed, doc, chunk), so any shard split draws the same."""
    if ctx.meta_position == "tail":
        return negatives
    return int(np.random.default_rng([ctx.seed, doc, chunk]).integers(negatives + 1))


def concatenated_sequences(corpus: ChunkStore, docs: list[int], packer: Packer,
                           max_sequences: int | None) -> Iterator[Sequence]:
    """Whole documents of `corpus` in the order of `docs`, back to back, one segment per sequence,
    BOS between documents. A document that crosses a sequence's end goes on at the start of the next
    sequence, without a BOS (standard packing, the paper's "Standard"); only where `max_sequences`
    ends the run is the rest dropped."""
    def capped() -> bool:
        return max_sequences is not None and packer.stats.sequences >= max_sequences

    for doc in docs:
        if packer.full:
            yield packer.take()
        if capped():
            return
        doc_id, chunks = corpus.doc_ids[doc], corpus.doc_chunks(doc)
        packer.stats.documents_used += 1
        packer.stats.meta_tokens_offered += sum(len(corpus.tokens(c)) for c in chunks)
        if packer.fill:
            packer.meta_doc_ids.append(doc_id)
            packer.add_bos()
        else:
            packer.begin_segment((doc_id,))
        for n, chunk in enumerate(chunks):
            rest = corpus.tokens(chunk)
            while len(rest):
                if packer.full:
                    yield packer.take()
                    if capped():
                        begun = len(rest) < len(corpus.tokens(chunk))
                        packer.stats.truncated_tokens += len(rest) if begun else 0
                        packer.stats.meta_chunks_dropped += len(chunks) - n - begun
                        return
                    packer.begin_segment((doc_id,), bos=False)
                rest = rest[len(rest) - packer.place(rest, ROLE_META, Piece("meta", doc, chunk)):]
    if packer.fill and not capped():
        yield packer.take()
