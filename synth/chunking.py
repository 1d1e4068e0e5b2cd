"""Paragraph-preserving chunking (NExtLong step 1).

A document is cut into chunks of at most `limit` units (characters, as in the paper, or tokens of
the target tokenizer) such that the chunk texts joined give back the document exactly. Lines
(paragraphs) are the atoms of a greedy grouping; a line longer than the limit is cut at sentence
ends, and a sentence longer than the limit at token boundaries.

The document is tokenized once and every cut falls on a token boundary, so a chunk's token ids are
a slice of the document's ids: sizes in tokens are exact and additive, and the ids of a chunk
decode to exactly its text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from nextlong_contract.tokenizer import TextTokenizer

CHUNK_UNITS = ("tokens", "chars")
# Every token of the supported vocabularies is far shorter than this, so a character limit at
# least this large can always be met with cuts on token boundaries.
MIN_CHAR_LIMIT = 256

# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before whitespace.
# The whitespace goes with the next sentence, as byte-level BPE attaches it to the next word.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_LINE_END = re.compile(r"\n")


@dataclass(frozen=True)
class Chunk:
    text: str
    ids: np.ndarray  # int32 token ids, a slice of the document's tokenization


@dataclass(frozen=True)
class _Tokenized:
    text: str
    ids: np.ndarray
    # Cut points: the token indices at which the text may be split cleanly (byte-level BPE spreads
    # some characters over several tokens), with the character offset of each, plus the end.
    cut_tokens: np.ndarray
    cut_chars: np.ndarray

    def snap(self, char_positions: np.ndarray) -> np.ndarray:
        """Index of the first cut at or after each character position."""
        return np.searchsorted(self.cut_chars, char_positions, side="left")


def _tokenized(text: str, encoding) -> _Tokenized:
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    ends_so_far = np.maximum.accumulate(offsets[:, 1])
    clean = np.ones(len(offsets), dtype=bool)
    clean[1:] = offsets[1:, 0] >= ends_so_far[:-1]
    starts, first = np.unique(offsets[clean, 0], return_index=True)
    cut_tokens = np.flatnonzero(clean)[first]
    if len(starts):
        starts[0] = 0  # leading characters a normaliser dropped stay with the first chunk
    return _Tokenized(
        text,
        np.asarray(encoding.ids, dtype=np.int32),
        np.append(cut_tokens, len(encoding.ids)),
        np.append(starts, len(text)),
    )


class _Splitter:
    def __init__(self, doc: _Tokenized, limit: int, unit: str):
        self.doc, self.limit = doc, limit
        self.positions = doc.cut_tokens if unit == "tokens" else doc.cut_chars

    def size(self, a: int, b: int) -> int:
        return int(self.positions[b] - self.positions[a])

    def boundaries(self, pattern: re.Pattern, a: int, b: int) -> list[int]:
        """Cut indices strictly inside (a, b) where `pattern` ends, snapped to token boundaries."""
        start, stop = int(self.doc.cut_chars[a]), int(self.doc.cut_chars[b])
        ends = np.fromiter((m.end() for m in pattern.finditer(self.doc.text, start, stop)), np.int64)
        found = np.unique(self.doc.snap(ends))
        return found[(found > a) & (found < b)].tolist()

    def hard_cuts(self, a: int, b: int) -> list[int]:
        cuts = []
        while self.size(a, b) > self.limit:
            # The furthest cut that keeps the piece within the limit (always past `a`: one token
            # never exceeds the limit, see MIN_CHAR_LIMIT).
            far = int(np.searchsorted(self.positions[a:b], self.positions[a] + self.limit, "right")) + a - 1
            a = max(far, a + 1)
            cuts.append(a)
        return cuts

    def atoms(self) -> list[int]:
        """Sorted cut indices delimiting pieces that each fit the limit."""
        last = len(self.positions) - 1
        lines = [0, *self.boundaries(_LINE_END, 0, last), last]
        cuts = [0]
        for a, b in zip(lines, lines[1:]):
            if self.size(a, b) > self.limit:
                sentences = [a, *self.boundaries(_SENTENCE_END, a, b), b]
                for sa, sb in zip(sentences, sentences[1:]):
                    cuts.extend(self.hard_cuts(sa, sb))
                    cuts.append(sb)
            else:
                cuts.append(b)
        return cuts

    def group(self) -> list[int]:
        """Greedy grouping of consecutive atoms; sizes are additive so the limit holds exactly."""
        atoms = self.atoms()
        chosen = [atoms[0]]
        for previous, cut in zip(atoms, atoms[1:]):
            if self.size(chosen[-1], cut) > self.limit:
                chosen.append(previous)
        if chosen[-1] != atoms[-1]:
            chosen.append(atoms[-1])
        return chosen


def _check(limit: int, unit: str) -> None:
    if unit not in CHUNK_UNITS:
        raise ValueError(f"chunk unit must be one of {CHUNK_UNITS}, not {unit!r}")
    if limit < (MIN_CHAR_LIMIT if unit == "chars" else 1):
        raise ValueError(f"chunk limit {limit} {unit} is too small")


def _chunks(doc: _Tokenized, limit: int, unit: str) -> list[Chunk]:
    if not doc.text:
        return []
    cuts = _Splitter(doc, limit, unit).group()
    return [
        Chunk(text=doc.text[doc.cut_chars[a]:doc.cut_chars[b]],
              ids=doc.ids[doc.cut_tokens[a]:doc.cut_tokens[b]])
        for a, b in zip(cuts, cuts[1:])
    ]


def chunk_documents(texts: list[str], limit: int, unit: str,
                    tokenizer: TextTokenizer) -> list[list[Chunk]]:
    """Chunks of each text; the texts are tokenized in one parallel batch."""
    _check(limit, unit)
    encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False) if texts else []
    return [_chunks(_tokenized(t, e), limit, unit) for t, e in zip(texts, encodings)]


def chunk_document(text: str, limit: int, unit: str, tokenizer: TextTokenizer) -> list[Chunk]:
    return chunk_documents([text], limit, unit, tokenizer)[0]
